// The CUDA fast path's kernels for K padded to 512 atoms (see omp_fast_launch.cuh).
#include "omp_fast_launch.cuh"

template void lasers::fast::launch_fast_s<4>(const lasers::warp::Problem&, int, int);
