"""The hand-written CUDA kernels (``backend="cuda"``): the same codes as the C++ CPU kernel, every output element
written, streams and torch.compile. Two kernels sit behind the op (``LASERS_CUDA_KERNEL`` picks one; ``auto`` takes
the fast path where it applies): the fast path (float32, K <= 1024, M <= 32, S <= 8) must equal the CPU kernel bit for
bit, supports and coefficients, on every input; the general kernel must match it on all but rounding-level ties.
Oracles: the C++ kernel and the float64 reference (tie-aware). Run with ``pytest -m cuda``; skipped without a GPU or
the compiled kernel."""

import pytest
import torch
from conftest import assert_matches_reference, random_problem, share_matching_cpu_kernel

from lasers_ext import SparseCodes, backends, batch_omp

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(not backends.WITH_CUDA, reason="lasers_ext was built without the CUDA kernel"),
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


@pytest.fixture(params=["auto", "general"])
def kernel(request, monkeypatch):
    """Runs a test with each CUDA kernel: auto (the fast path where it applies) and the general kernel."""
    monkeypatch.setenv("LASERS_CUDA_KERNEL", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"K{k}-M{m}-S{s}" for k, m, s in SHAPES])
def test_random_inputs_match_cpu_kernel(gen, shape, dtype, kernel):
    k, m, s = shape
    x, d = random_problem(gen, 3000, m, k, dtype, normalise=False)
    assert_same_as_cpu_kernel(x, d, s)


