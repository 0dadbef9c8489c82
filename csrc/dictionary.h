// Dictionary preparation shared by the CPU and CUDA kernels (ATen ops, so it runs on the dictionary's device).
#pragma once

#include <ATen/ATen.h>

namespace lasers {

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
