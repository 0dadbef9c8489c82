// The blocked CPU Batch-OMP kernel: a tile of V vectors coded together, bit-identical to core::host_encode (the
// per-vector reference of omp_core.h) for every vector, whatever tile it lands in.
//
// Torch-free, so the native tests (csrc/tests/test_omp_tile.cpp) compare it with host_encode bit for bit. Every
// function is force-inlined: cpu/omp_cpu.cpp instantiates encode_tile once per x86 SIMD level, with that level's
// lane count W (values of T per register) and register count, inside a function compiled for that level.
//
// What blocking changes, and what it does not (the arithmetic contract of omp_core.h):
//   * alpha0 of the whole tile is one register-blocked micro-kernel over (V vectors x 2W atoms): each atom row of
//     atoms_t loaded from cache serves all V vectors. Per (vector, atom) it is still the fma chain over m ascending.
//   * the selection steps run step-major over the tile (step s of every vector, then step s + 1), first every
//     vector's atom (with a prefetch of the Gram entries its step reads), then every vector's Cholesky step and
//     correlation update: the latency-bound S x S work of one vector overlaps the K-wide work of another. Per vector
//     they are host_encode's steps with omp_core.h's own helpers, in its order (cholesky_append, forward_step,
//     back_solve, host_combine_rows with the fused max, host_first_abs_equal for the lowest index).
#pragma once

#include <cstdint>

#include "../omp_core.h"

namespace lasers {
namespace tile {

// The tile's shape for a SIMD level with W lanes of T and `regs` vector registers: V vectors x 2W atoms of
// accumulators (2V registers) plus two atom registers and a broadcast. V = 8 measured best with AVX-512 (4 and 16
// slower).
template <int W, int Regs>
struct Shape {
  static constexpr int V = Regs >= 32 ? 8 : 4;  // vectors per tile
  static constexpr int B = 2 * W;               // atoms per micro-kernel block
};

// alpha0[v][k] = sum_m x[v][m] * atoms_t[m][k] (fma chain over m ascending) for V vectors (x: V x M, row-major)
// and k in [k0, k0 + B): the register-blocked micro-kernel.
template <int V, int B, typename T>
LASERS_HOST_INLINE void alpha0_block(const T* atoms_t, int64_t K, int64_t M, const T* x, int64_t k0, T* alpha0,
                                     int64_t ld) {
  T acc[V][B];
  for (int v = 0; v < V; ++v)
#pragma omp simd
    for (int b = 0; b < B; ++b) acc[v][b] = T(0);
  for (int64_t m = 0; m < M; ++m) {
    const T* a = atoms_t + m * K + k0;
    for (int v = 0; v < V; ++v) {
      const T xv = x[v * M + m];
#pragma omp simd
      for (int b = 0; b < B; ++b) acc[v][b] = std::fma(xv, a[b], acc[v][b]);
    }
  }
  for (int v = 0; v < V; ++v)
#pragma omp simd
    for (int b = 0; b < B; ++b) alpha0[v * ld + k0 + b] = acc[v][b];
}

// Per-thread scratch of one tile: V vectors' alpha0 and alpha rows (K each), scaled x, and S x S state.
template <typename T>
struct TileScratch {
  T* x;         // V * M
  T* alpha0;    // V * K
  T* alpha;     // V * K
  T* L;         // V * S * S
  T* inv_diag;  // V * S
  T* y;         // V * S
  T* gamma;     // V * S
  T* neg_gamma;  // V * S
  const T** rows;  // S

