// Entry points of the CUDA kernels, called by the CUDA op (omp_cuda_op.cpp): the dictionary preparation and the
// general kernel (omp_cuda.cu), and the fast path (omp_cuda_fast*.cu). They launch on the current stream and raise
// only on CUDA errors; the op checks arguments before calling them.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>

#include "../kernel_common.h"

namespace lasers {

// dictionary (K, M), float32 or float64, on a CUDA device (K <= 65535): the preparation of omp_core.h (atom_norm,
// gram_entry), the same numbers as the CPU kernel's.
PreparedDictionary prepare_dictionary_cuda(const at::Tensor& dictionary);

// Shared memory the general kernel needs per vector, and the most a block may use (opt-in above 48 KiB).
constexpr size_t kGeneralSharedBudget = 96 * 1024;
size_t general_shared_bytes(int64_t K, int64_t M, int64_t S, at::ScalarType dtype);

// The general kernel (every shape whose per-vector state fits kGeneralSharedBudget; float32 or float64): x (N, M)
// contiguous, d prepared, into indices (N, S) int64 and coeffs (N, S).
void batch_omp_cuda_general(const at::Tensor& x, const PreparedDictionary& d, int64_t sparsity, double tol,
                            at::Tensor& indices, at::Tensor& coeffs);

// Kp (128, 256, 512 or 1024) the fast path pads K atoms to, or 0 when it does not take this shape and dtype or the
// shared memory of GPU `device` cannot hold the (M, Kp) dictionary.
int fast_padded_atoms(int64_t K, int64_t M, int64_t S, at::ScalarType dtype, int device);

// Codes x (N, M) float32 with atoms_t (M, Kp), gram (Kp, Kp) and inv_norm (Kp), zero-padded to Kp atoms, into
// indices (N, S) int64 and coeffs (N, S) float32. vectors_per_warp = 1 selects the one-vector-per-warp build where
// one exists (the paper's shape); any other value the default.
void batch_omp_cuda_fast(const at::Tensor& x, const at::Tensor& atoms_t, const at::Tensor& gram,
                         const at::Tensor& inv_norm, int64_t sparsity, double tol, at::Tensor& indices,
                         at::Tensor& coeffs, int vectors_per_warp);

}  // namespace lasers
