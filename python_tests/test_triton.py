"""Triton backend: the same codes as the C++ kernel. On a GPU machine the compiled kernel runs on CUDA tensors;
without one, Triton's interpreter runs it on CPU tensors (TRITON_INTERPRET=1, set in conftest.py)."""

import os

import pytest
import torch
from conftest import assert_matches_reference, random_problem, share_matching_cpu_kernel

import lasers_ext
from lasers_ext import backends, batch_omp

needs_triton = pytest.mark.skipif(not backends.HAS_TRITON, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def triton_codes(x, d, s, tol=None):
    codes = batch_omp(x.to(DEVICE), d.to(DEVICE), s, tol=tol, backend="triton")
    return lasers_ext.SparseCodes(codes.indices.cpu(), codes.coeffs.cpu())


def test_triton_present_where_expected():
    if os.environ.get("LASERS_EXPECT_TRITON") == "1":  # set by .ci/run
        assert backends.HAS_TRITON, "CI expects triton (it comes with the CUDA build of torch)"


def assert_same_as_cpu_kernel(x, d, s, tol=None):
    codes = triton_codes(x, d, s, tol)
    assert_matches_reference(codes, x, d, s, tol)  # oracle: the float64 reference, tie-aware
    assert share_matching_cpu_kernel(codes, x, d, s, tol) > 0.99
    return codes


@needs_triton
@pytest.mark.parametrize(
    "n,m,k,s,tol",
    [(256, 16, 512, 5, None),  # the paper's shape
     (130, 8, 20, 8, None),  # S = M, rows across two programs
     (64, 12, 40, 3, 2.0),  # early stop by tol
     (50, 4, 7, 1, None)],  # S = 1, K not a power of two
)
def test_matches_cpu_kernel(gen, n, m, k, s, tol):
    x, d = random_problem(gen, n, m, k, normalise=False)
    assert_same_as_cpu_kernel(x, d, s, tol)


@needs_triton
def test_float64(gen):
    x, d = random_problem(gen, 40, 8, 30, torch.float64)
    assert_same_as_cpu_kernel(x, d, 4)


@needs_triton
def test_degenerate_inputs(gen):
    x, d = random_problem(gen, 60, 6, 12)
    d = torch.cat([d, d[:3], torch.zeros(2, 6)])  # duplicate and zero atoms
    x[::5] = 0  # zero vectors
    codes = assert_same_as_cpu_kernel(x, d, 6)
    assert (codes.indices[::5] == -1).all()
    chosen = codes.indices[codes.indices >= 0]
    assert not ((chosen == 15) | (chosen == 16)).any()  # zero atoms never chosen
    assert torch.isfinite(codes.coeffs).all()


@needs_triton
def test_half_input_and_autograd(gen):
    x, d = random_problem(gen, 20, 8, 16, torch.bfloat16)
    codes = triton_codes(x, d, 3)
    assert codes.coeffs.dtype == torch.bfloat16
    # the op carries the shared least-squares autograd formula (gradchecked with the CPU kernel in test_ops_api.py)
    x, d = random_problem(gen, 8, 6, 10, torch.float64, normalise=False)
    w = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    grads = []
    for backend in ("triton", "cpu"):
        device = DEVICE if backend == "triton" else "cpu"
        xr, dr = x.to(device).requires_grad_(), d.to(device).requires_grad_()
        coeffs = batch_omp(xr, dr, 3, backend=backend).coeffs.cpu()
        grads.append([g.cpu() for g in torch.autograd.grad((coeffs * w).sum(), (xr, dr))])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@needs_triton
def test_opcheck(gen):
    x, d = (t.to(DEVICE) for t in random_problem(gen, 12, 8, 20, torch.float32))
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.lasers_ext.batch_omp_triton.default, (x, d, 3, None), test_utils=utils)


@needs_triton
def test_triton_errors(monkeypatch):
    x, d = torch.randn(3, 4), torch.randn(5, 4)  # CPU tensors
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        batch_omp(x, d, 2, backend="triton")
    monkeypatch.setattr(backends, "HAS_TRITON", False)
    with pytest.raises(ImportError, match="needs the 'triton' package"):
        batch_omp(x, d, 2, backend="triton")


def test_cuda_backend_order():
    expected = (["cuda"] if backends.WITH_CUDA else []) + (["triton"] if backends.HAS_TRITON else [])
    assert lasers_ext.available_backends("cuda") == expected + ["reference"]


@needs_triton
def test_empty_batch(gen):
    """N = 0 returns empty (0, S) outputs, as the docs promise for every backend."""
    _, d = random_problem(gen, 1, 16, 32)
    codes = batch_omp(torch.zeros(0, 16, device=DEVICE), d.to(DEVICE), 3, backend="triton")
    assert codes.indices.shape == (0, 3) and codes.coeffs.shape == (0, 3)
    assert codes.indices.dtype == torch.int64 and codes.coeffs.dtype == torch.float32
