"""Every Batch-OMP backend on every device present (conftest.KERNELS / ALL_KERNELS: the C++ kernel, the float64
reference, Triton (interpreted without a GPU), CUDA on a GPU) against two independent oracles, the float64 reference
and scikit-learn's orthogonal_mp_gram, and on degenerate and hostile inputs. Backend-specific properties live in
test_cuda.py (bit-identity with the C++ kernel) and test_triton.py."""

import pytest
import torch
from conftest import ALL_KERNELS, KERNELS, assert_matches_reference, random_problem, relative_error, sklearn_codes
from hypothesis import given, settings
from hypothesis import strategies as st

from lasers_ext import batch_omp, sparse_decode

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}  # well-conditioned


def dense(codes, k):
    out = torch.zeros(codes.indices.shape[0], k, dtype=torch.float64)
    valid = codes.indices >= 0
    rows = torch.arange(codes.indices.shape[0])[:, None].expand_as(codes.indices)
    out[rows[valid], codes.indices[valid]] = codes.coeffs[valid].double()
    return out


@pytest.mark.parametrize("kernel", KERNELS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,m,k,s", [(2000, 16, 512, 5), (300, 8, 20, 8), (257, 32, 64, 1), (100, 5, 5, 5)])
def test_matches_float64_reference(gen, kernel, dtype, n, m, k, s):
    x, d = random_problem(gen, n, m, k, dtype)
    assert_matches_reference(kernel(x, d, s), x, d, s)


@pytest.mark.parametrize("kernel", ALL_KERNELS, ids=str)
def test_matches_sklearn(gen, kernel):
    # Well-separated problem: few atoms, so greedy choices are far from ties.
    x, d = random_problem(gen, 500, 16, 48, torch.float64)
    codes = kernel(x, d, 4)
    ours, theirs = dense(codes, 48), sklearn_codes(x, d, 4)
    assert torch.equal(ours != 0, theirs != 0), "supports differ from scikit-learn"
    rec = sparse_decode(codes.indices, codes.coeffs, d)
    assert relative_error(rec, theirs @ d) < 1e-5


@pytest.mark.parametrize("kernel", KERNELS, ids=str)
def test_matches_sklearn_float32_paper_shape(gen, kernel):
    x, d = random_problem(gen, 1000, 16, 512, torch.float32)
    codes = kernel(x, d, 5)
    theirs = sklearn_codes(x, d, 5)
    same = ((dense(codes, 512) != 0) == (theirs != 0)).all(1).float().mean().item()
    assert same > 0.99  # float32 vs float64 may flip a near-tie now and then
    rec = sparse_decode(codes.indices, codes.coeffs.double(), d.double())
    agree = ((dense(codes, 512) != 0) == (theirs != 0)).all(1)
    assert relative_error(rec[agree], (theirs @ d.double())[agree]) < 1e-5


@pytest.mark.parametrize("kernel", ALL_KERNELS, ids=str)
def test_tol_stops_like_sklearn(gen, kernel):
    x, d = random_problem(gen, 300, 16, 48, torch.float64)
    tol = 0.3 * 16  # about 30% of the mean energy
    codes = kernel(x, d, 16, tol=tol)
    residual = ((x - sparse_decode(codes.indices, codes.coeffs, d)) ** 2).sum(1)
    used = (codes.indices >= 0).sum(1)
    assert (residual <= tol + 1e-9).all()
    # The stop is the earliest possible: with one atom fewer the residual was still above tol.
    without_tol = kernel(x, d, 16)
    for n in range(300):
        u = used[n].item()
        assert torch.equal(codes.indices[n, :u], without_tol.indices[n, :u])
    for u in used.unique().tolist():  # the rows that stopped after u atoms, coded with u - 1
        rows = (used == u).nonzero()[:, 0]
        if u > 1:
            pre = kernel(x[rows], d, u - 1)
            assert (((x[rows] - sparse_decode(pre.indices, pre.coeffs, d)) ** 2).sum(1) > tol).all()
    # scikit-learn always takes a first atom; we check tol before it, so compare where ||x||^2 > tol.
    big = (x**2).sum(1) > tol
    ours, theirs = dense(codes, 48)[big], sklearn_codes(x, d, 16, tol=tol)[big]
    assert torch.equal(ours != 0, theirs != 0)
    assert (codes.indices[~big] == -1).all()


@pytest.mark.parametrize("kernel", ALL_KERNELS, ids=str)
def test_tol_above_signal_energy_uses_no_atom(gen, kernel):
    x, d = random_problem(gen, 10, 8, 16)
    codes = kernel(x, d, 3, tol=1e6)
    assert (codes.indices == -1).all() and (codes.coeffs == 0).all()


@pytest.mark.parametrize("kernel", ALL_KERNELS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparsity_one_is_nearest_atom_by_abs_correlation(gen, kernel, dtype):
    x, d = random_problem(gen, 1000, 16, 128, dtype, normalise=False)
    codes = kernel(x, d, 1)
    unit = d.double() / d.double().norm(dim=1, keepdim=True)
    corr = x.double() @ unit.T
    j = codes.indices[:, 0]
    best = corr.abs().max(1).values
    chosen = corr.gather(1, j[:, None])[:, 0]
    # The chosen atom has the largest |correlation|, up to rounding at the compute precision (near-ties).
    slack = 10 * torch.finfo(dtype).eps * x.double().norm(dim=1) * 16
    assert (chosen.abs() >= best - slack).all()
    assert (j == corr.abs().argmax(1)).float().mean() > 0.99
    expected = chosen / d.double().norm(dim=1)[j]  # coefficient of the given atom
    torch.testing.assert_close(codes.coeffs[:, 0].double(), expected, **TOL[dtype])


@pytest.mark.parametrize("kernel", ALL_KERNELS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparsity_m_reconstructs_exactly(gen, kernel, dtype):
    x, d = random_problem(gen, 128, 16, 64, dtype)
    codes = kernel(x, d, 16)
    rec = sparse_decode(codes.indices, codes.coeffs, d)
    eps = torch.finfo(dtype).eps
    # exact up to the documented "numerically zero residual" rule (max correlation <= sqrt(eps) ||x||)
    assert relative_error(rec.double(), x.double()) < 100 * eps**0.5


@pytest.mark.parametrize("kernel", ALL_KERNELS, ids=str)
def test_exactly_sparse_signals_recovered_orthonormal(gen, kernel):
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=gen, dtype=torch.float64))
    n, s = 400, 6
    support = torch.stack([torch.randperm(32, generator=gen)[:s] for _ in range(n)])
    coef = torch.randn(n, s, generator=gen, dtype=torch.float64).sign() * (1 + torch.rand(n, s, generator=gen))
    x = sparse_decode(support, coef, q)
    codes = kernel(x, q, s)
    assert torch.equal(codes.indices.sort(1).values, support.sort(1).values)
    torch.testing.assert_close(sparse_decode(codes.indices, codes.coeffs, q), x)


@pytest.mark.parametrize("kernel", ALL_KERNELS, ids=str)
def test_exactly_sparse_signals_recovered_low_coherence(gen, kernel):
    # Spikes plus a randomly signed, permuted Hadamard basis: coherence exactly mu = 1/sqrt(M). OMP recovers any
    # s-sparse signal when s < (1 + 1/mu) / 2 (Tropp 2004); with M=256 that is s <= 8, and s=4 leaves a margin.
    m = 256
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < m:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])  # Sylvester's construction
    signs = torch.randint(0, 2, (m, 1), generator=gen).double() * 2 - 1
    hadamard = (signs * h / m**0.5)[torch.randperm(m, generator=gen)]
    d = torch.cat([torch.eye(m, dtype=torch.float64), hadamard])
    mu = (d @ d.T - torch.eye(2 * m, dtype=torch.float64)).abs().max().item()
    s = 4
    assert s < (1 + 1 / mu) / 2
    n = 300
    support = torch.stack([torch.randperm(2 * m, generator=gen)[:s] for _ in range(n)])
    coef = torch.randn(n, s, generator=gen, dtype=torch.float64)
    x = sparse_decode(support, coef, d)
    codes = kernel(x, d, s)
    assert torch.equal(codes.indices.sort(1).values, support.sort(1).values)
    torch.testing.assert_close(codes.coeffs.gather(1, codes.indices.argsort(1)), coef.gather(1, support.argsort(1)))