def test_large_batch_matches_cpu_kernel(gen):
    x, d = random_problem(gen, 1 << 18, 16, 512)
    assert_same_as_cpu_kernel(x, d, 5, check_reference=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_degenerate_inputs(gen, dtype, kernel):
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
def test_tolerance(gen, tol, kernel):
    x, d = random_problem(gen, 500, 16, 128)
    assert_same_as_cpu_kernel(x, d, 8, tol=tol)


def assert_every_output_element_written(x, d):
    """Poison the caching allocator's free blocks with NaN / a sentinel index, so outputs that reuse them show any
    element the kernel forgot to write."""
    x[::7] = 0  # rows that stop at once still write all their slots
    x, d = x.cuda(), d.cuda()
    for _ in range(3):
        poison = torch.full((64 << 20,), float("nan"), device="cuda")
        poison.view(torch.int64)[:] = -7
        del poison
        codes = batch_omp(x, d, 5, backend="cuda")
        assert not torch.isnan(codes.coeffs).any()
        assert ((codes.indices >= -1) & (codes.indices < len(d))).all()
        assert ((codes.indices == -1) == (codes.coeffs == 0)).all()


def test_every_output_element_is_written(gen, kernel):
    assert_every_output_element_written(*random_problem(gen, 5000, 16, 512))


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
    assert backends.available_backends("cuda")[0] == "cuda"
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


# ---- the fast path: bit for bit the CPU kernel ----------------------------------------------------------------------

# (K, M, S) across the fast path's instantiations: K padded to 128/256/512/1024, rows cached or re-read, V = 1, 2, 4
FAST_SHAPES = [(512, 16, 5), (128, 8, 1), (64, 8, 8), (200, 12, 3), (256, 16, 5), (300, 32, 8), (1024, 16, 5),
               (1000, 24, 8), (512, 32, 8)]


def assert_bitwise_cpu(x, d, s, tol=None):
    """The fast path's codes equal the CPU kernel's exactly: indices and coefficient bits."""
    fast = batch_omp(x.cuda(), d.cuda(), s, tol=tol, backend="cuda")
    cpu = batch_omp(x, d, s, tol=tol, backend="cpu")
    idx, coef = fast.indices.cpu(), fast.coeffs.cpu()
    rows = (idx != cpu.indices).any(1) | (coef.view(torch.int32) != cpu.coeffs.view(torch.int32)).any(1)
    assert not rows.any(), (
        f"{int(rows.sum())} of {len(x)} rows differ from the CPU kernel; first: row {int(rows.nonzero()[0, 0])}")
    return fast


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setenv("LASERS_CUDA_KERNEL", "fast")  # an error, not a silent fallback, if the shape is not taken


def test_fast_path_paper_shape_2_20_vectors(gen, fast):
    x, d = random_problem(gen, 1 << 20, 16, 512, normalise=False)
    assert_bitwise_cpu(x, d, 5)


def test_fast_path_one_vector_per_warp(gen, fast, monkeypatch):
    monkeypatch.setenv("LASERS_CUDA_FAST_V", "1")
    x, d = random_problem(gen, 1 << 16, 16, 512)
    assert_bitwise_cpu(x, d, 5)


@pytest.mark.parametrize("shape", FAST_SHAPES, ids=[f"K{k}-M{m}-S{s}" for k, m, s in FAST_SHAPES])
def test_fast_path_shapes(gen, fast, shape):
    k, m, s = shape
    x, d = random_problem(gen, 20000, m, k, normalise=False)
    assert_bitwise_cpu(x, d, s)


def test_fast_path_ties_and_degenerate_inputs(gen, fast):
    x, d = random_problem(gen, 6000, 16, 300)  # K padded to 512
    d[3] = 0  # zero atom
    d[7] = d[5]  # duplicate
    d[9] = -d[11]  # sign-flipped duplicate
    d[150:300] = -d[0:150] * torch.where(torch.arange(150) % 2 == 0, 1.0, -1.0)[:, None]  # half the atoms mirrored
    x[0] = 0  # x = 0
    x[1] = 3 * d[5]  # one (duplicated) atom
    x[2] = d[1] - 2 * d[20] + 0.5 * d[40]  # exactly 3-sparse
    x[3:2000] = d[torch.arange(3, 2000) % 300] + d[(torch.arange(3, 2000) + 1) % 300]  # two-atom ties
    for s in (1, 5, 8):
        codes = assert_bitwise_cpu(x, d, s)
        assert (codes.indices[0] == -1).all()
        assert ((codes.indices >= -1) & (codes.indices < 300)).all()


@pytest.mark.parametrize("tol", [0.0, 0.5, 4.0, 1e9])
def test_fast_path_tolerance(gen, fast, tol):
    x, d = random_problem(gen, 5000, 16, 512)
    assert_bitwise_cpu(x, d, 8, tol=tol)


def test_fast_path_writes_every_element(gen, fast):
    assert_every_output_element_written(*random_problem(gen, 5003, 16, 1000))  # partial last group, padded atoms


@pytest.mark.parametrize("kernel_name", ["fast", "general"])
def test_non_finite_rows_get_unused_slots(gen, monkeypatch, kernel_name):
    """Through the raw op (the path torch.compile takes, without the Python NaN check): a row with a NaN or infinite
    entry gets every slot unused, on the GPU as on the CPU, and other rows are coded as usual."""
    monkeypatch.setenv("LASERS_CUDA_KERNEL", kernel_name)
    x, d = random_problem(gen, 300, 16, 512)
    x[5, 3] = float("nan")
    x[6, 0] = float("inf")
    x[7, 2] = -float("inf")
    for _ in range(3):
        idx, coef = torch.ops.lasers_ext.batch_omp(x.cuda(), d.cuda(), 5)
        cpu_idx, cpu_coef = torch.ops.lasers_ext.batch_omp(x, d, 5)
        assert (idx[5:8] == -1).all() and (coef[5:8] == 0).all()
        assert ((idx >= -1) & (idx < 512)).all()
        assert torch.equal(idx.cpu(), cpu_idx) or kernel_name == "general"
        assert (idx.cpu()[:5] == cpu_idx[:5]).all(1).float().mean() >= 0.99


def test_cuda_op_raises_clear_errors(gen):
    """Argument errors of the raw CUDA op are exceptions (raised by the op's host code before any launch)."""
    x, d = random_problem(gen, 10, 16, 64)
    with pytest.raises(RuntimeError, match="sparsity"):
        torch.ops.lasers_ext.batch_omp(x.cuda(), d.cuda(), 17)
    with pytest.raises(RuntimeError, match="disagree on M"):
        torch.ops.lasers_ext.batch_omp(x.cuda(), d[:, :8].cuda(), 2)
    big = torch.randn(30000, 16, generator=gen)  # the general kernel's per-vector state would not fit
    with pytest.raises(RuntimeError, match="bytes of shared memory per vector"):
        torch.ops.lasers_ext.batch_omp(x.cuda(), big.cuda(), 5)


def test_fast_path_refuses_shapes_it_does_not_take(gen, fast):
    x, d = random_problem(gen, 10, 64, 512)
    with pytest.raises(RuntimeError, match="fast path takes only"):
        batch_omp(x.cuda(), d.cuda(), 5, backend="cuda")



@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_codes_do_not_depend_on_scale(gen, kernel, dtype):
    """As on the CPU (test_batch_omp.test_codes_do_not_depend_on_scale): x * 2^k gives the same atoms and exactly
    scaled coefficients, decimal extremes full codes; and the CUDA codes equal the CPU kernel's at every scale."""
    x, d = random_problem(gen, 2000, 16, 512, dtype, normalise=False)
    base = batch_omp(x.cuda(), d.cuda(), 5, backend="cuda")
    powers = [-100, 110] if dtype == torch.float32 else [-900, 900]
    for k in powers:
        two_k = torch.tensor(k)
        scaled = batch_omp(torch.ldexp(x, two_k).cuda(), d.cuda(), 5, backend="cuda")
        assert torch.equal(scaled.indices, base.indices)
        assert torch.equal(scaled.coeffs, torch.ldexp(base.coeffs, two_k.cuda()))
    for c in ([1e19, 1e-25] if dtype == torch.float32 else [1e160, 1e-200]):
        codes = batch_omp((x * c).cuda(), d.cuda(), 5, backend="cuda")
        assert (codes.indices >= 0).all()
        cpu = batch_omp(x * c, d, 5, backend="cpu")
        assert (codes.indices.cpu() == cpu.indices).all(1).float().mean() >= 0.999
