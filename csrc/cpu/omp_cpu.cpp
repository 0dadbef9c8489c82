// CPU Batch-OMP kernel: the Gram matrix once per call, then at::parallel_for over vectors, each thread reusing one
// scratch buffer for all of its vectors. The per-vector algorithm lives in omp_core.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../omp_core.h"

namespace lasers {

namespace {

template <typename T>
void batch_omp_cpu_impl(const at::Tensor& x, const at::Tensor& atoms_t, const at::Tensor& gram,
                        const at::Tensor& inv_norm, int64_t sparsity, double tol, at::Tensor& indices,
                        at::Tensor& coeffs) {
  core::HostProblem<T> p;
  p.atoms_t = atoms_t.const_data_ptr<T>();
  p.gram = gram.const_data_ptr<T>();
  p.inv_norm = inv_norm.const_data_ptr<T>();
  p.K = atoms_t.size(1);
  p.M = atoms_t.size(0);
  p.S = static_cast<int>(sparsity);
  p.tol = static_cast<T>(tol);
  p.th = core::default_thresholds<T>();

  const T* xs = x.const_data_ptr<T>();
  int64_t* idx = indices.mutable_data_ptr<int64_t>();
  T* coef = coeffs.mutable_data_ptr<T>();
  const int64_t N = x.size(0);
  const int64_t M = p.M;
  const int64_t K = p.K;
  const int64_t S = sparsity;
  // Each chunk costs ~K*(M + S^2/2) flops per vector; aim for chunks of a few hundred vectors.
  const int64_t grain = 256;
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> buf(2 * K + S * S + 2 * S);
    core::HostScratch<T> w{buf.data(), buf.data() + K, buf.data() + 2 * K, buf.data() + 2 * K + S * S,
                           buf.data() + 2 * K + S * S + S};
    for (int64_t n = begin; n < end; ++n) {
      core::host_encode<T>(p, xs + n * M, w, idx + n * S, coef + n * S);
    }
  });
}

}  // namespace

// x (N, M) and dictionary (K, M), float32 or float64, same dtype, CPU. Returns indices (N, S) int64 and
// coeffs (N, S) in x's dtype. Argument checking with messages for users happens in lasers_ext/ops.py; the checks
// here guard the memory accesses for direct callers of torch.ops.lasers_ext.batch_omp.
std::tuple<at::Tensor, at::Tensor> batch_omp_cpu(const at::Tensor& x, const at::Tensor& dictionary, int64_t sparsity,
                                                 std::optional<double> tol) {
  TORCH_CHECK(x.dim() == 2 && dictionary.dim() == 2, "batch_omp: x must be (N, M) and dictionary (K, M)");
  TORCH_CHECK(x.size(1) == dictionary.size(1), "batch_omp: x and dictionary disagree on M");
  TORCH_CHECK(x.scalar_type() == dictionary.scalar_type(), "batch_omp: x and dictionary dtypes differ");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "batch_omp: the CPU kernel takes float32 or float64");
  TORCH_CHECK(x.device().is_cpu() && dictionary.device().is_cpu(), "batch_omp: expected CPU tensors");
  TORCH_CHECK(dictionary.size(0) >= 1, "batch_omp: empty dictionary");
  TORCH_CHECK(sparsity >= 1 && sparsity <= std::min(dictionary.size(0), dictionary.size(1)),
              "batch_omp: need 1 <= sparsity <= min(K, M)");

  const int64_t N = x.size(0);
  auto indices = at::empty({N, sparsity}, x.options().dtype(at::kLong));
  auto coeffs = at::empty({N, sparsity}, x.options());
  if (N == 0) return {indices, coeffs};

  const at::Tensor xc = x.contiguous();
  const at::Tensor norms = dictionary.norm(2, /*dim=*/1, /*keepdim=*/true);  // (K, 1)
  const at::Tensor nonzero = norms > 0;
  const at::Tensor inv_norm = at::where(nonzero, norms.reciprocal(), at::zeros_like(norms));
  const at::Tensor unit = dictionary * inv_norm;                            // (K, M), zero atoms stay zero
  const at::Tensor gram = at::mm(unit, unit.t()).contiguous();              // (K, K)
  const at::Tensor atoms_t = unit.t().contiguous();                         // (M, K)
  const at::Tensor inv_flat = inv_norm.reshape({-1}).contiguous();
  const double tol_value = tol.has_value() ? *tol : -1.0;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_omp_cpu", [&] {
    batch_omp_cpu_impl<scalar_t>(xc, atoms_t, gram, inv_flat, sparsity, tol_value, indices, coeffs);
  });
  return {indices, coeffs};
}

TORCH_LIBRARY_IMPL(lasers_ext, CPU, m) { m.impl("batch_omp", &batch_omp_cpu); }

}  // namespace lasers
