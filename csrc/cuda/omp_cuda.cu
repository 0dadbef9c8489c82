// CUDA Batch-OMP, general kernel: one warp per latent vector, one launch per call. It takes every shape and float64;
// float32 calls with K <= 1024, M <= 32 and S <= 8 go to the faster kernel of omp_cuda_fast.cu instead.
//
// Per-vector state lives on chip: the initial correlations alpha0 (K) and the signal (M) in the warp's slice of
// shared memory, the Cholesky factor L (S x S), y, gamma and the support beside them. The lanes split the K atoms
// (atom k belongs to lane k % 32): they compute alpha0 = D_n x, the updated correlations alpha = alpha0 - G_T gamma
// one Gram row per chosen atom (rows of the symmetric G are its columns, so reads are coalesced), and the argmax by
// a warp shuffle reduction with lowest-index tie-breaking. The S x S steps (Cholesky append, forward step, back
// solve) run on lane 0 with the __host__ __device__ helpers of omp_core.h, the very code the CPU kernel runs; the
// K-wide loops use the CPU kernel's accumulation order (fused multiply-adds over m, then over the support), so
// supports match the CPU kernel and coefficients agree to rounding. No N x K intermediate touches global memory;
// the dictionary (M x K) and the Gram matrix (K x K) are read through the L1/L2 caches. The dictionary is prepared on
// the GPU in the order of omp_core.h, so the CPU kernel and both CUDA kernels code against identical numbers.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "../kernel_common.h"
#include "../omp_core.h"
#include "kernels.h"

namespace lasers {

namespace {

constexpr int kWarp = 32;
constexpr int kMaxWarpsPerBlock = 8;

template <typename T>
struct DeviceProblem {
  const T* __restrict__ x;         // (N, M)
  const T* __restrict__ atoms_t;   // (M, K) normalised atoms, transposed
  const T* __restrict__ gram;      // (K, K) Gram matrix of the normalised atoms
  const T* __restrict__ inv_norm;  // (K) 1 / ||atom_k||, 0 for zero atoms
  int64_t* __restrict__ idx;       // (N, S) out
  T* __restrict__ coef;            // (N, S) out
  int64_t N;
  int K, M, S;
  T tol;
  core::Thresholds<T> th;
};

// Shared-memory slice of one warp, in units of T (support indices are stored as T-sized ints at the end).
template <typename T>
__host__ __device__ inline size_t warp_slice_values(int K, int M, int S) {
  const size_t values = static_cast<size_t>(K) + M + S * S + 3 * S;
  const size_t int_slots = (S * sizeof(int) + sizeof(T) - 1) / sizeof(T);
  return values + int_slots;
}

// Warp-wide argmax of (v, i): larger v wins, equal v -> lower i. Every lane gets the result.
template <typename T>
__device__ __forceinline__ void warp_argmax(T& v, int& i) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const T ov = __shfl_xor_sync(0xffffffffu, v, offset);
    const int oi = __shfl_xor_sync(0xffffffffu, i, offset);
    if (ov > v || (ov == v && oi < i)) {
      v = ov;
      i = oi;
    }
  }
}

__device__ __forceinline__ bool in_support(const int* support, int s, int k) {
  bool hit = false;
  for (int t = 0; t < s; ++t) hit |= support[t] == k;
  return hit;
}

