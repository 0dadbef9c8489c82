// The CUDA fast path's kernel (torch-free, so the CMake build can compile it as a check): a persistent grid whose blocks
// stage the transposed dictionary in shared memory once, and whose warps code V vectors at a time with the per-warp
// algorithm of omp_warp.h. Launched by omp_cuda_fast.cu.
#pragma once

#include <cuda_runtime.h>

#include "../omp_warp.h"

namespace lasers {
namespace fast {

constexpr int kThreads = 128;  // 4 warps per block; the occupancy calculator picks blocks per SM
constexpr int kWarps = kThreads / warp::kLanes;

// The GPU executor of warp::code_group: one lane per thread.
struct DeviceWarp {
  static constexpr int kSlots = 1;
  int lane_id;
  __device__ __forceinline__ int lane(int) const { return lane_id; }
  __device__ __forceinline__ void sync() const { __syncwarp(); }
  __device__ __forceinline__ void load4(const float* ptr, float* out) const {
    const float4 v = *reinterpret_cast<const float4*>(ptr);
    out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
  }
  __device__ __forceinline__ void load4_global(const float* ptr, float* out) const {
    const float4 v = __ldg(reinterpret_cast<const float4*>(ptr));
    out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
  }
  // Largest magnitude (non-negative floats order like their bits) and the lowest atom index holding it.
  __device__ __forceinline__ void argmax(const float (&cand)[1], const int (&cand_k)[1], float& best, int& k) const {
    const unsigned bits = __float_as_uint(cand[0]);
#if __CUDA_ARCH__ >= 800
    const unsigned top = __reduce_max_sync(0xffffffffu, bits);
    k = static_cast<int>(__reduce_min_sync(0xffffffffu, bits == top ? static_cast<unsigned>(cand_k[0]) : ~0u));
#else
    unsigned top = bits, low = static_cast<unsigned>(cand_k[0]);
    for (int offset = warp::kLanes / 2; offset > 0; offset /= 2) top = max(top, __shfl_xor_sync(~0u, top, offset));
    low = bits == top ? low : ~0u;
    for (int offset = warp::kLanes / 2; offset > 0; offset /= 2) low = min(low, __shfl_xor_sync(~0u, low, offset));
    k = static_cast<int>(low);
#endif
    best = __uint_as_float(top);
  }
  // f(v) on lane v for v < V, between two warp barriers: the lanes' earlier reads of the exchange happen before f
  // writes it, and f's writes before any later read.
  template <int V, class F>
  __device__ __forceinline__ void per_vector(F&& f) const {
    __syncwarp();
    if (lane_id < V) f(lane_id);
    __syncwarp();
  }
};

template <int KB, int S, int V>
__global__ void __launch_bounds__(kThreads, 1) kernel(const warp::Problem p, const int64_t groups) {
  extern __shared__ __align__(16) unsigned char shared_raw[];
  constexpr int Kp = KB * warp::kBlockAtoms;
  float* dt = reinterpret_cast<float*>(shared_raw);
  const int dt_values = p.M * Kp;
  for (int e = 4 * threadIdx.x; e < dt_values; e += 4 * kThreads)
    *reinterpret_cast<float4*>(dt + e) = __ldg(reinterpret_cast<const float4*>(p.dt + e));
  __syncthreads();

  const int warp_id = threadIdx.x / warp::kLanes;
  auto* ex = reinterpret_cast<warp::Exchange<V, S>*>(dt + dt_values) + warp_id;
  warp::Problem q = p;
  q.dt = dt;
  DeviceWarp w{static_cast<int>(threadIdx.x % warp::kLanes)};
  warp::LaneState<KB, S, V> st[1];
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * kWarps + warp_id; g < groups;
       g += static_cast<int64_t>(gridDim.x) * kWarps)
    warp::code_group<KB, S, V>(w, q, *ex, st, g * V);
}

}  // namespace fast
}  // namespace lasers