  static int64_t values(int V, int64_t K, int64_t M, int64_t S) { return V * (M + 2 * K + S * S + 4 * S); }
  static int64_t pointers(int64_t S) { return S; }
  static TileScratch carve(T* p, const T** ptrs, int V, int64_t K, int64_t M, int64_t S) {
    TileScratch w;
    w.x = p;
    w.alpha0 = w.x + V * M;
    w.alpha = w.alpha0 + V * K;
    w.L = w.alpha + V * K;
    w.inv_diag = w.L + V * S * S;
    w.y = w.inv_diag + V * S;
    w.gamma = w.y + V * S;
    w.neg_gamma = w.gamma + V * S;
    w.rows = ptrs;
    return w;
  }
};

// Codes n <= V vectors xs (n x M) into idx, coef (n x S), each exactly as core::host_encode codes it.
template <typename T, int W, int Regs>
LASERS_HOST_INLINE void encode_tile(const core::HostProblem<T>& p, const T* xs, int n, const TileScratch<T>& w,
                                    int64_t* idx, T* coef) {
  using Sh = Shape<W, Regs>;
  constexpr int V = Sh::V;
  const int64_t K = p.K, M = p.M;
  const int S = p.S;
  // Per-vector state (host_encode's locals).
  int e[V], used[V];
  bool active[V];
  T xx[V], tol[V], zero_level[V], residual[V];
  T best[V];
  const T* alpha[V];

  for (int v = 0; v < V; ++v) {
    T* xv = w.x + v * M;
    e[v] = v < n ? core::scale_exponent(xs + v * M, M) : core::kNonFinite;
    active[v] = e[v] != core::kNonFinite;
    used[v] = 0;
    if (!active[v]) {  // a non-finite row (every slot unused) or padding: zeros keep the micro-kernel finite
      for (int64_t m = 0; m < M; ++m) xv[m] = T(0);
      continue;
    }
    const core::Pow2<T> down = core::pow2<T>(-e[v]);
    for (int64_t m = 0; m < M; ++m) xv[m] = xs[v * M + m] * down.first * down.second;
    xx[v] = core::squared_norm(xv, M);
    tol[v] = core::scaled_tol(p.tol, e[v]);
    zero_level[v] = p.th.corr_rel_sq * xx[v];
    residual[v] = xx[v];
  }

  // alpha0 of the tile, blocks of B atoms; the last partial block per vector and atom, in the same order.
  int64_t k0 = 0;
  for (; k0 + Sh::B <= K; k0 += Sh::B) alpha0_block<V, Sh::B>(p.atoms_t, K, M, w.x, k0, w.alpha0, K);
  for (int v = 0; v < V; ++v)
    for (int64_t k = k0; k < K; ++k) {
      T a = T(0);
      for (int64_t m = 0; m < M; ++m) a = std::fma(w.x[v * M + m], p.atoms_t[m * K + k], a);
      w.alpha0[v * K + k] = a;
    }
  for (int v = 0; v < V; ++v)
    if (active[v]) {
      alpha[v] = w.alpha0 + v * K;
      best[v] = core::host_abs_max(alpha[v], K);
    }

  // The selection steps, step-major over the tile: first every vector's atom j (and a prefetch of the Gram entries
  // its step reads), then every vector's Cholesky step and correlation update.
  int64_t sel[V];
  for (int s = 0; s < S; ++s) {
    for (int v = 0; v < n; ++v) {
      if (!active[v]) continue;
      const int64_t* iv = idx + v * S;
      active[v] = false;  // until this step goes through
      if (residual[v] <= tol[v] || best[v] * best[v] <= zero_level[v]) continue;
      int64_t j = core::host_first_abs_equal(alpha[v], K, best[v]);
      // Chosen atoms have |alpha| ~ 0 and win only when everything is at noise level; then mask them, look again.
      bool chosen = false;
      for (int t = 0; t < s; ++t) chosen = chosen || iv[t] == j;
      if (chosen) {
        T* a = w.alpha + v * K;  // s > 0 here, so alpha[v] is this row, not alpha0
        for (int t = 0; t < s; ++t) a[iv[t]] = T(0);
        best[v] = core::host_abs_max(a, K);
        if (best[v] * best[v] <= zero_level[v]) continue;
        j = core::host_first_abs_equal(a, K, best[v]);
      }
      sel[v] = j;
      active[v] = true;
      const T* gram_j = p.gram + j * K;
      __builtin_prefetch(gram_j + j);
      for (int t = 0; t < s; ++t) __builtin_prefetch(gram_j + iv[t]);
      const int64_t lines = K * int64_t(sizeof(T)) < 2048 ? K * int64_t(sizeof(T)) : 2048;
      for (int64_t b = 0; b < lines; b += 64) __builtin_prefetch(reinterpret_cast<const char*>(gram_j) + b);
    }
    for (int v = 0; v < n; ++v) {
      if (!active[v]) continue;
      int64_t* iv = idx + v * S;
      T* L = w.L + v * S * S;
      T* inv_diag = w.inv_diag + v * S;
      T* y = w.y + v * S;
      T* gamma = w.gamma + v * S;
      T* neg_gamma = w.neg_gamma + v * S;
      const T* alpha0_v = w.alpha0 + v * K;
      const int64_t j = sel[v];
      const T* gram_j = p.gram + j * K;
      active[v] = false;
      auto gram_tj = [&](int r) { return gram_j[iv[r]]; };
      if (!core::cholesky_append(L, S, s, gram_tj, gram_j[j], inv_diag, p.th.pivot_min)) continue;
      y[s] = core::forward_step(L, S, s, inv_diag, y, alpha0_v[j]);
      residual[v] = std::fma(-y[s], y[s], residual[v]);
      iv[s] = j;
      used[v] = s + 1;
      if (s + 1 == S) continue;
      core::back_solve(L, S, s + 1, inv_diag, y, gamma);
      for (int t = 0; t <= s; ++t) {
        w.rows[t] = p.gram + iv[t] * K;
        neg_gamma[t] = -gamma[t];
      }
      T* alpha_v = w.alpha + v * K;
      best[v] = core::host_combine_rows<T>(alpha_v, alpha0_v, w.rows, neg_gamma, s + 1, K);
      alpha[v] = alpha_v;
      active[v] = true;
    }
  }

  for (int v = 0; v < n; ++v) {
    int64_t* iv = idx + v * S;
    T* cv = coef + v * S;
    const int u = used[v];
    if (e[v] == core::kNonFinite) {
      for (int t = 0; t < S; ++t) {
        iv[t] = -1;
        cv[t] = T(0);
      }
      continue;
    }
    T* gamma = w.gamma + v * S;
    core::back_solve(w.L + v * S * S, S, u, w.inv_diag + v * S, w.y + v * S, gamma);
    const T up = core::pow2<T>(e[v]).first;
    for (int t = 0; t < u; ++t) cv[t] = gamma[t] * p.inv_norm[iv[t]] * up;
    for (int t = u; t < S; ++t) {
      iv[t] = -1;
      cv[t] = T(0);
    }
  }
}

}  // namespace tile
}  // namespace lasers