template <typename T>
__global__ void batch_omp_kernel(const DeviceProblem<T> p) {
  extern __shared__ __align__(16) unsigned char shared_raw[];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int K = p.K, M = p.M, S = p.S;

  T* slice = reinterpret_cast<T*>(shared_raw) + warp * warp_slice_values<T>(K, M, S);
  T* alpha0 = slice;        // K
  T* xs = alpha0 + K;       // M
  T* L = xs + M;            // S * S
  T* inv_diag = L + S * S;  // S
  T* y = inv_diag + S;      // S
  T* gamma = y + S;         // S
  int* support = reinterpret_cast<int*>(gamma + S);  // S

  const int64_t n = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + warp;
  if (n >= p.N) return;  // whole warps leave together

  const T* x = p.x + n * M;
  for (int m = lane; m < M; m += kWarp) xs[m] = x[m];
  __syncwarp();
  // The contract's per-vector scaling by 2^-e (exact); a row with a NaN or infinite entry gets every slot unused.
  const int e = core::scale_exponent(xs, M);
  const bool finite = e != core::kNonFinite;
  __syncwarp();
  const core::Pow2<T> down = core::pow2<T>(finite ? -e : 0);
  for (int m = lane; m < M; m += kWarp) xs[m] = finite ? xs[m] * down.first * down.second : T(0);
  __syncwarp();
  const T tol = core::scaled_tol(p.tol, e);

  // ||x||^2 in the CPU kernel's order (every lane, same value); alpha0 and its largest magnitude.
  const T xx = core::squared_norm(xs, M);
  // Every lane starts from a valid atom at magnitude 0, so NaN correlations can never leave an index out of range.
  T best = T(0);
  int best_k = lane < K ? lane : 0;
  for (int k = lane; k < K; k += kWarp) {
    T acc = T(0);
    for (int m = 0; m < M; ++m) acc = fma(xs[m], p.atoms_t[static_cast<int64_t>(m) * K + k], acc);
    alpha0[k] = acc;
    const T mag = fabs(acc);
    if (mag > best) {
      best = mag;
      best_k = k;
    }
  }
  warp_argmax(best, best_k);

  const T zero_level = p.th.corr_rel_sq * xx;
  T residual = xx;  // ||r||^2 = ||x||^2 - ||y||^2, kept identical on every lane
  int s = 0;
  for (; finite && s < S; ++s) {
    if (residual <= tol || best * best <= zero_level) break;
    const int j = best_k;
    const T* gram_j = p.gram + static_cast<int64_t>(j) * K;
    int ok = 0;
    T y_s = T(0);
    __syncwarp();  // alpha0, support and gamma reads of all lanes happen before lane 0 writes
    if (lane == 0) {
      auto gram_tj = [&](int r) { return gram_j[support[r]]; };
      ok = core::cholesky_append(L, S, s, gram_tj, gram_j[j], inv_diag, p.th.pivot_min);
      if (ok) {
        y_s = core::forward_step(L, S, s, inv_diag, y, alpha0[j]);
        y[s] = y_s;
        support[s] = j;
        if (s + 1 < S) core::back_solve(L, S, s + 1, inv_diag, y, gamma);
      }
    }
    ok = __shfl_sync(0xffffffffu, ok, 0);
    if (!ok) break;
    y_s = __shfl_sync(0xffffffffu, y_s, 0);
    residual = fma(-y_s, y_s, residual);
    __syncwarp();
    if (s + 1 == S) {
      ++s;
      break;
    }
    // alpha = alpha0 - G_T gamma over the atoms not chosen yet, and its argmax.
    best = T(0);
    best_k = lane < K ? lane : 0;
    for (int k = lane; k < K; k += kWarp) {
      if (in_support(support, s + 1, k)) continue;
      T acc = alpha0[k];
      for (int t = 0; t <= s; ++t) acc = fma(-gamma[t], p.gram[static_cast<int64_t>(support[t]) * K + k], acc);
      const T mag = fabs(acc);
      if (mag > best) {
        best = mag;
        best_k = k;
      }
    }
    warp_argmax(best, best_k);  // s + 1 < S <= K: some atom is left
  }

  const int used = s;
  __syncwarp();
  if (lane == 0) core::back_solve(L, S, used, inv_diag, y, gamma);
  __syncwarp();
  for (int t = lane; t < S; t += kWarp) {
    const bool valid = t < used;
    p.idx[n * S + t] = valid ? support[t] : -1;
    p.coef[n * S + t] = valid ? gamma[t] * p.inv_norm[support[t]] * core::pow2<T>(e).first : T(0);
  }
}

