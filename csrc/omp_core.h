// Batch-OMP per latent vector (Rubinstein, Zibulevsky & Elad 2008; LASERS supplementary Algorithm 1).
//
// Torch-free on purpose: the C++ CPU kernel, the CUDA kernels and the standalone native tests (ctest) all include
// this header. The small S x S pieces (Cholesky append, triangular solves) are __host__ __device__ so every backend
// shares one definition of the numerics; the K-wide loops (correlation update, argmax) are written per backend
// (host_encode below; omp_warp.h for the CUDA fast path), all in the order of the contract below.
//
// Conventions shared by every backend (lasers_ext/ops.py documents them for users):
//   * Atoms are the rows of the dictionary, normalised to unit length before coding; a zero atom is never chosen.
//   * Selection: j = argmax_k |alpha_k| over atoms not yet chosen, lowest index on ties.
//   * A vector with a NaN or infinite entry gets every slot unused: no kernel reads or writes out of bounds on such a
//     row, and none invents a code for it.
//   * Scale invariance: each vector is coded as x * 2^-e, 2^e the power of two at or below its largest |x_m|, and its
//     coefficients are multiplied back by 2^e (tol by 2^-2e). Scaling by a power of two is exact, so the codes equal
//     those of the unscaled arithmetic wherever that did not overflow or underflow, and squared norms stay finite
//     for every finite x (float32 from 1e-38 to 3e38, float64 likewise). Atom norms are taken the same way.
//   * A vector stops early, leaving its remaining slots unused (index -1, coefficient 0), when
//       - its squared residual norm is <= tol (checked before every selection, including the first), or
//       - its residual is numerically zero: max_k alpha_k^2 <= eps * ||x||^2 (covers x = 0), or
//       - the selected atom is linearly dependent on those already chosen: the new Cholesky pivot
//         1 - w^T w falls below sqrt(eps) (eps = machine epsilon of the compute dtype).
//
// THE ARITHMETIC CONTRACT. Every compiled backend (the C++ CPU kernel with each of its SIMD clones, both CUDA kernels,
// the CPU-side model of the CUDA fast path in tests/) rounds exactly the same operations in exactly the same order,
// so they choose identical supports and identical coefficients on the same input. A faster kernel may change how the
// work is parallelised (which vectors or atoms run together), never the order of a sum:
//   * the scaled x_m = ldexp(x_m, -e), e = ilogb(max_m |x_m|) (0 for x = 0), computed as x_m * pow2(-e) (the
//     same rounding); everything below uses it;
//   * ||x||^2 = fma chain over m ascending, from 0:           xx = fma(x_m, x_m, xx)
//   * alpha0_k = fma chain over m ascending, from 0:          a = fma(x_m, atoms_t[m, k], a)
//   * alpha_k = alpha0_k then over the support in selection order t = 0, 1, ...:  a = fma(-gamma_t, G[I_t, k], a)
//   * argmax: the largest |alpha_k| (NaN never wins), lowest k on ties; an already chosen atom wins only when every
//     correlation is at rounding level, and then the search is repeated with the chosen atoms' alpha set to 0.
//   * the S x S steps below: fma chains in the loop order written here, and a multiplication by the stored
//     reciprocal 1 / L_rr of each pivot (IEEE division once per pivot, IEEE sqrt) instead of a division per use;
//   * ||r||^2 = ||x||^2, then residual = fma(-y_s, y_s, residual) per accepted atom;
//   * coefficient_t = (gamma_t * inv_norm[I_t]) * 2^e (pow2(e), a single exact factor: e <= the largest exponent).
// Every fused multiply-add is an explicit std::fma call. Nothing is left to the compiler's contraction: the host build
// uses -ffp-contract=off (so the CPU kernel's baseline clone, without hardware FMA, calls fma too) and nvcc -fmad=false.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LASERS_HD __host__ __device__ __forceinline__
#else
#define LASERS_HD inline
#endif

