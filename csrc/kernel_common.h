// What the CPU and CUDA kernels share around the per-vector algorithm: the checks that guard their memory accesses
// and the prepared dictionary (each kernel prepares it on its device in the order of omp_core.h).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <string>
#include <type_traits>

namespace lasers {

// Error messages are formatted here into one std::string (numbers by std::to_string) and handed to TORCH_CHECK as a
// single argument. On the GPU machine's torch 2.11 build, a TORCH_CHECK of this extension with integer arguments
// crashed the process (segmentation fault) where messages of strings alone were raised cleanly
// (bench/cuda_errors.py, 2026-11-26): give TORCH_CHECK strings only.
inline std::string message_part(const char* s) { return s; }
inline std::string message_part(const std::string& s) { return s; }
template <typename T, std::enable_if_t<std::is_arithmetic_v<T>, int> = 0>
std::string message_part(T v) {
  return std::to_string(v);
}
template <typename... Args>
std::string message(const Args&... args) {
  return (std::string() + ... + message_part(args));
}

// Users reach the kernels through lasers_ext.batch_omp, which checks arguments with messages; these checks guard the
// memory accesses for direct callers of torch.ops.lasers_ext.batch_omp. `backend` names the kernel in messages.
inline void check_kernel_arguments(const at::Tensor& x, const at::Tensor& dictionary, int64_t sparsity,
                                   const char* backend) {
  TORCH_CHECK(x.dim() == 2 && dictionary.dim() == 2, "batch_omp: x must be (N, M) and dictionary (K, M)");
  TORCH_CHECK(x.size(1) == dictionary.size(1), "batch_omp: x and dictionary disagree on M");
  TORCH_CHECK(x.scalar_type() == dictionary.scalar_type(), "batch_omp: x and dictionary dtypes differ");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              message("batch_omp: the ", backend, " kernel takes float32 or float64"));
  TORCH_CHECK(x.device() == dictionary.device(), "batch_omp: x and dictionary must be on one device");
  TORCH_CHECK(dictionary.size(0) >= 1 && dictionary.size(0) < (int64_t{1} << 31), "batch_omp: bad dictionary size");
  TORCH_CHECK(sparsity >= 1 && sparsity <= std::min(dictionary.size(0), dictionary.size(1)),
              "batch_omp: need 1 <= sparsity <= min(K, M)");
}

// The checks of the prepare_dictionary op: a (K, M) float32 or float64 matrix.
inline void check_dictionary(const at::Tensor& dictionary) {
  TORCH_CHECK(dictionary.dim() == 2 && dictionary.size(0) >= 1, "prepare_dictionary: dictionary must be (K, M)");
  TORCH_CHECK(dictionary.scalar_type() == at::kFloat || dictionary.scalar_type() == at::kDouble,
              "prepare_dictionary: the dictionary must be float32 or float64");
}

struct PreparedDictionary {
  at::Tensor atoms_t;   // (M, K) normalised atoms, transposed (alpha0 = sum_m x_m * atoms_t[m, :] runs over K)
  at::Tensor gram;      // (K, K) Gram matrix of the normalised atoms, row-major, symmetric (undefined where the CPU
                        // kernel codes in its Gram-free form)
  at::Tensor inv_norm;  // (K) 1 / ||atom_k|| (0 for zero atoms): converts coefficients back to the given atoms
};

}  // namespace lasers
