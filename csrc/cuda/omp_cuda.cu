// CUDA Batch-OMP: placeholder translation unit until the hand-written kernels land (issue 4).
// It is compiled and linked by nvcc whenever the extension is built with CUDA, so the CUDA build path stays tested,
// and it registers the CUDA dispatch key so that a CUDA tensor gets a clear message instead of a missing-kernel error.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../omp_core.h"

namespace lasers {

std::tuple<at::Tensor, at::Tensor> batch_omp_cuda(const at::Tensor& x, const at::Tensor& dictionary,
                                                  int64_t sparsity, std::optional<double> tol) {
  TORCH_CHECK_NOT_IMPLEMENTED(false,
                              "lasers_ext.batch_omp: the CUDA kernel is not implemented yet; use "
                              "backend='reference' for CUDA tensors (pure PyTorch, runs on the GPU)");
  return {x, dictionary};
}

TORCH_LIBRARY_IMPL(lasers_ext, CUDA, m) { m.impl("batch_omp", &batch_omp_cuda); }

}  // namespace lasers
