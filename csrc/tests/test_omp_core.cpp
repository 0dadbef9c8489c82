// Native test of the torch-free Batch-OMP core (csrc/omp_core.h), built by CMake and run by ctest.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "../omp_core.h"

namespace {

int failures = 0;

void check(bool ok, const char* what) {
  if (!ok) {
    std::printf("FAIL: %s\n", what);
    ++failures;
  }
}

// A dictionary (K, M) prepared the way the CPU kernel prepares it: unit atoms, transposed copy, Gram, 1/norms.
struct Prepared {
  int64_t K, M;
  std::vector<double> atoms, atoms_t, gram, inv_norm;

  Prepared(const std::vector<double>& dict, int64_t K_, int64_t M_)
      : K(K_), M(M_), atoms(dict), atoms_t(M_ * K_), gram(K_ * K_), inv_norm(K_) {
    for (int64_t k = 0; k < K; ++k) {
      double nn = 0;
      for (int64_t m = 0; m < M; ++m) nn += dict[k * M + m] * dict[k * M + m];
      const double norm = std::sqrt(nn);
      inv_norm[k] = norm > 0 ? 1.0 / norm : 0.0;
      for (int64_t m = 0; m < M; ++m) atoms[k * M + m] = norm > 0 ? dict[k * M + m] / norm : 0.0;
    }
    for (int64_t k = 0; k < K; ++k)
      for (int64_t m = 0; m < M; ++m) atoms_t[m * K + k] = atoms[k * M + m];
    for (int64_t a = 0; a < K; ++a)
      for (int64_t b = 0; b < K; ++b) {
        double g = 0;
        for (int64_t m = 0; m < M; ++m) g += atoms[a * M + m] * atoms[b * M + m];
        gram[a * K + b] = g;
      }
  }

  // Codes x with sparsity S; returns the number of atoms used.
  int encode(const std::vector<double>& x, int S, std::vector<int64_t>& idx, std::vector<double>& coef,
             double tol = -1) const {
    lasers::core::HostProblem<double> p{atoms_t.data(), gram.data(), inv_norm.data(), K, M, S, tol,
                                        lasers::core::default_thresholds<double>()};
    using Scratch = lasers::core::HostScratch<double>;
    std::vector<double> values(Scratch::values(K, M, S));
    std::vector<const double*> pointers(Scratch::pointers(M, S));
    const Scratch w = Scratch::carve(values.data(), pointers.data(), K, M, S);
    idx.assign(S, 0);
    coef.assign(S, 0);
    return lasers::core::host_encode(p, x.data(), w, idx.data(), coef.data());
  }

  // sum_s coef[s] * dict[idx[s]] (dict as given, not normalised)
  std::vector<double> decode(const std::vector<double>& dict, const std::vector<int64_t>& idx,
                             const std::vector<double>& coef) const {
    std::vector<double> out(M, 0.0);
    for (size_t s = 0; s < idx.size(); ++s)
      if (idx[s] >= 0)
        for (int64_t m = 0; m < M; ++m) out[m] += coef[s] * dict[idx[s] * M + m];
    return out;
  }
};

double dist(const std::vector<double>& a, const std::vector<double>& b) {
  double d = 0;
  for (size_t i = 0; i < a.size(); ++i) d += (a[i] - b[i]) * (a[i] - b[i]);
  return std::sqrt(d);
}

std::vector<double> randn(std::mt19937& rng, size_t n) {
  std::normal_distribution<double> nd;
  std::vector<double> v(n);
  for (auto& e : v) e = nd(rng);
  return v;
}

}  // namespace

