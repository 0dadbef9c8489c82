// The CUDA fast path's kernels for K padded to 1024 atoms (see omp_fast_launch.cuh).
#include "omp_fast_launch.cuh"

template void lasers::fast::launch_fast_s<8>(const lasers::warp::Problem&, int, int);
