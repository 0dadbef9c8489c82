// Launchers of the CUDA fast path's kernel, one template per (KB, S); omp_cuda_fast_k*.cu instantiate them for one KB
// each, so the kernels compile in parallel (nvcc compiles one file's instantiations one after the other).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "../kernel_common.h"
#include "omp_fast_kernel.cuh"

namespace lasers {
namespace fast {

template <int KB, int S, int V>
void launch_fast(const warp::Problem& p) {
  const auto kernel = fast::kernel<KB, S, V>;
  const size_t shared = static_cast<size_t>(p.M) * p.Kp * sizeof(float) + kWarps * sizeof(warp::Exchange<V, S>);
  // Resident blocks of the whole GPU for this shared-memory size, computed once per device and M (a benign race:
  // concurrent first calls compute the same value).
  constexpr int kMaxDevices = 64;
  static int resident[kMaxDevices][warp::kMaxM + 1] = {};
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  TORCH_CHECK(device < kMaxDevices,
              message("batch_omp (CUDA fast path): device index ", device, " is above ", kMaxDevices));
  int& grid = resident[device][p.M];
  if (grid == 0) {
    if (shared > 48 * 1024)
      C10_CUDA_CHECK(
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared)));
    int sms = 0, per_sm = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, shared));
    TORCH_CHECK(per_sm > 0,
                message("batch_omp (CUDA fast path): no block fits on this GPU (", shared, " bytes of shared memory)"));
    grid = sms * per_sm;
  }
  const int64_t groups = (p.N + V - 1) / V;
  const int64_t wanted = (groups + kWarps - 1) / kWarps;
  const int blocks = static_cast<int>(std::min<int64_t>(wanted, grid));
  kernel<<<blocks, kThreads, shared, c10::cuda::getCurrentCUDAStream()>>>(p, groups);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int KB, int S>
void launch_fast_v(const warp::Problem& p, int vectors_per_warp) {
  constexpr int V = warp::vectors_per_warp<KB, S>();
  // The paper's shape also has a one-vector-per-warp build, for measuring what lockstep coding buys.
  if constexpr (KB == 4 && S == 5) {
    if (vectors_per_warp == 1) return launch_fast<KB, S, 1>(p);
  }
  (void)vectors_per_warp;
  launch_fast<KB, S, V>(p);
}

// Launches the fast kernel for K padded to 128 KB atoms and sparsity S (1..8).
template <int KB>
void launch_fast_s(const warp::Problem& p, int S, int vectors_per_warp) {
  switch (S) {
    case 1: return launch_fast_v<KB, 1>(p, vectors_per_warp);
    case 2: return launch_fast_v<KB, 2>(p, vectors_per_warp);
    case 3: return launch_fast_v<KB, 3>(p, vectors_per_warp);
    case 4: return launch_fast_v<KB, 4>(p, vectors_per_warp);
    case 5: return launch_fast_v<KB, 5>(p, vectors_per_warp);
    case 6: return launch_fast_v<KB, 6>(p, vectors_per_warp);
    case 7: return launch_fast_v<KB, 7>(p, vectors_per_warp);
    case 8: return launch_fast_v<KB, 8>(p, vectors_per_warp);
    default: TORCH_CHECK(false, message("batch_omp (CUDA fast path): S=", S, " is above ", warp::kMaxS));
  }
}

}  // namespace fast
}  // namespace lasers
