// The CUDA fast path's per-warp algorithm, written once for two executors:
//   * the GPU (cuda/omp_cuda_fast.cu): one warp, each thread one lane, lanes combined by warp reductions;
//   * the host (tests/test_omp_warp.cpp): the same code with all 32 lanes simulated by one thread, so the fast path's
//     loop order, reductions and tie rules are checked bit for bit against host_encode without a GPU.
//
// Shape of the work (float32, K padded with zero atoms to Kp = 128 * KB, M <= 32, S <= 8):
//   * a warp codes V vectors in lockstep, so every atom it loads serves all V of them;
//   * lane l owns the atoms k = 128 i + 4 l + c (i < KB, c < 4): every dictionary or Gram access is a 16-byte load,
//     conflict-free in shared memory and coalesced in global memory, and a lane visits its atoms in ascending order;
//   * alpha0 (V x 4 KB per lane) stays in registers, and so do the Gram rows of the chosen atoms (V x (S-1) x 4 KB
//     per lane) where they fit (kCacheRows); otherwise the rows are re-read through L1/L2 at every step;
//     alpha = alpha0 - G_T gamma is recomputed at each step and never stored;
//   * the argmax is a lane scan with strict '>' (lowest own atom on ties), then a warp max of the magnitudes' bits
//     and a warp min of the indices that hold it: the lowest index on ties, as on the CPU;
//   * the S x S steps of the V vectors run on lanes 0..V-1 in parallel with the helpers of omp_core.h.
// Every operation follows the arithmetic contract of omp_core.h, so the codes equal host_encode's bit for bit.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "omp_core.h"

#if defined(__CUDACC__)
#define LASERS_UNROLL _Pragma("unroll")
#else
#define LASERS_UNROLL
#endif

