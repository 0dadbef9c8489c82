// CPU-side proof of the CUDA fast path: runs the per-warp algorithm of omp_warp.h (the very code the GPU kernel
// runs) with 32 simulated lanes and checks that its codes equal host_encode's (the CPU kernel's per-vector code) bit
// for bit: the same atoms in the same order and the same coefficient bits, on 10^6 random vectors at the paper's shape,
// on every (K, S) instantiation class the kernel has, and on degenerate inputs. Built by CMake, run by ctest.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "../omp_core.h"
#include "../omp_warp.h"

namespace {

using lasers::warp::kLanes;

int failures = 0;

void check(bool ok, const char* what) {
  if (!ok) {
    std::printf("FAIL: %s\n", what);
    ++failures;
  }
}

// The host executor of warp::code_group: one thread holds all 32 lanes.
struct HostWarp {
  static constexpr int kSlots = kLanes;
  int lane(int slot) const { return slot; }
  void sync() const {}
  void load4(const float* ptr, float* out) const { std::memcpy(out, ptr, 4 * sizeof(float)); }
  void load4_global(const float* ptr, float* out) const { load4(ptr, out); }
  // The GPU's reductions: max of the magnitudes' bits, then min of the indices holding it.
  void argmax(const float (&cand)[kSlots], const int (&cand_k)[kSlots], float& best, int& k) const {
    uint32_t top = 0;
    for (int l = 0; l < kSlots; ++l) {
      uint32_t bits;
      std::memcpy(&bits, &cand[l], 4);
      top = bits > top ? bits : top;
    }
    uint32_t low = ~0u;
    for (int l = 0; l < kSlots; ++l) {
      uint32_t bits;
      std::memcpy(&bits, &cand[l], 4);
      if (bits == top) low = static_cast<uint32_t>(cand_k[l]) < low ? static_cast<uint32_t>(cand_k[l]) : low;
    }
    std::memcpy(&best, &top, 4);
    k = static_cast<int>(low);
  }
  template <int V, class F>
  void per_vector(F&& f) const {
    for (int v = 0; v < V; ++v) f(v);
  }
};

// A float32 dictionary (K, M) prepared as kernel_common.h does (unit atoms, Gram accumulated in double), and the
// fast path's zero-padded copies.
struct Prepared {
  int K, M, Kp;
  std::vector<float> atoms_t, gram, inv_norm;     // (M, K), (K, K), (K)
  std::vector<float> dt_pad, gram_pad, inv_pad;  // (M, Kp), (Kp, Kp), (Kp)

