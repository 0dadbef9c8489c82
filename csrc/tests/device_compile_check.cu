// Compile-only check (CMake, LASERS_CUDA_CHECK) that the shared Batch-OMP code is valid device code: the S x S helpers
// of omp_core.h and the CUDA fast path's kernel (omp_warp.h) at the paper's shape and at its largest shapes. Built
// with -Xptxas -warn-spills,-warn-lmem-usage,-Werror, so a register spill or a local-memory array fails the build.
#include "../cuda/omp_fast_kernel.cuh"
#include "../omp_core.h"

__global__ void omp_core_device_check(float* L, float* y, float* gamma, const float* gram_row, int s, int ld) {
  auto gram_tj = [&](int r) { return gram_row[r]; };
  const auto th = lasers::core::default_thresholds<float>();
  float inv_diag[8] = {};
  if (lasers::core::cholesky_append(L, ld, s, gram_tj, 1.0f, inv_diag, th.pivot_min)) {
    y[s] = lasers::core::forward_step(L, ld, s, inv_diag, y, gram_row[s]);
    lasers::core::back_solve(L, ld, s + 1, inv_diag, y, gamma);
  }
}

template __global__ void lasers::fast::kernel<4, 5, 2>(const lasers::warp::Problem, const int64_t);
template __global__ void lasers::fast::kernel<4, 5, 1>(const lasers::warp::Problem, const int64_t);
template __global__ void lasers::fast::kernel<8, 8, 1>(const lasers::warp::Problem, const int64_t);
template __global__ void lasers::fast::kernel<1, 8, 4>(const lasers::warp::Problem, const int64_t);
