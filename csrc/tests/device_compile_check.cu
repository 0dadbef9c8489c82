// Compile-only check that the shared Batch-OMP pieces of omp_core.h are valid device code (CMake, LASERS_CUDA_CHECK).
#include "../omp_core.h"

__global__ void omp_core_device_check(float* L, float* y, float* gamma, const float* gram_row, int s, int ld) {
  auto gram_tj = [&](int r) { return gram_row[r]; };
  const auto th = lasers::core::default_thresholds<float>();
  if (lasers::core::cholesky_append(L, ld, s, gram_tj, 1.0f, th.pivot_min)) {
    y[s] = lasers::core::forward_step(L, ld, s, y, gram_row[s]);
    lasers::core::back_solve(L, ld, s + 1, y, gamma);
  }
}
