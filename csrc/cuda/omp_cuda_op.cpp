// The CUDA op: argument checks, the choice between the CUDA kernels and the calls into them (kernels.h). Host code
// only, compiled by the C++ compiler like the CPU kernel; every argument error is raised here, before any launch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>

#include "../kernel_common.h"
#include "kernels.h"

namespace lasers {

namespace {

// Which CUDA kernel codes a call: the environment variable LASERS_CUDA_KERNEL = auto (default: the fast path where
// it takes the shape, else the general kernel), general, or fast (an error where the fast path does not apply).
// LASERS_CUDA_FAST_V=1 selects the fast path's one-vector-per-warp build at the paper's shape (for measurements).
// Both kernels give the same codes; the variables exist to compare them.
enum class KernelChoice { kAuto, kGeneral, kFast };

KernelChoice kernel_choice() {
  const char* v = std::getenv("LASERS_CUDA_KERNEL");
  const std::string choice = v ? v : "auto";
  if (choice == "auto" || choice.empty()) return KernelChoice::kAuto;
  if (choice == "general") return KernelChoice::kGeneral;
  if (choice == "fast") return KernelChoice::kFast;
  TORCH_CHECK(false, message("LASERS_CUDA_KERNEL must be auto, general or fast, not '", choice, "'"));
  return KernelChoice::kAuto;
}

int fast_vectors_per_warp() {
  const char* v = std::getenv("LASERS_CUDA_FAST_V");
  return v && std::string(v) == "1" ? 1 : 0;
}

// The fast path's zero-padded copy of a prepared dictionary: Kp atoms, the extra ones zero (never chosen).
PreparedDictionary padded(const PreparedDictionary& d, int64_t Kp) {
  const int64_t extra = Kp - d.atoms_t.size(1);
  if (extra == 0) return d;
  return PreparedDictionary{at::constant_pad_nd(d.atoms_t, {0, extra}).contiguous(),
                            at::constant_pad_nd(d.gram, {0, extra, 0, extra}).contiguous(),
                            at::constant_pad_nd(d.inv_norm, {0, extra}).contiguous()};
}

}  // namespace

// x (N, M) and dictionary (K, M), float32 or float64, same dtype, same CUDA device. Returns indices (N, S) int64 and
// coeffs (N, S) in x's dtype. Nothing here synchronises with the host.
std::tuple<at::Tensor, at::Tensor> batch_omp_cuda(const at::Tensor& x, const at::Tensor& dictionary,
                                                  int64_t sparsity, std::optional<double> tol) {
  check_kernel_arguments(x, dictionary, sparsity, "CUDA");
  TORCH_CHECK(x.is_cuda(), "batch_omp: expected CUDA tensors");
  TORCH_CHECK(dictionary.size(0) <= 65535, message("batch_omp (CUDA): K=", dictionary.size(0),
                                                   " atoms is above the CUDA kernels' limit of 65535"));
  const KernelChoice choice = kernel_choice();
  const int Kp = fast_padded_atoms(dictionary.size(0), x.size(1), sparsity, x.scalar_type(), x.device().index());
  TORCH_CHECK(choice != KernelChoice::kFast || Kp > 0,
              message("batch_omp (CUDA): LASERS_CUDA_KERNEL=fast, but the fast path takes only float32 with ",
                      "K <= 1024, M <= 32, S <= 8 and an (M, K) dictionary that fits in shared memory (got ",
                      c10::toString(x.scalar_type()), ", K=", dictionary.size(0), ", M=", x.size(1), ", S=", sparsity,
                      ")"));
  const bool fast = Kp > 0 && choice != KernelChoice::kGeneral;
  const size_t per_vector = general_shared_bytes(dictionary.size(0), x.size(1), sparsity, x.scalar_type());
  TORCH_CHECK(fast || per_vector <= kGeneralSharedBudget,
              message("batch_omp (CUDA): K=", dictionary.size(0), ", M=", x.size(1), ", S=", sparsity, " need ",
                      per_vector, " bytes of shared memory per vector, more than the kernel's budget of ",
                      kGeneralSharedBudget, " (use backend='triton' or 'reference' for such shapes)"));

  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0);
  auto indices = at::empty({N, sparsity}, x.options().dtype(at::kLong));
  auto coeffs = at::empty({N, sparsity}, x.options());
  if (N == 0) return {indices, coeffs};

  const at::Tensor xc = x.contiguous();
  const PreparedDictionary d = prepare_dictionary_cuda(dictionary);
  const double tol_value = tol.has_value() ? *tol : -1.0;

  if (fast) {
    const PreparedDictionary p = padded(d, Kp);
    batch_omp_cuda_fast(xc, p.atoms_t, p.gram, p.inv_norm, sparsity, tol_value, indices, coeffs,
                        fast_vectors_per_warp());
    return {indices, coeffs};
  }
  batch_omp_cuda_general(xc, d, sparsity, tol_value, indices, coeffs);
  return {indices, coeffs};
}

// dictionary (K, M), float32 or float64, CUDA: (atoms_t, gram, inv_norm), the same numbers as on the CPU.
std::tuple<at::Tensor, at::Tensor, at::Tensor> prepare_dictionary_op_cuda(const at::Tensor& dictionary) {
  check_dictionary(dictionary);
  TORCH_CHECK(dictionary.size(0) <= 65535, message("prepare_dictionary (CUDA): K=", dictionary.size(0),
                                                   " atoms is above the CUDA kernels' limit of 65535"));
  const c10::cuda::CUDAGuard guard(dictionary.device());
  const PreparedDictionary d = prepare_dictionary_cuda(dictionary);
  return {d.atoms_t, d.gram, d.inv_norm};
}

TORCH_LIBRARY_IMPL(lasers_ext, CUDA, m) {
  m.impl("batch_omp", &batch_omp_cuda);
  m.impl("prepare_dictionary", &prepare_dictionary_op_cuda);
}

}  // namespace lasers
