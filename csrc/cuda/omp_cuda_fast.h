// Entry points of the CUDA fast path (omp_cuda_fast.cu), called by the CUDA op in omp_cuda.cu.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace lasers {

// Kp (128, 256, 512 or 1024) the fast path pads K atoms to, or 0 when it does not take this shape and dtype or the
// current GPU's shared memory cannot hold the (M, Kp) dictionary.
int fast_padded_atoms(int64_t K, int64_t M, int64_t S, at::ScalarType dtype);

// Codes x (N, M) float32 with atoms_t (M, Kp), gram (Kp, Kp) and inv_norm (Kp), zero-padded to Kp atoms, into
// indices (N, S) int64 and coeffs (N, S) float32. vectors_per_warp = 1 selects the one-vector-per-warp build where
// one exists (the paper's shape); any other value the default.
void batch_omp_cuda_fast(const at::Tensor& x, const at::Tensor& atoms_t, const at::Tensor& gram,
                         const at::Tensor& inv_norm, int64_t sparsity, double tol, at::Tensor& indices,
                         at::Tensor& coeffs, int vectors_per_warp);

}  // namespace lasers
