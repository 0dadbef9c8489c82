"""pytest-benchmark suite for Batch-OMP at the paper's shape (K=512, M=16, S=5). Not part of the test suite:

    bash scripts/env.sh python -m pytest bench --benchmark-columns=mean,ops

Times the C++ kernel (blocked: csrc/cpu/omp_tile.h) at N = 1k, 64k and 1M, the float64 reference and scikit-learn on
the same data in one run. Vectors per second is
`ops` (calls/s) times the `vectors` recorded in each benchmark's extra_info (`--benchmark-json` keeps it). The slow
implementations get the first 2048 vectors only: their per-vector cost does not depend on N.
"""

import numpy as np
import pytest
import torch

import lasers_ext

K, M, S = 512, 16, 5
SLOW_N = 2048


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(K, M, generator=g)
    d = d / d.norm(dim=1, keepdim=True)
    return torch.randn(1 << 20, M, generator=g), d


@pytest.mark.parametrize("n", [1024, 65536, 1 << 20])
def test_cpu_kernel(benchmark, problem, n):
    x, d = problem
    benchmark.extra_info["vectors"] = n
    codes = benchmark(lasers_ext.batch_omp, x[:n], d, S, backend="cpu")
    assert codes.indices.shape == (n, S)


def test_reference(benchmark, problem):
    x, d = problem
    benchmark.extra_info["vectors"] = SLOW_N
    benchmark(lasers_ext.batch_omp, x[:SLOW_N], d, S, backend="reference")


def test_sklearn_orthogonal_mp_gram(benchmark, problem):
    from sklearn.linear_model import orthogonal_mp_gram

    x, d = problem
    gram, xy = (d @ d.T).numpy(), np.ascontiguousarray((x[:SLOW_N] @ d.T).numpy().T)
    benchmark.extra_info["vectors"] = SLOW_N
    benchmark(orthogonal_mp_gram, gram, xy, n_nonzero_coefs=S)