int main() {
  std::mt19937 rng(1234);

  {  // Scaled identity basis: an exactly 3-sparse signal is recovered, coefficients refer to the scaled atoms.
    const int64_t M = 8;
    std::vector<double> dict(M * M, 0.0);
    for (int64_t k = 0; k < M; ++k) dict[k * M + k] = 1.0 + k;
    Prepared p(dict, M, M);
    std::vector<double> x(M, 0.0);
    x[1] = 4.0;
    x[5] = -3.0;
    x[6] = 0.5;
    std::vector<int64_t> idx;
    std::vector<double> coef;
    check(p.encode(x, 3, idx, coef) == 3, "identity: three atoms used");
    check(idx[0] == 1 && idx[1] == 5 && idx[2] == 6, "identity: support in order of |correlation|");
    check(std::fabs(coef[0] - 2.0) < 1e-12 && std::fabs(coef[1] + 0.5) < 1e-12, "identity: coefficients");
    check(dist(p.decode(dict, idx, coef), x) < 1e-12, "identity: exact reconstruction");
  }

  {  // Zero signal: no atom, unused slots marked.
    const int64_t K = 10, M = 4;
    const auto dict = randn(rng, K * M);
    Prepared p(dict, K, M);
    std::vector<int64_t> idx;
    std::vector<double> coef;
    check(p.encode(std::vector<double>(M, 0.0), 3, idx, coef) == 0, "zero signal: no atom");
    check(idx[0] == -1 && idx[2] == -1 && coef[1] == 0.0, "zero signal: slots -1 / 0");
  }

  {  // S = M over a random dictionary: exact reconstruction; S = 1: the atom of largest |normalised correlation|.
    const int64_t K = 24, M = 6;
    const auto dict = randn(rng, K * M);
    Prepared p(dict, K, M);
    for (int trial = 0; trial < 50; ++trial) {
      const auto x = randn(rng, M);
      std::vector<int64_t> idx;
      std::vector<double> coef;
      p.encode(x, M, idx, coef);
      check(dist(p.decode(dict, idx, coef), x) < 1e-6, "S = M: exact reconstruction");
      p.encode(x, 1, idx, coef);
      int64_t best = 0;
      double best_c = -1;
      for (int64_t k = 0; k < K; ++k) {
        double c = 0;
        for (int64_t m = 0; m < M; ++m) c += p.atoms[k * M + m] * x[m];
        if (std::fabs(c) > best_c) best_c = std::fabs(c), best = k;
      }
      check(idx[0] == best, "S = 1: largest |correlation|");
    }
  }

  {  // Duplicate and zero atoms: a copy is never chosen next to its original, a zero atom never.
    const int64_t M = 5, K0 = 6, K = 2 * K0 + 1;
    auto dict = randn(rng, K0 * M);
    for (int64_t i = 0; i < K0 * M; ++i) dict.push_back(-2.0 * dict[i]);
    dict.resize(K * M, 0.0);  // last atom is zero
    Prepared p(dict, K, M);
    for (int trial = 0; trial < 50; ++trial) {
      const auto x = randn(rng, M);
      std::vector<int64_t> idx;
      std::vector<double> coef;
      const int used = p.encode(x, M, idx, coef);
      bool seen[K0] = {};
      bool ok = true;
      for (int s = 0; s < used; ++s) {
        ok = ok && idx[s] != K - 1 && !seen[idx[s] % K0];
        seen[idx[s] % K0] = true;
      }
      check(ok, "duplicates: never both an atom and its copy, never the zero atom");
      check(dist(p.decode(dict, idx, coef), x) < 1e-6, "duplicates: exact reconstruction with S = M");
    }
  }

  {  // tol: stops once the squared residual is at most tol.
    const int64_t K = 30, M = 10;
    const auto dict = randn(rng, K * M);
    Prepared p(dict, K, M);
    const auto x = randn(rng, M);
    std::vector<int64_t> idx;
    std::vector<double> coef;
    const double tol = 1.0;
    const int used = p.encode(x, M, idx, coef, tol);
    const double r = dist(p.decode(dict, idx, coef), x);
    check(r * r <= tol + 1e-12, "tol: residual below tol");
    check(used < M && idx[used] == -1, "tol: stopped early");
  }

  if (failures == 0) std::printf("omp_core: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