@pytest.mark.parametrize("kernel", ALL_KERNELS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_vectors_use_no_atoms(gen, kernel, dtype):
    x, d = random_problem(gen, 50, 16, 64, dtype)
    x[::3] = 0
    codes = kernel(x, d, 5)
    assert (codes.indices[::3] == -1).all() and (codes.coeffs[::3] == 0).all()
    assert (codes.indices[1::3] >= 0).all()
    assert torch.isfinite(codes.coeffs).all()


@pytest.mark.parametrize("kernel", ALL_KERNELS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_atoms_never_chosen(gen, kernel, dtype):
    x, d = random_problem(gen, 300, 8, 40, dtype)
    d[::4] = 0
    codes = kernel(x, d, 8)
    chosen = codes.indices[codes.indices >= 0]
    assert (chosen % 4 != 0).all()
    assert torch.isfinite(codes.coeffs).all()
    assert relative_error(sparse_decode(codes.indices, codes.coeffs, d).double(), x.double()) < 1e-3


@pytest.mark.parametrize("kernel", ALL_KERNELS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_duplicate_atoms_are_not_both_chosen(gen, kernel, dtype):
    x, d = random_problem(gen, 300, 8, 16, dtype)
    d = torch.cat([d, d[:8], -3 * d[8:12]])  # exact copies, and scaled/negated copies
    codes = kernel(x, d, 8)
    base = torch.where(codes.indices >= 16, codes.indices - 16, codes.indices)  # copy -> original atom
    for row, used in zip(base, (codes.indices >= 0).sum(1)):
        assert len(set(row[:used].tolist())) == used.item(), "an atom and its copy were both chosen"
    assert torch.isfinite(codes.coeffs).all()
    rec = sparse_decode(codes.indices, codes.coeffs, d)
    assert relative_error(rec.double(), x.double()) < 100 * torch.finfo(dtype).eps ** 0.5


@pytest.mark.parametrize("kernel", ALL_KERNELS, ids=str)
def test_unnormalised_atoms_give_same_support_and_rescaled_coefficients(gen, kernel):
    x, d = random_problem(gen, 500, 16, 128, torch.float64)
    scale = torch.rand(128, generator=gen, dtype=torch.float64) * 10 + 0.1
    a = kernel(x, d, 5)
    b = kernel(x, d * scale[:, None], 5)
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(b.coeffs, a.coeffs / scale[a.indices])


@pytest.mark.parametrize("kernel", ALL_KERNELS, ids=str)
def test_empty_batch(kernel):
    d = torch.randn(32, 8)
    codes = kernel(torch.empty(0, 8), d, 3)
    assert codes.indices.shape == (0, 3) and codes.indices.dtype == torch.int64
    assert codes.coeffs.shape == (0, 3) and codes.coeffs.dtype == torch.float32


@pytest.mark.parametrize("kernel", ALL_KERNELS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_float32(gen, kernel, dtype):
    x, d = random_problem(gen, 200, 16, 64, dtype)
    codes = kernel(x, d, 4)
    assert codes.coeffs.dtype == dtype
    ref = kernel(x.float(), d.float(), 4)
    assert torch.equal(codes.indices, ref.indices)
    assert torch.equal(codes.coeffs, ref.coeffs.to(dtype))


@pytest.mark.parametrize("kernel", KERNELS, ids=str)
def test_non_contiguous_inputs(gen, kernel):
    x, d = random_problem(gen, 64, 32, 128)
    xt, dt = x[:, ::2], d[:, ::2]  # strided views
    assert not xt.is_contiguous()
    codes = kernel(xt, dt, 4)
    assert_matches_reference(codes, xt.contiguous(), dt.contiguous(), 4)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 40),
    m=st.integers(1, 24),
    k=st.integers(1, 80),
    data=st.data(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**31 - 1),
    use_tol=st.booleans(),
)
def test_property_kernels_match_reference(n, m, k, data, dtype, seed, use_tol):
    s = data.draw(st.integers(1, min(m, k)))
    g = torch.Generator().manual_seed(seed)
    x, d = random_problem(g, n, m, k, dtype, normalise=False)
    tol = 0.25 * m if use_tol else None
    for kernel in KERNELS:
        codes = kernel(x, d, s, tol=tol)
        assert codes.indices.shape == codes.coeffs.shape == (n, s)
        valid = codes.indices >= 0
        # unused slots are trailing, and decode-safe
        assert torch.equal(valid, valid.cummin(dim=1).values)
        assert (codes.coeffs[~valid] == 0).all()
        assert_matches_reference(codes, x, d, s, tol)


# ---- the C++ kernel's tiles (csrc/cpu/omp_tile.h: 4 or 8 vectors coded together) -----------------------------------
@pytest.mark.parametrize("n", [1, 3, 7, 8, 9, 17, 1001])
def test_cpu_tiles_code_each_vector_alone(gen, n):
    """N below one tile, not a multiple of it, and rows that stop early (zero, tol, exactly sparse, a copy of an atom,
    NaN) beside rows that go on: every row's codes are those it gets when coded on its own."""
    x, d = random_problem(gen, n, 16, 96)
    d = torch.cat([d, -2 * d[:4]])  # dependent atoms
    kinds = torch.arange(n) % 6
    x[kinds == 1] = 0
    x[kinds == 2] = d[7] * 3 + d[20]  # exactly sparse: the residual reaches zero after two atoms
    x[kinds == 3] = d[11]
    if n > 4:
        x[4, 2] = float("nan")
    tol = 0.5 * (x[kinds == 5] ** 2).sum(1).mean().item() if (kinds == 5).any() else None
    idx, coef = torch.ops.lasers_ext.batch_omp(x, d, 6, tol)
    for r in range(n):
        i1, c1 = torch.ops.lasers_ext.batch_omp(x[r : r + 1], d, 6, tol)
        assert torch.equal(idx[r], i1[0]) and torch.equal(coef[r], c1[0]), f"row {r}"
    assert (idx[kinds == 1] == -1).all() and ((idx[kinds == 2] >= 0).sum(1) <= 2).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_results_do_not_depend_on_thread_count(gen, dtype):
    x, d = random_problem(gen, 3001, 16, 256, dtype)
    threads = torch.get_num_threads()
    try:
        runs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            runs.append(batch_omp(x, d, 5, backend="cpu"))
    finally:
        torch.set_num_threads(threads)
    for codes in runs[1:]:
        assert torch.equal(codes.indices, runs[0].indices) and torch.equal(codes.coeffs, runs[0].coeffs)


# ---- hostile inputs: non-finite rows and extreme scales -------------------------------------------------------------
@pytest.mark.parametrize("kernel", ALL_KERNELS, ids=str)
def test_non_finite_rows_get_unused_slots(gen, kernel):
    """Through each backend's raw op and under torch.compile (both skip batch_omp's NaN/Inf check): a row with a NaN or
    infinite entry gets every slot unused (index -1, coefficient 0), on every call; the other rows are coded as
    usual, and every index is in [-1, K)."""
    x, d = random_problem(gen, 128, 16, 64)  # 128 rows: one program of the Triton interpreter
    bad = x.clone()
    bad[1, 3], bad[2, 0], bad[3, 5] = float("nan"), float("inf"), -float("inf")
    keep = torch.ones(len(x), dtype=torch.bool)
    keep[1:4] = False
    expected = kernel(x, d, 5)
    bad, dev_d = bad.to(kernel.device), d.to(kernel.device)
    compiled = torch.compile(lambda a, b: tuple(batch_omp(a, b, 5, backend=kernel.backend)), backend="eager",
                             fullgraph=True)
    for idx, coef in (kernel.op(bad, dev_d, 5), kernel.op(bad, dev_d, 5), compiled(bad, dev_d)):
        idx, coef = idx.cpu(), coef.cpu()
        assert (idx[1:4] == -1).all() and (coef[1:4] == 0).all()
        assert ((idx >= -1) & (idx < 64)).all() and torch.isfinite(coef).all()
        assert torch.equal(idx[keep], expected.indices[keep]) and torch.equal(coef[keep], expected.coeffs[keep])


@pytest.mark.parametrize("kernel", ALL_KERNELS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_codes_do_not_depend_on_scale(gen, kernel, dtype):
    """OMP's codes are scale-invariant, and so are the kernels': x scaled by 2^k gives the same atoms and coefficients
    scaled by exactly 2^k, a dictionary scaled by 2^k the same atoms and coefficients scaled by 2^-k, across the
    whole exponent range of the dtype (squares would overflow or underflow there without the kernels' per-vector
    scaling). Decimal scales (1e19, 1e-25 in float32; 1e160, 1e-200 in float64) give full codes with the same
    atoms, up to rounding-level ties."""
    x, d = random_problem(gen, 128, 16, 64, dtype, normalise=False)
    base = kernel(x, d, 5)
    assert (base.indices >= 0).all()
    powers = [-100, -60, 60, 110] if dtype == torch.float32 else [-900, -500, 500, 900]
    for k in powers:
        two_k = torch.tensor(k)
        scaled_x = kernel(torch.ldexp(x, two_k), d, 5)
        assert torch.equal(scaled_x.indices, base.indices), f"x * 2^{k}"
        assert torch.equal(scaled_x.coeffs, torch.ldexp(base.coeffs, two_k)), f"x * 2^{k}"
        scaled_d = kernel(x, torch.ldexp(d, two_k), 5)
        assert torch.equal(scaled_d.indices, base.indices), f"dictionary * 2^{k}"
        assert torch.equal(scaled_d.coeffs, torch.ldexp(base.coeffs, -two_k)), f"dictionary * 2^{k}"
    decimals = [1e19, 1e-25] if dtype == torch.float32 else [1e160, 1e-200]
    for c in decimals:
        for codes in (kernel(x * c, d, 5), kernel(x, d * c, 5)):
            assert (codes.indices >= 0).all(), f"scale {c}: a row came back with unused slots"
            assert (codes.indices == base.indices).all(1).float().mean() >= 0.97, f"scale {c}"


@pytest.mark.parametrize("kernel", ALL_KERNELS, ids=str)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(gen, kernel, requires_grad):
    """torch.library.opcheck of each backend's op on its device: schema, fake kernel, autograd registration and
    (without gradients) AOT dispatch."""
    x, d = random_problem(gen, 12, 8, 20, torch.float64)
    x, d = x.to(kernel.device), d.to(kernel.device)
    samples = [(x, d, 3, None), (x[:0], d, 2, None), (x, d, 8, 0.5)]
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if requires_grad:
        # opcheck's AOT check sums all outputs into the first one, an int64 tensor here, and fails on the cast;
        # test_ops_api.test_compiled_backward_matches_eager covers compiled autograd instead.
        utils = utils[:-1]
    for x_, d_, s, tol in samples:
        args = (x_.clone().requires_grad_(requires_grad), d_.clone().requires_grad_(requires_grad), s, tol)
        torch.library.opcheck(kernel.op.default, args, test_utils=utils)
