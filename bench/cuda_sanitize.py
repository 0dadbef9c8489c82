"""Runs both CUDA kernels once per shape of the test grid on small batches, for compute-sanitizer:

    compute-sanitizer --tool memcheck python bench/cuda_sanitize.py
    compute-sanitizer --tool racecheck python bench/cuda_sanitize.py
"""

import os

import torch

from lasers_ext import batch_omp

# general-kernel shapes, then the fast path's instantiation classes (K padded, rows cached or re-read, V = 1, 2, 4)
SHAPES = [(512, 16, 5), (64, 8, 1), (32, 8, 8), (1024, 64, 16), (8192, 16, 5), (256, 300, 32),
          (200, 12, 3), (300, 32, 8), (1000, 24, 8), (256, 16, 5)]

if __name__ == "__main__":
    g = torch.Generator().manual_seed(0)
    for kernel in ("general", "auto"):
        os.environ["LASERS_CUDA_KERNEL"] = kernel
        for k, m, s in SHAPES:
            for dtype in (torch.float32, torch.float64):
                d = torch.randn(k, m, generator=g, dtype=dtype)
                d[1] = 0  # a zero atom
                d[3] = d[2]  # a duplicate
                x = torch.randn(67, m, generator=g, dtype=dtype)  # a partial last block
                x[0] = 0
                x[1] = d[5] - d[7]  # exactly sparse
                codes = batch_omp(x.cuda(), d.cuda(), s, backend="cuda")
                torch.cuda.synchronize()
                assert torch.isfinite(codes.coeffs).all()
    print("sanitize run finished")