// The preparation of omp_core.h (atom_norm, gram_entry) on the GPU: one thread per atom, then one per Gram entry.
template <typename T>
__global__ void prepare_atoms_kernel(const T* __restrict__ d, int64_t K, int64_t M, T* __restrict__ ut,
                                     T* __restrict__ inv_norm) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k < K) core::prepare_atom(d, K, M, k, ut, inv_norm);
}

template <typename T>
__global__ void gram_kernel(const T* __restrict__ ut, int64_t K, int64_t M, T* __restrict__ gram) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t a = blockIdx.y;
  if (b < K) gram[a * K + b] = core::gram_entry(ut, K, M, a, b);
}

template <typename T>
void launch(const at::Tensor& x, const at::Tensor& atoms_t, const at::Tensor& gram, const at::Tensor& inv_norm,
            int64_t sparsity, double tol, at::Tensor& indices, at::Tensor& coeffs) {
  DeviceProblem<T> p;
  p.x = x.const_data_ptr<T>();
  p.atoms_t = atoms_t.const_data_ptr<T>();
  p.gram = gram.const_data_ptr<T>();
  p.inv_norm = inv_norm.const_data_ptr<T>();
  p.idx = indices.mutable_data_ptr<int64_t>();
  p.coef = coeffs.mutable_data_ptr<T>();
  p.N = x.size(0);
  p.K = static_cast<int>(atoms_t.size(1));
  p.M = static_cast<int>(atoms_t.size(0));
  p.S = static_cast<int>(sparsity);
  p.tol = static_cast<T>(tol);
  p.th = core::default_thresholds<T>();

  const size_t per_warp = warp_slice_values<T>(p.K, p.M, p.S) * sizeof(T);  // <= the budget (checked by the op)
  const int warps = static_cast<int>(std::min<size_t>(kMaxWarpsPerBlock, kGeneralSharedBudget / per_warp));
  const size_t shared = per_warp * warps;
  if (shared > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(batch_omp_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(shared)));
  }
  const int64_t blocks = (p.N + warps - 1) / warps;
  TORCH_CHECK(blocks <= 0x7fffffff, message("batch_omp (CUDA): too many vectors in one call (", p.N, ")"));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  batch_omp_kernel<T><<<static_cast<unsigned>(blocks), warps * kWarp, shared, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

PreparedDictionary prepare_dictionary_cuda(const at::Tensor& dictionary) {
  const at::Tensor d = dictionary.contiguous();
  const int64_t K = d.size(0), M = d.size(1);
  PreparedDictionary out{at::empty({M, K}, d.options()), at::empty({K, K}, d.options()), at::empty({K}, d.options())};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  constexpr int threads = 256;
  AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "prepare_dictionary_cuda", [&] {
    const unsigned blocks = static_cast<unsigned>((K + threads - 1) / threads);
    prepare_atoms_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        d.const_data_ptr<scalar_t>(), K, M, out.atoms_t.mutable_data_ptr<scalar_t>(),
        out.inv_norm.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    gram_kernel<scalar_t><<<dim3(blocks, static_cast<unsigned>(K)), threads, 0, stream>>>(
        out.atoms_t.const_data_ptr<scalar_t>(), K, M, out.gram.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

size_t general_shared_bytes(int64_t K, int64_t M, int64_t S, at::ScalarType dtype) {
  return dtype == at::kDouble ? warp_slice_values<double>(K, M, S) * sizeof(double)
                              : warp_slice_values<float>(K, M, S) * sizeof(float);
}

void batch_omp_cuda_general(const at::Tensor& x, const PreparedDictionary& d, int64_t sparsity, double tol,
                            at::Tensor& indices, at::Tensor& coeffs) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_omp_cuda", [&] {
    launch<scalar_t>(x, d.atoms_t, d.gram, d.inv_norm, sparsity, tol, indices, coeffs);
  });
}

}  // namespace lasers
