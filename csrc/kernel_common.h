// What the CPU and CUDA kernels share around the per-vector algorithm: the checks that guard their memory accesses
// and the dictionary preparation (ATen ops, so it runs on the dictionary's device).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>

namespace lasers {

// Users reach the kernels through lasers_ext.batch_omp, which checks arguments with messages; these checks guard the
// memory accesses for direct callers of torch.ops.lasers_ext.batch_omp. `backend` names the kernel in messages.
inline void check_kernel_arguments(const at::Tensor& x, const at::Tensor& dictionary, int64_t sparsity,
                                   const char* backend) {
  TORCH_CHECK(x.dim() == 2 && dictionary.dim() == 2, "batch_omp: x must be (N, M) and dictionary (K, M)");
  TORCH_CHECK(x.size(1) == dictionary.size(1), "batch_omp: x and dictionary disagree on M");
  TORCH_CHECK(x.scalar_type() == dictionary.scalar_type(), "batch_omp: x and dictionary dtypes differ");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "batch_omp: the ", backend,
              " kernel takes float32 or float64");
  TORCH_CHECK(x.device() == dictionary.device(), "batch_omp: x and dictionary must be on one device");
  TORCH_CHECK(dictionary.size(0) >= 1 && dictionary.size(0) < (int64_t{1} << 31), "batch_omp: bad dictionary size");
  TORCH_CHECK(sparsity >= 1 && sparsity <= std::min(dictionary.size(0), dictionary.size(1)),
              "batch_omp: need 1 <= sparsity <= min(K, M)");
}

struct PreparedDictionary {
  at::Tensor atoms_t;   // (M, K) normalised atoms, transposed (alpha0 = sum_m x_m * atoms_t[m, :] runs over K)
  at::Tensor gram;      // (K, K) Gram matrix of the normalised atoms, row-major, symmetric
  at::Tensor inv_norm;  // (K) 1 / ||atom_k|| (0 for zero atoms): converts coefficients back to the given atoms
};

// dictionary (K, M), float32 or float64. The Gram matrix is accumulated in float64 and rounded to the dictionary's
// dtype, so every backend sees the same matrix whatever the BLAS (or TF32 settings) of the device.
inline PreparedDictionary prepare_dictionary(const at::Tensor& dictionary) {
  const at::Tensor norms = dictionary.norm(2, /*dim=*/1, /*keepdim=*/true);  // (K, 1)
  const at::Tensor nonzero = norms > 0;
  const at::Tensor inv_norm = at::where(nonzero, norms.reciprocal(), at::zeros_like(norms));
  const at::Tensor unit = at::where(nonzero, dictionary / norms, at::zeros_like(dictionary));  // (K, M)
  const at::Tensor unit64 = unit.to(at::kDouble);
  return PreparedDictionary{unit.t().contiguous(),
                            at::mm(unit64, unit64.t()).to(dictionary.scalar_type()).contiguous(),
                            inv_norm.reshape({-1}).contiguous()};
}

}  // namespace lasers
