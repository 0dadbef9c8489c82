"""What is particular to the Triton backend (the oracles and hostile inputs of every backend, Triton included, are in
test_batch_omp.py): supports like the C++ kernel's, half inputs, autograd, errors. On a GPU machine the compiled kernel
runs on CUDA tensors; without one, Triton's interpreter runs it on CPU tensors (TRITON_INTERPRET=1, set in
conftest.py)."""

import os

import pytest
import torch
from conftest import random_problem, share_matching_cpu_kernel

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


@needs_triton
def test_same_supports_as_the_cpp_kernel(gen):
    """Triton follows the steps of csrc/omp_core.h (with its own division and summation order): the C++ kernel's
    supports at the paper's shape on all but rounding-level ties, coefficients within 1e-5."""
    x, d = random_problem(gen, 256, 16, 512, normalise=False)
    assert share_matching_cpu_kernel(triton_codes(x, d, 5), x, d, 5) > 0.99


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