namespace lasers {
namespace warp {

constexpr int kLanes = 32;
constexpr int kBlockAtoms = 128;  // atoms per lane-block: 32 lanes x 4
constexpr int kMaxKB = 8;         // K <= 1024
constexpr int kMaxM = 32;
constexpr int kMaxS = 8;

// Whether the chosen atoms' Gram rows stay in registers: alpha0 and S-1 rows, 4 KB floats each, within 160 registers
// for one vector (false only for K > 512 with S > 5).
template <int KB, int S>
constexpr bool cache_rows() {
  return 4 * KB * S <= 160;
}

// Vectors per warp: as many as keep the per-lane arrays within 160 registers. The paper's shape (K=512, S=5) gets 2.
template <int KB, int S>
constexpr int vectors_per_warp() {
  constexpr int per_vector = 4 * KB * (cache_rows<KB, S>() ? S : 3);
  return 4 * per_vector <= 160 ? 4 : (2 * per_vector <= 160 ? 2 : 1);
}

LASERS_HD int lane_atom(int lane, int a) { return kBlockAtoms * (a >> 2) + 4 * lane + (a & 3); }

// Everything a group of V vectors reads or writes; the pointers are global memory except dt (shared on the GPU).
struct Problem {
  const float* dt;        // (M, Kp) normalised atoms, transposed, zero-padded
  const float* gram;      // (Kp, Kp) Gram matrix of the normalised atoms, zero-padded
  const float* inv_norm;  // (Kp) 1 / ||atom_k||, 0 for zero and padding atoms
  const float* x;         // (N, M)
  int64_t* idx;           // (N, S) out
  float* coef;            // (N, S) out
  int64_t N;
  int Kp, M;
  float tol;
  core::Thresholds<float> th;
};

// Per-group state that the lanes exchange (shared memory on the GPU): the signals, and each vector's S x S state
// written by the lane that runs its S x S steps.
template <int V, int S>
struct Exchange {
  float xs[V][kMaxM];
  float L[V][S * S];
  float inv_diag[V][S];
  float y[V][S];
  float gamma[V][S];
  int support[V][S];
  int ok[V];
};

// Registers of one lane.
template <int KB, int S, int V>
struct LaneState {
  static constexpr int A = 4 * KB;
  static constexpr int R = S > 1 ? S - 1 : 1;
  static constexpr bool kCacheRows = cache_rows<KB, S>();
  float alpha0[V][A];
  float rows[V][kCacheRows ? R : 1][A];  // rows[v][t] = this lane's atoms of the Gram row of vector v's t-th atom
  const float* row_ptr[V][R];            // the Gram rows themselves (read at every step without kCacheRows)
  float best[V];
  int best_k[V];
};

// v-th element of a small register array with a compile-time index (a dynamic index would put it in local memory).
template <int V, typename T>
LASERS_HD T pick(const T (&a)[V], int v) {
  T out = a[0];
LASERS_UNROLL
  for (int u = 1; u < V; ++u) out = u == v ? a[u] : out;
  return out;
}

// alpha0 for this lane's atoms of V vectors: fma chains over m ascending (the contract).
template <int KB, int S, int V, class W>
LASERS_HD void lane_alpha0(const W& w, const Problem& p, const Exchange<V, S>& ex, int lane,
                           LaneState<KB, S, V>& st) {
LASERS_UNROLL
  for (int v = 0; v < V; ++v)
LASERS_UNROLL
    for (int a = 0; a < 4 * KB; ++a) st.alpha0[v][a] = 0.0f;
  for (int m = 0; m < p.M; ++m) {
    float xm[V];
LASERS_UNROLL
    for (int v = 0; v < V; ++v) xm[v] = ex.xs[v][m];
LASERS_UNROLL
    for (int i = 0; i < KB; ++i) {
      float d[4];
      w.load4(p.dt + static_cast<int64_t>(m) * p.Kp + kBlockAtoms * i + 4 * lane, d);
LASERS_UNROLL
      for (int v = 0; v < V; ++v)
LASERS_UNROLL
        for (int c = 0; c < 4; ++c) st.alpha0[v][4 * i + c] = std::fma(xm[v], d[c], st.alpha0[v][4 * i + c]);
    }
  }
}

// This lane's best candidate for vector v: alpha = alpha0 + sum_{t < n_rows} neg_gamma[t] * rows[t] (fma over t
// ascending), largest |alpha| with strict '>' over ascending atoms. With `masked`, the first n_mask atoms of `support`
// count as 0 (the search that follows a chosen atom winning).
template <int KB, int S, int V, class W>
LASERS_HD void lane_scan(const W& w, LaneState<KB, S, V>& st, int v, const float* neg_gamma, int n_rows,
                         const int* support, int n_mask, int lane) {
  using State = LaneState<KB, S, V>;
  constexpr int R = State::R;
  float ng[R];
LASERS_UNROLL
  for (int t = 0; t < R; ++t) ng[t] = t < n_rows ? neg_gamma[t] : 0.0f;
  float best = 0.0f;
  int best_k = lane_atom(lane, 0);
LASERS_UNROLL
  for (int i = 0; i < KB; ++i) {
    float g[State::kCacheRows ? 1 : R][4];  // this block's row values when they are not cached
    if constexpr (!State::kCacheRows) {
LASERS_UNROLL
      for (int t = 0; t < R; ++t)
        if (t < n_rows) w.load4_global(st.row_ptr[v][t] + kBlockAtoms * i + 4 * lane, g[t]);
    }
LASERS_UNROLL
    for (int c = 0; c < 4; ++c) {
      const int a = 4 * i + c;
      float acc = st.alpha0[v][a];
LASERS_UNROLL
      for (int t = 0; t < R; ++t) {
        if (t < n_rows) {
          if constexpr (State::kCacheRows)
            acc = std::fma(ng[t], st.rows[v][t][a], acc);
          else
            acc = std::fma(ng[t], g[t][c], acc);
        }
      }
      float mag = std::fabs(acc);
      const int k = lane_atom(lane, a);
      for (int t = 0; t < n_mask; ++t) mag = support[t] == k ? 0.0f : mag;
      if (mag > best) {  // NaN never wins
        best = mag;
        best_k = k;
      }
    }
  }
  st.best[v] = best;
  st.best_k[v] = best_k;
}

// Codes the vectors n0 .. n0 + V - 1 (those < N) with the executor w. W provides:
//   kSlots (lanes held by one thread), lane(slot), sync(), load4(ptr, out[4]) and load4_global(ptr, out[4])
//   (16-byte aligned; the latter for read-only global memory),
//   argmax(best[kSlots], k[kSlots], &best, &k) (warp max of the bits, min index among the maxima),
//   per_vector<V>(f) (f(v) for each v < V, on lane v on the GPU; then sync()).
template <int KB, int S, int V, class W>
LASERS_HD void code_group(W& w, const Problem& p, Exchange<V, S>& ex, LaneState<KB, S, V> (&st)[W::kSlots],
                          int64_t n0) {
  constexpr int R = LaneState<KB, S, V>::R;
  const int M = p.M;
  for (int slot = 0; slot < W::kSlots; ++slot) {
    for (int e = w.lane(slot); e < V * M; e += kLanes) {
      const int v = e / M;
      ex.xs[v][e - v * M] = n0 + v < p.N ? p.x[n0 * M + e] : 0.0f;
    }
  }
  w.sync();
  // The contract's per-vector scaling by 2^-e (exact); a row with a NaN or infinite entry gets every slot unused.
  int exponent[V];
LASERS_UNROLL
  for (int v = 0; v < V; ++v) exponent[v] = core::scale_exponent(ex.xs[v], M);
  w.sync();  // every lane has read the raw signals before they are rescaled in place
  for (int slot = 0; slot < W::kSlots; ++slot) {
    for (int e = w.lane(slot); e < V * M; e += kLanes) {
      const int v = e / M;
      const int ev = pick(exponent, v);
      const core::Pow2<float> down = core::pow2<float>(ev == core::kNonFinite ? 0 : -ev);
      float& xm = ex.xs[v][e - v * M];
      xm = ev == core::kNonFinite ? 0.0f : xm * down.first * down.second;
    }
  }
  w.sync();

  float zero_level[V], residual[V], tol[V], best[V], neg_gamma[V][R];
  int j[V], used[V];
  bool live[V];
LASERS_UNROLL
  for (int v = 0; v < V; ++v) {
    const float xx = core::squared_norm(ex.xs[v], M);
    zero_level[v] = p.th.corr_rel_sq * xx;
    residual[v] = xx;
    tol[v] = core::scaled_tol(p.tol, exponent[v]);
    live[v] = n0 + v < p.N && exponent[v] != core::kNonFinite;
    used[v] = 0;
LASERS_UNROLL
    for (int t = 0; t < R; ++t) neg_gamma[v][t] = 0.0f;
  }

  // Warp argmax of every vector's lane candidates.
  auto combine = [&]() {
LASERS_UNROLL
    for (int v = 0; v < V; ++v) {
      float cb[W::kSlots];
      int ck[W::kSlots];
      for (int slot = 0; slot < W::kSlots; ++slot) {
        cb[slot] = st[slot].best[v];
        ck[slot] = st[slot].best_k[v];
      }
      w.argmax(cb, ck, best[v], j[v]);
    }
  };

  for (int slot = 0; slot < W::kSlots; ++slot) lane_alpha0<KB, S, V>(w, p, ex, w.lane(slot), st[slot]);
  for (int slot = 0; slot < W::kSlots; ++slot)
LASERS_UNROLL
    for (int v = 0; v < V; ++v) lane_scan<KB, S, V>(w, st[slot], v, neg_gamma[v], 0, nullptr, 0, w.lane(slot));
  combine();

LASERS_UNROLL
  for (int s = 0; s < S; ++s) {
    // Stopping rules, then the rare case of an already chosen atom winning (every correlation at rounding level).
    bool any_chosen = false, any_live = false;
    bool chosen[V];
LASERS_UNROLL
    for (int v = 0; v < V; ++v) {
      if (live[v] && (residual[v] <= tol[v] || best[v] * best[v] <= zero_level[v])) live[v] = false;
      chosen[v] = false;
      if (live[v])
        for (int t = 0; t < s; ++t) chosen[v] = chosen[v] || ex.support[v][t] == j[v];
      any_chosen = any_chosen || chosen[v];
    }
    if (any_chosen) {
      for (int slot = 0; slot < W::kSlots; ++slot)
LASERS_UNROLL
        for (int v = 0; v < V; ++v)
          lane_scan<KB, S, V>(w, st[slot], v, neg_gamma[v], s, ex.support[v], s, w.lane(slot));
      float unmasked_best[V];
      int unmasked_j[V];
LASERS_UNROLL
      for (int v = 0; v < V; ++v) {
        unmasked_best[v] = best[v];
        unmasked_j[v] = j[v];
      }
      combine();
LASERS_UNROLL
      for (int v = 0; v < V; ++v) {
        if (!chosen[v]) {  // the others keep their unmasked result
          best[v] = unmasked_best[v];
          j[v] = unmasked_j[v];
        } else if (best[v] * best[v] <= zero_level[v]) {
          live[v] = false;
        }
      }
    }
LASERS_UNROLL
    for (int v = 0; v < V; ++v) any_live = any_live || live[v];
    if (!any_live) break;

    // The new atoms' Gram rows, loaded now so that their latency overlaps the S x S steps (unused if a vector stops).
    if (s + 1 < S) {
LASERS_UNROLL
      for (int v = 0; v < V; ++v) {
        const float* row = p.gram + static_cast<int64_t>(j[v]) * p.Kp;
        for (int slot = 0; slot < W::kSlots; ++slot) {
          st[slot].row_ptr[v][s < R ? s : 0] = row;
          if constexpr (LaneState<KB, S, V>::kCacheRows) {
LASERS_UNROLL
            for (int i = 0; i < KB; ++i)
              w.load4_global(row + kBlockAtoms * i + 4 * w.lane(slot), &st[slot].rows[v][s < R ? s : 0][4 * i]);
          }
        }
      }
    }

    // S x S steps: vector v on lane v.
    w.template per_vector<V>([&](int v) {
      ex.ok[v] = 0;
      if (!pick(live, v)) return;
      const int jv = pick(j, v);
      const int* support = ex.support[v];
      // G[I_r, j] from the rows of the chosen atoms, which this warp has just read (likely L1 hits), rather than from
      // row j; the same numbers, as G is exactly symmetric (omp_core.h's gram_entry).
      auto gram_tj = [&](int r) { return p.gram[static_cast<int64_t>(support[r]) * p.Kp + jv]; };
      const float g_jj = p.gram[static_cast<int64_t>(jv) * p.Kp + jv];
      if (!core::cholesky_append(ex.L[v], S, s, gram_tj, g_jj, ex.inv_diag[v], p.th.pivot_min)) return;
      float alpha0_j = 0.0f;  // recomputed in alpha0's own fma chain (bit-identical), not fetched from its lane
      for (int m = 0; m < M; ++m) alpha0_j = std::fma(ex.xs[v][m], p.dt[static_cast<int64_t>(m) * p.Kp + jv], alpha0_j);
      ex.y[v][s] = core::forward_step(ex.L[v], S, s, ex.inv_diag[v], ex.y[v], alpha0_j);
      ex.support[v][s] = jv;
      if (s + 1 < S) core::back_solve(ex.L[v], S, s + 1, ex.inv_diag[v], ex.y[v], ex.gamma[v]);
      ex.ok[v] = 1;
    });
    any_live = false;
LASERS_UNROLL
    for (int v = 0; v < V; ++v) {
      if (!live[v]) continue;
      if (!ex.ok[v]) {
        live[v] = false;
        continue;
      }
      const float y_s = ex.y[v][s];
      residual[v] = std::fma(-y_s, y_s, residual[v]);
      used[v] = s + 1;
      any_live = true;
    }
    if (s + 1 == S || !any_live) break;

    // alpha = alpha0 - G_T gamma with the new atom's Gram row, and the next argmax.
LASERS_UNROLL
    for (int v = 0; v < V; ++v)
LASERS_UNROLL
      for (int t = 0; t < R; ++t) neg_gamma[v][t] = live[v] && t <= s ? -ex.gamma[v][t] : 0.0f;
    for (int slot = 0; slot < W::kSlots; ++slot)
LASERS_UNROLL
      for (int v = 0; v < V; ++v)
        lane_scan<KB, S, V>(w, st[slot], v, neg_gamma[v], s + 1, nullptr, 0, w.lane(slot));
    combine();
  }

  w.template per_vector<V>([&](int v) {
    const int64_t n = n0 + v;
    if (n >= p.N) return;
    const int u = pick(used, v);
    const int ev = pick(exponent, v);
    const float up = core::pow2<float>(ev == core::kNonFinite ? 0 : ev).first;
    core::back_solve(ex.L[v], S, u, ex.inv_diag[v], ex.y[v], ex.gamma[v]);
    for (int t = 0; t < S; ++t) {
      const bool valid = t < u;
      p.idx[n * S + t] = valid ? ex.support[v][t] : -1;
      p.coef[n * S + t] = valid ? ex.gamma[v][t] * p.inv_norm[ex.support[v][t]] * up : 0.0f;
    }
  });
}

}  // namespace warp
}  // namespace lasers
