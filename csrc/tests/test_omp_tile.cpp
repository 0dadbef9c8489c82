// The blocked CPU kernel (cpu/omp_tile.h) against the per-vector reference core::host_encode, bit for bit (indices
// and coefficient bits), float32 and float64, for every SIMD level this CPU runs (AVX-512, AVX2, portable), each in
// the Gram form and the Gram-free form, over random problems and degenerate rows: zero, non-finite, tiny and huge
// vectors, tol stops, exactly sparse vectors (zero residual), zero and duplicate atoms (dependent atoms), K not a
// multiple of the atom block, N not a multiple of the tile and smaller than one tile, so that the vectors of one
// tile stop at different steps. Built by CMake and run by ctest; argv[1] = problems.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "../cpu/omp_tile.h"
#include "../omp_core.h"

namespace {

int failures = 0;

// A dictionary prepared the way cpu/omp_cpu.cpp prepares it (core::prepare_atom, core::gram_entry).
template <typename T>
struct Prepared {
  int64_t K, M;
  std::vector<T> atoms_t, gram, inv_norm;
  Prepared(const std::vector<T>& d, int64_t K_, int64_t M_) : K(K_), M(M_), atoms_t(M_ * K_), gram(K_ * K_), inv_norm(K_) {
    for (int64_t k = 0; k < K; ++k) lasers::core::prepare_atom(d.data(), K, M, k, atoms_t.data(), inv_norm.data());
    for (int64_t a = 0; a < K; ++a)
      for (int64_t b = 0; b < K; ++b) gram[a * K + b] = lasers::core::gram_entry(atoms_t.data(), K, M, a, b);
  }
  lasers::core::HostProblem<T> problem(int S, T tol) const {
    return {atoms_t.data(), gram.data(), inv_norm.data(), K, M, S, tol, lasers::core::default_thresholds<T>()};
  }
};

template <typename T>
void reference_codes(const lasers::core::HostProblem<T>& p, const std::vector<T>& x, std::vector<int64_t>& idx,
                     std::vector<T>& coef) {
  using Scratch = lasers::core::HostScratch<T>;
  std::vector<T> values(Scratch::values(p.K, p.M, p.S));
  std::vector<const T*> pointers(Scratch::pointers(p.M, p.S));
  const Scratch w = Scratch::carve(values.data(), pointers.data(), p.K, p.M, p.S);
  const int64_t N = static_cast<int64_t>(x.size()) / p.M;
  idx.assign(N * p.S, 0);
  coef.assign(N * p.S, T(0));
  for (int64_t n = 0; n < N; ++n) lasers::core::host_encode<T>(p, x.data() + n * p.M, w, &idx[n * p.S], &coef[n * p.S]);
}

// The tile kernel of one SIMD level (Level: lasers::tile::avx512, avx2 or portable, wrapped below), every scratch
// value poisoned with NaN first and every output poisoned: each must be written before it is read.
template <typename T, typename Level>
void tile_codes(const lasers::core::HostProblem<T>& p, const std::vector<T>& x, std::vector<int64_t>& idx,
                std::vector<T>& coef) {
  typename Level::template Work<T> w(p.K, p.M, p.S, p.gram == nullptr);
  for (auto* v : {&w.x, &w.alpha0, &w.alpha, &w.lanes, &w.rows_buf, &w.neg_gamma})
    for (auto& a : *v) a = std::numeric_limits<T>::quiet_NaN();
  const int V = Level::template lanes<T>();
  const int64_t N = static_cast<int64_t>(x.size()) / p.M;
  idx.assign(N * p.S, -7);
  coef.assign(N * p.S, std::numeric_limits<T>::quiet_NaN());
  for (int64_t n0 = 0; n0 < N; n0 += V) {
    const int n = static_cast<int>(N - n0 < V ? N - n0 : V);
    Level::encode_tile(p, x.data() + n0 * p.M, n, w, &idx[n0 * p.S], &coef[n0 * p.S]);
  }
}

#define LASERS_LEVEL(NAME)                                                                                      \
  struct Level_##NAME {                                                                                         \
    static constexpr const char* name = #NAME;                                                                  \
    template <typename T>                                                                                       \
    using Work = lasers::tile::NAME::Work<T>;                                                                   \
    template <typename T>                                                                                       \
    static constexpr int lanes() {                                                                              \
      return lasers::tile::NAME::kV<T>;                                                                         \
    }                                                                                                           \
    template <typename T>                                                                                       \
    static void gram_rows(const T* ut, int64_t K, int64_t M, int64_t j0, int64_t j1, T* gram) {                 \
      lasers::tile::NAME::gram_rows<T>(ut, K, M, j0, j1, gram);                                                 \
    }                                                                                                           \
    template <typename T>                                                                                       \
    static void encode_tile(const lasers::core::HostProblem<T>& p, const T* xs, int n, Work<T>& w, int64_t* idx, \
                            T* coef) {                                                                          \
      lasers::tile::NAME::encode_tile<T>(p, xs, n, w, idx, coef);                                                 \
    }                                                                                                           \
  };
