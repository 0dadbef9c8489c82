"""The hand-written CUDA kernel (``backend="cuda"``): the same codes as the C++ CPU kernel, every output element
written, streams and torch.compile. Oracles: the C++ kernel (identical supports, coefficients within 1e-5 relative)
and the float64 reference (tie-aware). Run with ``pytest -m cuda``; skipped without a GPU or the compiled kernel."""

import pytest
import torch
from conftest import random_problem
from test_batch_omp import assert_matches_reference, share_matching_cpu_kernel

from lasers_ext import SparseCodes, batch_omp, ops

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif("CUDA" not in ops._COMPILED_KERNELS, reason="lasers_ext was built without the CUDA kernel"),
]

# (K, M, S): the paper's shape, S = 1, S = M, patch-coded M, large K, large S
SHAPES = [(512, 16, 5), (64, 8, 1), (32, 8, 8), (1024, 64, 16), (8192, 16, 5), (256, 300, 32)]


def cuda_codes(x, d, s, tol=None):
    codes = batch_omp(x.cuda(), d.cuda(), s, tol=tol, backend="cuda")
    return SparseCodes(codes.indices.cpu(), codes.coeffs.cpu())


def assert_same_as_cpu_kernel(x, d, s, tol=None, check_reference=True):
    codes = cuda_codes(x, d, s, tol)
    # supports may only differ on exact ties at float32 rounding: allow a handful in a large random batch
    share = share_matching_cpu_kernel(codes, x, d, s, tol)
    assert share >= 0.999, f"only {share:.4%} of the rows chose the CPU kernel's atoms"
    if check_reference:
        n = min(len(x), 512)
        assert_matches_reference(SparseCodes(codes.indices[:n], codes.coeffs[:n]), x[:n], d, s, tol)
    return codes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"K{k}-M{m}-S{s}" for k, m, s in SHAPES])
def test_random_inputs_match_cpu_kernel(gen, shape, dtype):
    k, m, s = shape
    x, d = random_problem(gen, 3000, m, k, dtype, normalise=False)
    assert_same_as_cpu_kernel(x, d, s)


def test_large_batch_matches_cpu_kernel(gen):
    x, d = random_problem(gen, 1 << 18, 16, 512)
    assert_same_as_cpu_kernel(x, d, 5, check_reference=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_degenerate_inputs(gen, dtype):
    x, d = random_problem(gen, 64, 16, 48, dtype)
    d[3] = 0  # zero atom: never chosen
    d[7] = d[5]  # duplicate atom: dependent, never both
    d[9] = -2 * d[11]  # parallel atom of another length
    x[0] = 0  # zero vector: no atom
    x[1] = 3 * d[5]  # exactly one atom
    codes = assert_same_as_cpu_kernel(x, d, 6)
    assert (codes.indices != 3).all()
    assert (codes.indices[0] == -1).all() and (codes.coeffs[0] == 0).all()
    assert codes.indices[1, 0] in (5, 7) and (codes.indices[1, 1:] == -1).all()
    for row in codes.indices:
        used = row[row >= 0].tolist()
        assert not {5, 7} <= set(used) and not {9, 11} <= set(used)
        assert len(used) == len(set(used))
        assert (row[len(used):] == -1).all()  # unused slots are trailing


@pytest.mark.parametrize("tol", [0.0, 0.5, 4.0, 1e9])
def test_tolerance(gen, tol):
    x, d = random_problem(gen, 500, 16, 128)
    assert_same_as_cpu_kernel(x, d, 8, tol=tol)


def test_every_output_element_is_written(gen):
    """Poison the caching allocator's free blocks with NaN / a sentinel index, so outputs that reuse them show any
    element the kernel forgot to write."""
    x, d = random_problem(gen, 5000, 16, 512)
    x[::7] = 0  # rows that stop at once still write all their slots
    x, d = x.cuda(), d.cuda()
    for _ in range(3):
        poison = torch.full((64 << 20,), float("nan"), device="cuda")
        poison.view(torch.int64)[:] = -7
        del poison
        codes = batch_omp(x, d, 5, backend="cuda")
        assert not torch.isnan(codes.coeffs).any()
        assert ((codes.indices >= -1) & (codes.indices < 512)).all()
        assert ((codes.indices == -1) == (codes.coeffs == 0)).all()


def test_side_stream_and_half_inputs(gen):
    x, d = random_problem(gen, 4000, 16, 512)
    expected = batch_omp(x, d, 5, backend="cpu")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        xc, dc = x.cuda(non_blocking=True), d.cuda(non_blocking=True)
        codes = batch_omp(xc, dc, 5, backend="cuda")
    stream.synchronize()
    assert (codes.indices.cpu() == expected.indices).all(1).float().mean() >= 0.999
    half = batch_omp(xc.half(), dc.half(), 5, backend="cuda")
    assert half.coeffs.dtype == torch.float16
    ref = batch_omp(x.half().float(), d.half().float(), 5, backend="cpu")
    assert (half.indices.cpu() == ref.indices).all(1).float().mean() >= 0.999


def test_auto_picks_cuda_and_compiles(gen):
    assert ops.available_backends("cuda")[0] == "cuda"
    x, d = random_problem(gen, 1000, 16, 512)
    x, d = x.cuda(), d.cuda()

    def code(xs, ds):
        idx, coef = batch_omp(xs, ds, 5)
        return idx, coef

    compiled = torch.compile(code, fullgraph=True)
    eager, traced = code(x, d), compiled(x, d)
    assert torch.equal(eager[0], traced[0]) and torch.equal(eager[1], traced[1])


def test_gradient_flows_like_cpu(gen):
    x, d = random_problem(gen, 200, 16, 64, torch.float64)
    xs = [x.clone().requires_grad_(), x.cuda().requires_grad_()]
    ds = [d.clone().requires_grad_(), d.cuda().requires_grad_()]
    for xi, di, backend in zip(xs, ds, ["cpu", "cuda"]):
        batch_omp(xi, di, 4, backend=backend).coeffs.square().sum().backward()
    torch.testing.assert_close(xs[1].grad.cpu(), xs[0].grad)
    torch.testing.assert_close(ds[1].grad.cpu(), ds[0].grad)
