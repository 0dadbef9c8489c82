// CUDA Batch-OMP fast path (float32, K <= 1024 padded to 128, 256, 512 or 1024 atoms, M <= 32, S <= 8): launches the
// kernel of omp_fast_kernel.cuh with the per-warp algorithm of omp_warp.h (registers for alpha0 and the chosen Gram
// rows, warp reductions for the argmax, the S x S steps of the V vectors on V lanes). It follows the arithmetic
// contract of omp_core.h, so its codes equal the CPU kernel's bit for bit; tests/test_omp_warp.cpp runs the same
// per-warp code on the host.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>

#include "../omp_warp.h"
#include "kernels.h"

namespace lasers {
namespace fast {
// Defined in omp_fast_launch.cuh; instantiated in omp_cuda_fast_k128.cu, _k256.cu, _k512.cu and _k1024.cu.
template <int KB>
void launch_fast_s(const warp::Problem& p, int S, int vectors_per_warp);
extern template void launch_fast_s<1>(const warp::Problem&, int, int);
extern template void launch_fast_s<2>(const warp::Problem&, int, int);
extern template void launch_fast_s<4>(const warp::Problem&, int, int);
extern template void launch_fast_s<8>(const warp::Problem&, int, int);
}  // namespace fast

int fast_padded_atoms(int64_t K, int64_t M, int64_t S, at::ScalarType dtype, int device) {
  if (dtype != at::kFloat || M > warp::kMaxM || S > warp::kMaxS) return 0;
  int kp = warp::kBlockAtoms;
  while (kp < K) kp *= 2;
  if (kp > warp::kMaxKB * warp::kBlockAtoms) return 0;
  // A block holds the (M, Kp) dictionary and its warps' exchange areas (a few KB): the GPU's shared memory must too.
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return M * kp * static_cast<int64_t>(sizeof(float)) + 16 * 1024 <= optin ? kp : 0;
}

void batch_omp_cuda_fast(const at::Tensor& x, const at::Tensor& atoms_t, const at::Tensor& gram,
                         const at::Tensor& inv_norm, int64_t sparsity, double tol, at::Tensor& indices,
                         at::Tensor& coeffs, int vectors_per_warp) {
  warp::Problem p;
  p.dt = atoms_t.const_data_ptr<float>();
  p.gram = gram.const_data_ptr<float>();
  p.inv_norm = inv_norm.const_data_ptr<float>();
  p.x = x.const_data_ptr<float>();
  p.idx = indices.mutable_data_ptr<int64_t>();
  p.coef = coeffs.mutable_data_ptr<float>();
  p.N = x.size(0);
  p.Kp = static_cast<int>(atoms_t.size(1));
  p.M = static_cast<int>(atoms_t.size(0));
  p.tol = static_cast<float>(tol);
  p.th = core::default_thresholds<float>();
  const int S = static_cast<int>(sparsity);
  switch (p.Kp / warp::kBlockAtoms) {
    case 1: return fast::launch_fast_s<1>(p, S, vectors_per_warp);
    case 2: return fast::launch_fast_s<2>(p, S, vectors_per_warp);
    case 4: return fast::launch_fast_s<4>(p, S, vectors_per_warp);
    case 8: return fast::launch_fast_s<8>(p, S, vectors_per_warp);
    default: TORCH_CHECK(false, message("batch_omp (CUDA fast path): padded K=", p.Kp, " is not 128, 256, 512 or 1024"));
  }
}

}  // namespace lasers