LASERS_LEVEL(portable)
#ifdef LASERS_X86_LEVELS
LASERS_LEVEL(avx2)
LASERS_LEVEL(avx512)
#endif
#undef LASERS_LEVEL

template <typename T>
bool same_bits(T a, T b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

template <typename T, typename Level>
void compare(const lasers::core::HostProblem<T>& p, const std::vector<T>& x, const char* what, bool gram_only) {
  std::vector<int64_t> ri, ti;
  std::vector<T> rc, tc;
  reference_codes(p, x, ri, rc);
  for (const bool gram_free : {false, true}) {
    if (gram_free && gram_only) continue;
    lasers::core::HostProblem<T> q = p;
    if (gram_free) q.gram = nullptr;
    tile_codes<T, Level>(q, x, ti, tc);
    for (size_t i = 0; i < ri.size(); ++i)
      if (ri[i] != ti[i] || !same_bits(rc[i], tc[i])) {
        std::printf("FAIL %s (%s, %s%s, K=%lld M=%lld S=%d N=%lld): slot %zu: reference %lld %.17g, tile "
                    "%lld %.17g\n",
                    what, sizeof(T) == 4 ? "float32" : "float64", Level::name, gram_free ? ", Gram-free" : "",
                    (long long)p.K, (long long)p.M, p.S, (long long)(x.size() / p.M), i, (long long)ri[i],
                    double(rc[i]), (long long)ti[i], double(tc[i]));
        ++failures;
        return;
      }
  }
}

// Every SIMD level of the kernel this CPU can run, in the Gram and the Gram-free form.
// gram_only: p.gram is not the atoms' Gram matrix (the chosen-atom test), so the Gram-free form does not apply.
template <typename T>
void compare_all(const lasers::core::HostProblem<T>& p, const std::vector<T>& x, const char* what,
                 bool gram_only = false) {
  compare<T, Level_portable>(p, x, what, gram_only);
#ifdef LASERS_X86_LEVELS
  if (__builtin_cpu_supports("x86-64-v3")) compare<T, Level_avx2>(p, x, what, gram_only);
  if (__builtin_cpu_supports("x86-64-v4")) compare<T, Level_avx512>(p, x, what, gram_only);
#endif
}

// The chosen-atom rule (an already chosen atom wins the argmax only at noise level; then alpha is searched again with
// the chosen atoms masked). With a consistent Gram matrix the correlations of chosen atoms stay far below the stop
// level, so random problems never reach it; a "Gram matrix" whose off-diagonal entries are not symmetric leaves the
// second chosen atom a correlation of order one, which reaches that branch at every step. The kernels must still
// follow host_encode's operations exactly.
template <typename T>
void check_chosen_atom_rule(std::mt19937& rng) {
  std::normal_distribution<double> nd;
  std::uniform_int_distribution<int> pick(0, 1 << 30);
  for (int it = 0; it < 60; ++it) {
    const int64_t M = 2 + pick(rng) % 6, K = 2 + pick(rng) % 10, N = 1 + pick(rng) % 20;
    const int S = 1 + pick(rng) % static_cast<int>(std::min(M, K));
    std::vector<T> d(K * M), x(N * M);
    for (auto& v : d) v = static_cast<T>(nd(rng));
    for (auto& v : x) v = static_cast<T>(nd(rng));
    Prepared<T> prep(d, K, M);
    for (int64_t a = 0; a < K; ++a)
      for (int64_t b = 0; b < K; ++b)
        if (a != b) prep.gram[a * K + b] = static_cast<T>(prep.gram[a * K + b] + 0.3 * nd(rng));
    compare_all(prep.problem(S, T(-1)), x, "chosen-atom rule", true);
  }
}

template <typename T>
void run(std::mt19937& rng, int problems) {
  std::normal_distribution<double> nd;
  std::uniform_int_distribution<int> pick(0, 1 << 30);
  for (int it = 0; it < problems; ++it) {
    const int64_t M = 1 + pick(rng) % (it % 4 == 0 ? 70 : 24);
    const int64_t K = 1 + pick(rng) % (it % 5 == 0 ? 300 : 90);
    const int S = 1 + pick(rng) % static_cast<int>(std::min(M, K));
    const int64_t N = pick(rng) % 40;  // below, at and above one tile (V = 4 or 8)
    std::vector<T> d(K * M), x(N * M);
    for (auto& v : d) v = static_cast<T>(nd(rng));
    if (it % 3 == 0 && K > 2) {  // zero atoms, exact and scaled duplicates: dependent atoms
      for (int64_t m = 0; m < M; ++m) {
        d[0 * M + m] = T(0);
        d[(K - 1) * M + m] = T(-3) * d[1 * M + m];
      }
    }
    if (it % 7 == 3) {  // clustered, nearly dependent atoms: Cholesky pivots just above the limit, and correlations
                        // of chosen atoms at the noise level that can win the argmax (the chosen-atom rule)
      const double spread = std::ldexp(1.0, -2 - pick(rng) % (sizeof(T) == 4 ? 10 : 24));
      const int64_t centres = 1 + pick(rng) % 3;
      for (int64_t k = centres; k < K; ++k)
        for (int64_t m = 0; m < M; ++m) d[k * M + m] = static_cast<T>(d[(k % centres) * M + m] + spread * nd(rng));
    }
    for (auto& v : x) v = static_cast<T>(nd(rng));
    const Prepared<T> prep(d, K, M);
    for (int64_t n = 0; n < N; ++n) {  // degenerate rows inside tiles whose other rows go on
      T* row = x.data() + n * M;
      switch (pick(rng) % 12) {
        case 0:
          for (int64_t m = 0; m < M; ++m) row[m] = T(0);
          break;
        case 1:
          row[pick(rng) % M] = std::numeric_limits<T>::quiet_NaN();
          break;
        case 2:
          row[pick(rng) % M] = (pick(rng) % 2 ? T(1) : T(-1)) * std::numeric_limits<T>::infinity();
          break;
        case 3:
          for (int64_t m = 0; m < M; ++m) row[m] = std::ldexp(row[m], sizeof(T) == 4 ? -140 : -1060);  // subnormal
          break;
        case 4:
          for (int64_t m = 0; m < M; ++m) row[m] = std::ldexp(row[m], sizeof(T) == 4 ? 120 : 1015);
          break;
        case 5: {  // exactly a combination of a few atoms: the residual reaches zero early
          for (int64_t m = 0; m < M; ++m) row[m] = T(0);
          for (int a = 0; a < 1 + pick(rng) % 2; ++a) {
            const int64_t k = pick(rng) % K;
            for (int64_t m = 0; m < M; ++m) row[m] += T(2) * d[k * M + m];
          }
          break;
        }
        case 6:  // a copy of an atom
          for (int64_t m = 0; m < M; ++m) row[m] = d[(pick(rng) % K) * M + m];
          break;
        default:
          break;
      }
    }
    compare_all(prep.problem(S, T(-1)), x, "random");
    compare_all(prep.problem(S, static_cast<T>(0.3 * M)), x, "tol");
    compare_all(prep.problem(S, T(0)), x, "tol 0");
  }
}

}  // namespace