  Prepared(const std::vector<float>& dict, int K_, int M_) : K(K_), M(M_) {
    Kp = 128;
    while (Kp < K) Kp *= 2;
    std::vector<float> unit(static_cast<size_t>(K) * M);
    atoms_t.assign(static_cast<size_t>(M) * K, 0.0f);
    gram.assign(static_cast<size_t>(K) * K, 0.0f);
    inv_norm.assign(K, 0.0f);
    for (int k = 0; k < K; ++k) {
      double nn = 0;
      for (int m = 0; m < M; ++m) nn += double(dict[k * M + m]) * dict[k * M + m];
      const float norm = static_cast<float>(std::sqrt(nn));
      inv_norm[k] = norm > 0 ? 1.0f / norm : 0.0f;
      for (int m = 0; m < M; ++m) unit[k * M + m] = norm > 0 ? dict[k * M + m] / norm : 0.0f;
    }
    for (int k = 0; k < K; ++k)
      for (int m = 0; m < M; ++m) atoms_t[static_cast<size_t>(m) * K + k] = unit[k * M + m];
    for (int a = 0; a < K; ++a)
      for (int b = 0; b < K; ++b) {
        double g = 0;
        for (int m = 0; m < M; ++m) g += double(unit[a * M + m]) * unit[b * M + m];
        gram[static_cast<size_t>(a) * K + b] = static_cast<float>(g);
      }
    dt_pad.assign(static_cast<size_t>(M) * Kp, 0.0f);
    gram_pad.assign(static_cast<size_t>(Kp) * Kp, 0.0f);
    inv_pad.assign(Kp, 0.0f);
    for (int m = 0; m < M; ++m)
      for (int k = 0; k < K; ++k) dt_pad[static_cast<size_t>(m) * Kp + k] = atoms_t[static_cast<size_t>(m) * K + k];
    for (int a = 0; a < K; ++a)
      for (int b = 0; b < K; ++b) gram_pad[static_cast<size_t>(a) * Kp + b] = gram[static_cast<size_t>(a) * K + b];
    for (int k = 0; k < K; ++k) inv_pad[k] = inv_norm[k];
  }
};

// The CPU kernel's codes (host_encode) of x (N, M).
void cpu_codes(const Prepared& d, const std::vector<float>& x, int S, float tol, std::vector<int64_t>& idx,
               std::vector<float>& coef) {
  lasers::core::HostProblem<float> p{d.atoms_t.data(), d.gram.data(), d.inv_norm.data(), d.K, d.M, S, tol,
                                     lasers::core::default_thresholds<float>()};
  using Scratch = lasers::core::HostScratch<float>;
  std::vector<float> values(Scratch::values(d.K, d.M, S));
  std::vector<const float*> pointers(Scratch::pointers(d.M, S));
  const Scratch w = Scratch::carve(values.data(), pointers.data(), d.K, d.M, S);
  const int64_t N = static_cast<int64_t>(x.size()) / d.M;
  idx.assign(N * S, 0);
  coef.assign(N * S, 0.0f);
  for (int64_t n = 0; n < N; ++n) lasers::core::host_encode<float>(p, x.data() + n * d.M, w, &idx[n * S], &coef[n * S]);
}

// The fast path's codes: warp::code_group over groups of V vectors, with 32 simulated lanes.
template <int KB, int S, int V>
void warp_codes(const Prepared& d, const std::vector<float>& x, float tol, std::vector<int64_t>& idx,
                std::vector<float>& coef) {
  const int64_t N = static_cast<int64_t>(x.size()) / d.M;
  idx.assign(N * S, -7);  // poisoned: every element must be written
  coef.assign(N * S, std::numeric_limits<float>::quiet_NaN());
  lasers::warp::Problem p{d.dt_pad.data(), d.gram_pad.data(), d.inv_pad.data(), x.data(), idx.data(), coef.data(),
                          N, d.Kp, d.M, tol, lasers::core::default_thresholds<float>()};
  HostWarp w;
  static lasers::warp::Exchange<V, S> ex;
  static lasers::warp::LaneState<KB, S, V> st[kLanes];
  for (int64_t n0 = 0; n0 < N; n0 += V) lasers::warp::code_group<KB, S, V>(w, p, ex, st, n0);
}

// Compares the two codes bit for bit; returns the number of differing rows (and reports the first).
int64_t compare(const char* label, const std::vector<int64_t>& ia, const std::vector<float>& ca,
                const std::vector<int64_t>& ib, const std::vector<float>& cb, int S) {
  const int64_t N = static_cast<int64_t>(ia.size()) / S;
  int64_t bad = 0;
  for (int64_t n = 0; n < N; ++n) {
    const bool same = std::memcmp(&ia[n * S], &ib[n * S], S * sizeof(int64_t)) == 0 &&
                      std::memcmp(&ca[n * S], &cb[n * S], S * sizeof(float)) == 0;
    if (!same && bad++ == 0) {
      std::printf("  %s: row %lld differs\n    cpu :", label, static_cast<long long>(n));
      for (int s = 0; s < S; ++s) std::printf(" %lld:%.9g", static_cast<long long>(ia[n * S + s]), ca[n * S + s]);
      std::printf("\n    warp:");
      for (int s = 0; s < S; ++s) std::printf(" %lld:%.9g", static_cast<long long>(ib[n * S + s]), cb[n * S + s]);
      std::printf("\n");
    }
  }
  return bad;
}

std::vector<float> gaussian(std::mt19937_64& rng, size_t n) {
  std::normal_distribution<float> g;
  std::vector<float> v(n);
  for (auto& e : v) e = g(rng);
  return v;
}

template <int KB, int S, int V = lasers::warp::vectors_per_warp<KB, S>()>
void expect_identical(const char* label, const std::vector<float>& dict, int K, int M, const std::vector<float>& x,
                      float tol = -1.0f) {
  const Prepared d(dict, K, M);
  check(d.Kp == KB * 128, "test set-up: padded K matches the instantiation");
  std::vector<int64_t> ia, ib;
  std::vector<float> ca, cb;
  cpu_codes(d, x, S, tol, ia, ca);
  warp_codes<KB, S, V>(d, x, tol, ib, cb);
  const int64_t bad = compare(label, ia, ca, ib, cb, S);
  bool valid = true;
  for (const int64_t i : ib) valid = valid && i >= -1 && i < K;
  std::printf("%-44s K=%-4d M=%-2d S=%d V=%d rows=%-8zu differing=%lld\n", label, K, M, S, V, x.size() / M,
              static_cast<long long>(bad));
  check(bad == 0, label);
  check(valid, "every index in [-1, K)");
}

void random_shapes(std::mt19937_64& rng, int64_t paper_rows) {
  {
    auto dict = gaussian(rng, 512 * 16);
    expect_identical<4, 5>("paper shape, random", dict, 512, 16, gaussian(rng, paper_rows * 16));
    expect_identical<4, 5, 1>("paper shape, one vector per warp", dict, 512, 16, gaussian(rng, 20000 * 16));
  }
  auto run = [&](auto kb, auto s, int K, int M, int64_t rows) {
    constexpr int KB = decltype(kb)::value, S = decltype(s)::value;
    auto dict = gaussian(rng, static_cast<size_t>(K) * M);
    char label[64];
    std::snprintf(label, sizeof label, "random K=%d M=%d S=%d", K, M, S);
    expect_identical<KB, S>(label, dict, K, M, gaussian(rng, rows * M));
  };
  using std::integral_constant;
  run(integral_constant<int, 1>{}, integral_constant<int, 1>{}, 128, 8, 20000);
  run(integral_constant<int, 1>{}, integral_constant<int, 8>{}, 64, 8, 20000);     // S = M, K padded 64 -> 128
  run(integral_constant<int, 2>{}, integral_constant<int, 3>{}, 200, 12, 20000);   // padded 200 -> 256
  run(integral_constant<int, 4>{}, integral_constant<int, 8>{}, 300, 32, 10000);   // padded 300 -> 512, M = 32
  run(integral_constant<int, 8>{}, integral_constant<int, 5>{}, 1024, 16, 5000);
  run(integral_constant<int, 8>{}, integral_constant<int, 8>{}, 1000, 24, 5000);   // rows re-read, not cached
  run(integral_constant<int, 2>{}, integral_constant<int, 5>{}, 256, 16, 20000);   // four vectors per warp
}

void degenerate(std::mt19937_64& rng) {
  constexpr int K = 48, M = 16;
  auto dict = gaussian(rng, K * M);
  for (int m = 0; m < M; ++m) {
    dict[3 * M + m] = 0;                       // zero atom
    dict[7 * M + m] = dict[5 * M + m];         // duplicate
    dict[9 * M + m] = -2 * dict[11 * M + m];   // sign-flipped parallel atom
    dict[13 * M + m] = -dict[14 * M + m];      // sign-flipped duplicate
  }
  std::vector<float> x = gaussian(rng, 4000 * M);
  const float inf = std::numeric_limits<float>::infinity();
  for (int m = 0; m < M; ++m) {
    x[0 * M + m] = 0;                                                // x = 0
    x[1 * M + m] = 3 * dict[5 * M + m];                              // exactly one (duplicated) atom
    x[2 * M + m] = dict[1 * M + m] - 2 * dict[20 * M + m] + 0.5f * dict[40 * M + m];  // exactly 3-sparse
    x[3 * M + m] = -dict[14 * M + m];                                // a sign-flipped duplicate's direction
    x[4 * M + m] = 1e-30f * x[4 * M + m];                            // tiny
    x[5 * M + m] = 1e19f * x[5 * M + m];                             // ||x||^2 would overflow unscaled
  }
  for (int n = 400; n < 800; ++n)  // extreme scales, both ways: the scaled codes must agree too
    for (int m = 0; m < M; ++m) x[n * M + m] *= n % 4 == 0 ? 1e-30f : n % 4 == 1 ? 3e30f : n % 4 == 2 ? 1e-40f : 1e37f;
  x[6 * M + 3] = std::numeric_limits<float>::quiet_NaN();  // NaN entry: all slots unused
  x[7 * M + 0] = inf;                                      // infinite entry: all slots unused
  for (int n = 8; n < 400; ++n)  // exact ties: x symmetric in two atoms
    for (int m = 0; m < M; ++m) x[n * M + m] = dict[(n % K) * M + m] + dict[((n + 1) % K) * M + m];
  expect_identical<1, 6>("degenerate atoms and vectors", dict, K, M, x);
  expect_identical<1, 1>("degenerate, S = 1", dict, K, M, x);
  for (const float tol : {0.0f, 0.5f, 4.0f, 1e9f}) {
    char label[64];
    std::snprintf(label, sizeof label, "tolerance %g", tol);
    expect_identical<1, 8>(label, dict, K, M, x, tol);
  }
  // every atom duplicated: ties everywhere, between atoms of different lanes and blocks
  std::vector<float> twins(256 * 8);
  auto half = gaussian(rng, 128 * 8);
  for (int k = 0; k < 128; ++k)
    for (int m = 0; m < 8; ++m) {
      twins[k * 8 + m] = half[k * 8 + m];
      twins[(k + 128) * 8 + m] = (k % 2 ? -1.0f : 1.0f) * half[k * 8 + m];
    }
  expect_identical<2, 8>("every atom duplicated or sign-flipped", twins, 256, 8, gaussian(rng, 20000 * 8));
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t paper_rows = argc > 1 ? std::atoll(argv[1]) : 1000000;
  std::mt19937_64 rng(20261126);
  random_shapes(rng, paper_rows);
  degenerate(rng);
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("the fast path's per-warp code equals host_encode bit for bit\n");
  return 0;
}