namespace lasers {
namespace core {

// Stopping thresholds for compute type T (see the conventions above).
template <typename T>
struct Thresholds {
  T pivot_min;    // smallest accepted squared Cholesky pivot (atoms have unit norm, so pivots lie in [0, 1])
  T corr_rel_sq;  // residual is zero once max alpha^2 <= corr_rel_sq * ||x||^2
};

template <typename T>
LASERS_HD Thresholds<T> default_thresholds() {
  const T eps = sizeof(T) == sizeof(float) ? T(FLT_EPSILON) : T(DBL_EPSILON);  // numeric_limits is host-only
  return Thresholds<T>{static_cast<T>(std::sqrt(eps)), eps};
}

// Appends atom j to the Cholesky factor L (row-major, leading dimension ld) of G_TT, T = support[0..s), whose pivots'
// reciprocals are inv_diag[0..s). Solves L[0:s,0:s] w = G[T, j] into row s of L and sets L[s][s] = sqrt(G_jj - w^T w)
// and inv_diag[s] = 1 / L[s][s]. Returns false (leaving row s unusable) when the pivot is below pivot_min: atom j
// depends linearly on T.
template <typename T, typename GramRow>
LASERS_HD bool cholesky_append(T* L, int ld, int s, GramRow gram_tj, T g_jj, T* inv_diag, T pivot_min) {
  T* w = L + s * ld;
  T ww = T(0);
  for (int r = 0; r < s; ++r) {
    T acc = gram_tj(r);
    for (int c = 0; c < r; ++c) acc = std::fma(-L[r * ld + c], w[c], acc);
    acc *= inv_diag[r];
    w[r] = acc;
    ww = std::fma(acc, acc, ww);
  }
  const T pivot = g_jj - ww;
  if (!(pivot >= pivot_min)) return false;
  const T diag = std::sqrt(pivot);
  w[s] = diag;
  inv_diag[s] = T(1) / diag;
  return true;
}

// One forward-substitution step of L y = alpha0_T: y[s] from the already known y[0..s).
template <typename T>
LASERS_HD T forward_step(const T* L, int ld, int s, const T* inv_diag, const T* y, T alpha0_j) {
  T acc = alpha0_j;
  for (int c = 0; c < s; ++c) acc = std::fma(-L[s * ld + c], y[c], acc);
  return acc * inv_diag[s];
}

// Back substitution L^T gamma = y for an n x n lower-triangular L.
template <typename T>
LASERS_HD void back_solve(const T* L, int ld, int n, const T* inv_diag, const T* y, T* gamma) {
  for (int r = n - 1; r >= 0; --r) {
    T acc = y[r];
    for (int c = r + 1; c < n; ++c) acc = std::fma(-L[c * ld + r], gamma[c], acc);
    gamma[r] = acc * inv_diag[r];
  }
}

// Squared norm of x (M) in the contract's order.
template <typename T>
LASERS_HD T squared_norm(const T* x, int64_t M) {
  T xx = T(0);
  for (int64_t m = 0; m < M; ++m) xx = std::fma(x[m], x[m], xx);
  return xx;
}

// The exponent e of the contract's per-vector scaling (2^e <= max_m |x_m| < 2^(e+1); 0 for x = 0), or
// kNonFinite when an entry is NaN or infinite.
constexpr int kNonFinite = 1 << 30;
template <typename T>
LASERS_HD int scale_exponent(const T* x, int64_t M) {
  T amax = T(0);
  bool finite = true;
  for (int64_t m = 0; m < M; ++m) {
    const T a = std::fabs(x[m]);
    finite = finite && a <= (sizeof(T) == sizeof(float) ? T(FLT_MAX) : T(DBL_MAX));  // NaN fails too
    amax = a > amax ? a : amax;
  }
  if (!finite) return kNonFinite;
  return amax > T(0) ? std::ilogb(amax) : 0;
}

// 2^k as at most two factors the dtype represents (k >= the smallest subnormal exponent): x * f.first * f.second
// rounds like ldexp(x, k), with multiplications instead of a libm call per element. second is 1 unless 2^k itself
// overflows (scaling a vector whose largest entry is subnormal), and then x * first is exact.
template <typename T>
struct Pow2 {
  T first, second;
};
template <typename T>
LASERS_HD Pow2<T> pow2(int k) {
  constexpr int max_exp = sizeof(T) == sizeof(float) ? 127 : 1023;
  if (k > max_exp) return Pow2<T>{std::ldexp(T(1), max_exp), std::ldexp(T(1), k - max_exp)};
  return Pow2<T>{std::ldexp(T(1), k), T(1)};
}

// tol of the scaled vector: ldexp(tol, -2e); a negative tol (disabled) stays negative.
template <typename T>
LASERS_HD T scaled_tol(T tol, int e) {
  return tol < T(0) ? tol : std::ldexp(tol, -2 * e);
}

// Dictionary preparation, identical on every device (cpu/omp_cpu.cpp on the CPU, a CUDA kernel on the GPU), so the
// CPU and CUDA kernels code against the very same numbers: float64 fma chains over m ascending, one rounding to T.
//   ||d_k|| = sqrt(sum_m d_km^2),  unit_km = T(d_km / ||d_k||),  inv_norm_k = T(1 / ||d_k||)  (0 for a zero atom),
//   G_ab = T(sum_m unit_am * unit_bm).
template <typename T>
LASERS_HD double atom_norm(const T* d_row, int64_t M) {
  double amax = 0.0;  // scaled by the power of two of the largest entry, so that no square over- or underflows
  for (int64_t m = 0; m < M; ++m) amax = std::fmax(amax, std::fabs(double(d_row[m])));
  if (!(amax > 0.0) || !(amax <= DBL_MAX)) return amax > 0.0 ? amax : 0.0;  // zero atom, or inf / NaN entries
  const int e = std::ilogb(amax);
  double nn = 0.0;
  for (int64_t m = 0; m < M; ++m) {
    const double d = std::ldexp(double(d_row[m]), -e);
    nn = std::fma(d, d, nn);
  }
  return std::ldexp(std::sqrt(nn), e);
}

// Atom k of the dictionary d (K, M): its unit column of ut (M, K) and inv_norm[k] (zeros for a zero atom).
template <typename T>
LASERS_HD void prepare_atom(const T* d, int64_t K, int64_t M, int64_t k, T* ut, T* inv_norm) {
  const double norm = atom_norm(d + k * M, M);
  inv_norm[k] = norm > 0 ? static_cast<T>(1.0 / norm) : T(0);
  for (int64_t m = 0; m < M; ++m) ut[m * K + k] = norm > 0 ? static_cast<T>(double(d[k * M + m]) / norm) : T(0);
}

// G_ab from the transposed unit atoms ut (M, K).
template <typename T>
LASERS_HD T gram_entry(const T* ut, int64_t K, int64_t M, int64_t a, int64_t b) {
  double g = 0.0;
  for (int64_t m = 0; m < M; ++m) g = std::fma(double(ut[m * K + a]), double(ut[m * K + b]), g);
  return static_cast<T>(g);
}

// Read-only data shared by all vectors of one call (host backends).
template <typename T>
struct HostProblem {
  const T* atoms_t;    // (M, K) normalised atoms, transposed, so alpha0 = sum_m x_m * atoms_t[m, :] runs over K
  const T* gram;       // (K, K) Gram matrix of the normalised atoms, row-major, symmetric
  const T* inv_norm;   // (K) 1 / ||atom_k|| (0 for zero atoms): converts coefficients back to the given atoms
  int64_t K, M;
  int S;
  T tol;               // stop once ||r||^2 <= tol; negative disables
  Thresholds<T> th;
};

// Per-thread scratch, allocated once per thread and reused for every vector.
template <typename T>
struct HostScratch {
  T* x;            // M: the scaled vector
  T* alpha0;       // K
  T* alpha;        // K
  T* L;            // S * S
  T* inv_diag;     // S
  T* y;            // S
  T* gamma;        // S
  T* neg_gamma;    // S
  const T** rows;  // max(M, S) row pointers

