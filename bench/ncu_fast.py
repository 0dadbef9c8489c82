"""Codes 2^20 vectors at the paper's shape (K=512, M=16, S=5, float32) with the CUDA fast path, twice, for Nsight
Compute: ``bash bench/gpu_check.sh`` profiles the second launch of ``lasers::fast::kernel`` and divides its counters
by N (bench/gpu_summary.py)."""

import torch

from lasers_ext import batch_omp

N = 1 << 20

if __name__ == "__main__":
    g = torch.Generator().manual_seed(0)
    d = torch.randn(512, 16, generator=g).cuda()
    x = torch.randn(N, 16, generator=g).cuda()
    for _ in range(2):
        batch_omp(x, d, 5, backend="cuda")
    torch.cuda.synchronize()
    print(f"ncu driver: coded {N} vectors twice")