// The CPU op's Gram matrix (Level::gram_rows, kGramR rows per register block, rows in any order and range) equals
// gram_entry's chain for every entry, bit for bit, across column and row block boundaries and with a zero atom.
template <typename T, typename Level>
void check_gram_rows(std::mt19937& rng) {
  std::normal_distribution<double> nd;
  for (const int64_t K : {1, 7, 31, 32, 33, 512, 513, 1030}) {
    for (const int64_t M : {1, 16, 33}) {
      std::vector<T> d(K * M);
      for (auto& v : d) v = static_cast<T>(nd(rng));
      for (int64_t m = 0; m < M && K > 3; ++m) d[3 * M + m] = T(0);  // a zero atom
      const Prepared<T> prep(d, K, M);
      std::vector<T> gram(K * K, T(-7));  // poisoned: every entry must be written
      const int64_t split = K / 3;         // two ranges, the second first
      Level::gram_rows(prep.atoms_t.data(), K, M, split, K, gram.data());
      Level::gram_rows(prep.atoms_t.data(), K, M, 0, split, gram.data());
      if (std::memcmp(gram.data(), prep.gram.data(), sizeof(T) * K * K) != 0) {
        std::printf("FAIL gram rows (%s) K=%lld M=%lld (%s)\n", Level::name, static_cast<long long>(K),
                    static_cast<long long>(M), sizeof(T) == 4 ? "float" : "double");
        ++failures;
      }
    }
  }
}

template <typename T>
void check_gram_rows_all(std::mt19937& rng) {
  check_gram_rows<T, Level_portable>(rng);
#ifdef LASERS_X86_LEVELS
  if (__builtin_cpu_supports("x86-64-v3")) check_gram_rows<T, Level_avx2>(rng);
  if (__builtin_cpu_supports("x86-64-v4")) check_gram_rows<T, Level_avx512>(rng);
#endif
}

int main(int argc, char** argv) {
  const int problems = argc > 1 ? std::atoi(argv[1]) : 300;
  std::mt19937 rng(12345);
  check_gram_rows_all<float>(rng);
  check_gram_rows_all<double>(rng);
  run<float>(rng, problems);
  run<double>(rng, problems);
  check_chosen_atom_rule<float>(rng);
  check_chosen_atom_rule<double>(rng);
  // the paper's shape, a few tiles
  {
    std::normal_distribution<double> nd;
    const int64_t K = 512, M = 16, N = 1000;
    std::vector<float> d(K * M), x(N * M);
    for (auto& v : d) v = static_cast<float>(nd(rng));
    for (auto& v : x) v = static_cast<float>(nd(rng));
    const Prepared<float> prep(d, K, M);
    compare_all(prep.problem(5, -1.0f), x, "paper shape");
  }
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("omp_tile: blocked kernel bit-identical to host_encode (%d problems per dtype)\n", problems);
  return 0;
}