  static int64_t values(int64_t K, int64_t M, int64_t S) { return M + 2 * K + S * S + 4 * S; }
  static int64_t pointers(int64_t M, int64_t S) { return M > S ? M : S; }
  // Carves the scratch out of `values(K, M, S)` numbers and `pointers(M, S)` pointers.
  static HostScratch carve(T* v, const T** ptrs, int64_t K, int64_t M, int64_t S) {
    T* a = v + M;
    T* small = a + 2 * K + S * S;
    return HostScratch{v, a, a + K, a + 2 * K, small, small + S, small + 2 * S, small + 3 * S, ptrs};
  }
};

// K-wide host loops, written in the inner-loop-over-k form that compilers vectorise. They are force-inlined so that
// every SIMD clone of the CPU kernel (see cpu/omp_cpu.cpp) gets its own vector code.
#if defined(__GNUC__)
#define LASERS_HOST_INLINE inline __attribute__((always_inline))
#else
#define LASERS_HOST_INLINE inline
#endif

// out[k] = src[k] + sum_{r < R} c[r] * rows[r][k] in one pass (src may equal out); with Max, also returns
// max_k |out[k]|, so the pass that finishes alpha also finds its largest magnitude.
template <int R, bool Max, typename T>
LASERS_HOST_INLINE T host_axpy_rows(T* out, const T* src, const T* const* rows, const T* c, int64_t K) {
  const T* rr[R];
  T cc[R];
  for (int r = 0; r < R; ++r) {
    rr[r] = rows[r];
    cc[r] = c[r];
  }
  T best = T(0);
#pragma omp simd reduction(max : best)
  for (int64_t k = 0; k < K; ++k) {
    T acc = src[k];
    for (int r = 0; r < R; ++r) acc = std::fma(cc[r], rr[r][k], acc);
    out[k] = acc;
    if (Max) {
      const T v = std::fabs(acc);
      best = v > best ? v : best;
    }
  }
  return best;
}

// out[k] = base[k] + sum_{t < n} c[t] * rows[t][k] for n >= 1 (base null: 0), up to eight rows per pass over out.
// Returns max_k |out[k]|.
template <typename T>
LASERS_HOST_INLINE T host_combine_rows(T* out, const T* base, const T* const* rows, const T* c, int n, int64_t K) {
  if (base == nullptr) {
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) out[k] = T(0);
    base = out;
  }
  T best = T(0);
  for (int t = 0; t < n;) {
    const int r = n - t < 8 ? n - t : 8;
    const bool last = t + r == n;
    switch (r) {
#define LASERS_AXPY_CASE(R)                                                                  \
  case R:                                                                                    \
    best = last ? host_axpy_rows<R, true>(out, base, rows + t, c + t, K)                     \
                : host_axpy_rows<R, false>(out, base, rows + t, c + t, K);                   \
    break;
      LASERS_AXPY_CASE(1)
      LASERS_AXPY_CASE(2)
      LASERS_AXPY_CASE(3)
      LASERS_AXPY_CASE(4)
      LASERS_AXPY_CASE(5)
      LASERS_AXPY_CASE(6)
      LASERS_AXPY_CASE(7)
      LASERS_AXPY_CASE(8)
#undef LASERS_AXPY_CASE
    }
    base = out;
    t += r;
  }
  return best;
}

// max_k |a[k]| (0 for an all-zero a).
template <typename T>
LASERS_HOST_INLINE T host_abs_max(const T* __restrict__ a, int64_t K) {
  T best = T(0);
#pragma omp simd reduction(max : best)
  for (int64_t k = 0; k < K; ++k) {
    const T v = std::fabs(a[k]);
    best = v > best ? v : best;
  }
  return best;
}

// Lowest k with |a[k]| == v (v must occur): vectorised block test, then a scalar scan inside the block.
template <typename T>
LASERS_HOST_INLINE int64_t host_first_abs_equal(const T* __restrict__ a, int64_t K, T v) {
  constexpr int64_t B = 16;
  int64_t k = 0;
  for (; k + B <= K; k += B) {
    int hit = 0;
#pragma omp simd reduction(| : hit)
    for (int64_t l = 0; l < B; ++l) hit |= (std::fabs(a[k + l]) == v);
    if (hit) break;
  }
  while (std::fabs(a[k]) != v) ++k;
  return k;
}

// Codes one vector x (M) into idx (S, int64, -1 = unused) and coef (S, w.r.t. the given atoms).
// Returns the number of atoms used.
template <typename T>
LASERS_HOST_INLINE int host_encode(const HostProblem<T>& p, const T* x, const HostScratch<T>& w, int64_t* idx,
                                   T* coef) {
  const int64_t K = p.K;
  const int S = p.S;
  const int e = scale_exponent(x, p.M);
  if (e == kNonFinite) {  // every slot unused (see the conventions above)
    for (int t = 0; t < S; ++t) {
      idx[t] = -1;
      coef[t] = T(0);
    }
    return 0;
  }
  const Pow2<T> down = pow2<T>(-e);
  for (int64_t m = 0; m < p.M; ++m) w.x[m] = x[m] * down.first * down.second;
  const T xx = squared_norm(w.x, p.M);
  const T tol = scaled_tol(p.tol, e);
  // alpha0 = D_n x as a combination of the rows of atoms_t (M, K).
  for (int64_t m = 0; m < p.M; ++m) w.rows[m] = p.atoms_t + m * K;
  T best = host_combine_rows<T>(w.alpha0, nullptr, w.rows, w.x, static_cast<int>(p.M), K);  // max |alpha|
  const T zero_level = p.th.corr_rel_sq * xx;
  T residual = xx;  // ||r||^2 = ||x||^2 - ||y||^2 with L y = alpha0_T
  T* alpha = w.alpha0;
  int s = 0;
  for (; s < S; ++s) {
    if (residual <= tol || best * best <= zero_level) break;
    int64_t j = host_first_abs_equal(alpha, K, best);
    // Chosen atoms have |alpha| ~ 0 and win only when everything is at noise level; then mask them and look again.
    bool chosen = false;
    for (int t = 0; t < s; ++t) chosen = chosen || idx[t] == j;
    if (chosen) {
      for (int t = 0; t < s; ++t) alpha[idx[t]] = T(0);
      best = host_abs_max(alpha, K);
      if (best * best <= zero_level) break;
      j = host_first_abs_equal(alpha, K, best);
    }

    const T* gram_j = p.gram + j * K;
    auto gram_tj = [&](int r) { return gram_j[idx[r]]; };
    if (!cholesky_append(w.L, S, s, gram_tj, gram_j[j], w.inv_diag, p.th.pivot_min)) break;
    w.y[s] = forward_step(w.L, S, s, w.inv_diag, w.y, w.alpha0[j]);
    residual = std::fma(-w.y[s], w.y[s], residual);
    idx[s] = j;
    if (s + 1 == S) {
      ++s;
      break;
    }
    // alpha = alpha0 - G_T gamma (rows of the symmetric G are its columns), and its largest magnitude.
    back_solve(w.L, S, s + 1, w.inv_diag, w.y, w.gamma);
    for (int t = 0; t <= s; ++t) {
      w.rows[t] = p.gram + idx[t] * K;
      w.neg_gamma[t] = -w.gamma[t];
    }
    best = host_combine_rows<T>(w.alpha, w.alpha0, w.rows, w.neg_gamma, s + 1, K);
    alpha = w.alpha;
  }
  const int used = s;
  back_solve(w.L, S, used, w.inv_diag, w.y, w.gamma);
  const T up = pow2<T>(e).first;
  for (int t = 0; t < used; ++t) coef[t] = w.gamma[t] * p.inv_norm[idx[t]] * up;
  for (int t = used; t < S; ++t) {
    idx[t] = -1;
    coef[t] = T(0);
  }
  return used;
}

}  // namespace core
}  // namespace lasers
