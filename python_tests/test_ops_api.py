"""The op as an API: argument errors, torch.library registration (opcheck, torch.compile), gradients, decode."""

import os

import pytest
import torch
from conftest import random_problem

import lasers_ext
from lasers_ext import batch_omp, sparse_decode

KERNELS = [b for b in lasers_ext.available_backends("cpu") if b != "reference"]


@pytest.mark.parametrize(
    "x,d,s,kwargs,exc,match",
    [
        ([[1.0, 2.0]], torch.randn(4, 2), 1, {}, TypeError, "x must be a torch.Tensor"),
        (torch.randn(3, 2), "D", 1, {}, TypeError, "dictionary must be a torch.Tensor"),
        (torch.randn(3), torch.randn(4, 3), 1, {}, ValueError, r"x must have shape \(N, M\)"),
        (torch.randn(3, 2), torch.randn(2, 4, 2), 1, {}, ValueError, r"dictionary must have shape \(K, M\)"),
        (torch.randn(3, 2), torch.randn(4, 3), 1, {}, ValueError, "M=2 features"),
        (torch.randn(3, 2), torch.randn(0, 2), 1, {}, ValueError, "dictionary is empty"),
        (torch.ones(3, 2, dtype=torch.int64), torch.randn(4, 2), 1, {}, TypeError, "x must be a floating-point"),
        (torch.randn(3, 2), torch.ones(4, 2, dtype=torch.int32), 1, {}, TypeError, "dictionary must be a floating"),
        (torch.randn(3, 2), torch.randn(4, 2, dtype=torch.float64), 1, {}, TypeError, "same dtype"),
        (torch.randn(3, 2), torch.randn(4, 2, device="meta"), 1, {}, ValueError, "same device"),
        (torch.randn(3, 2), torch.randn(4, 2), 0, {}, ValueError, r"sparsity must be in \[1, min\(K, M\)\]"),
        (torch.randn(3, 2), torch.randn(4, 2), 3, {}, ValueError, r"sparsity must be in \[1, min\(K, M\)\] = \[1, 2\]"),
        (torch.randn(3, 8), torch.randn(4, 8), 5, {}, ValueError, r"= \[1, 4\], got 5"),
        (torch.randn(3, 2), torch.randn(4, 2), 1.5, {}, TypeError, "sparsity must be an int"),
        (torch.randn(3, 2), torch.randn(4, 2), True, {}, TypeError, "sparsity must be an int"),
        (torch.randn(3, 2), torch.randn(4, 2), 1, {"tol": -1.0}, ValueError, "tol must be a finite number >= 0"),
        (torch.randn(3, 2), torch.randn(4, 2), 1, {"tol": float("nan")}, ValueError, "tol must be a finite"),
        (torch.randn(3, 2), torch.randn(4, 2), 1, {"tol": "1"}, TypeError, "tol must be a float"),
        (torch.randn(3, 2), torch.randn(4, 2), 1, {"backend": "gpu"}, ValueError, "backend must be one of"),
        (torch.randn(3, 2), torch.randn(4, 2), 1, {"backend": "cuda"}, ValueError, "needs CUDA tensors"),
    ],
)
def test_bad_arguments_raise_clear_errors(x, d, s, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        batch_omp(x, d, s, **kwargs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["x", "dictionary"])
def test_non_finite_values_rejected(bad, where):
    x, d = torch.randn(5, 4), torch.randn(6, 4)
    (x if where == "x" else d)[2, 1] = bad
    with pytest.raises(ValueError, match=f"{where} contains NaN or Inf"):
        batch_omp(x, d, 2)


def test_direct_op_call_checks_arguments_too():
    with pytest.raises(RuntimeError, match="sparsity"):
        torch.ops.lasers_ext.batch_omp(torch.randn(3, 4), torch.randn(5, 4), 9)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.lasers_ext.batch_omp(torch.randn(3, 4).half(), torch.randn(5, 4).half(), 2)


def test_auto_backend_on_cpu_is_the_cpp_kernel():
    assert lasers_ext.available_backends("cpu")[0] == "cpu"
    x, d = torch.randn(20, 8, dtype=torch.float64), torch.randn(30, 8, dtype=torch.float64)
    auto, cpu = batch_omp(x, d, 3), batch_omp(x, d, 3, backend="cpu")
    assert torch.equal(auto.indices, cpu.indices) and torch.equal(auto.coeffs, cpu.coeffs)


def test_cuda_registration_matches_build():
    from lasers_ext import _C

    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("lasers_ext::batch_omp", "CUDA")
    assert has_cuda_kernel == bool(_C.with_cuda)
    if os.environ.get("LASERS_EXT_CUDA") == "1":  # CI builds and tests with this set: CUDA must be compiled in
        assert _C.with_cuda


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prepare_dictionary_op(gen, dtype):
    """The dictionary as the compiled backends code against it: opcheck, and the values against float64 math."""
    _, d = random_problem(gen, 1, 8, 20, dtype, normalise=False)
    d[3] = 0  # a zero atom: zero column, zero Gram row, inverse norm 0
    torch.library.opcheck(torch.ops.lasers_ext.prepare_dictionary.default, (d,),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    atoms_t, gram, inv_norm = torch.ops.lasers_ext.prepare_dictionary(d)
    d64 = d.double()
    norms = d64.norm(dim=1)
    unit = torch.where(norms[:, None] > 0, d64 / norms.clamp_min(1e-300)[:, None], 0.0)
    tol = dict(rtol=2e-7, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(atoms_t.double(), unit.T, **tol)
    torch.testing.assert_close(gram.double(), unit @ unit.T, **tol)
    torch.testing.assert_close(inv_norm.double(), torch.where(norms > 0, 1 / norms.clamp_min(1e-300), 0.0), **tol)
    assert torch.equal(gram, gram.T)  # exactly symmetric: the CUDA fast path reads G[I_r, j] for G[j, I_r]


@pytest.mark.parametrize("backend", KERNELS + ["reference"])
def test_compiled_backward_matches_eager(gen, backend):
    x, d = random_problem(gen, 32, 8, 24, torch.float64, normalise=False)

    def loss(x, d):
        codes = batch_omp(x, d, 3, backend=backend)
        return (sparse_decode(codes.indices, codes.coeffs, d) - x).square().sum() + codes.coeffs.square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    grads = [torch.autograd.grad(f(x.requires_grad_(), d.requires_grad_()), (x, d)) for f in (loss, compiled)]
    for eager, comp in zip(*grads):
        torch.testing.assert_close(comp, eager)


@pytest.mark.parametrize("backend", KERNELS + ["reference"])
def test_torch_compile_fullgraph(gen, backend):
    x, d = random_problem(gen, 64, 16, 128)

    def code_and_decode(x, d):
        codes = batch_omp(x, d, 5, backend=backend)
        return sparse_decode(codes.indices, codes.coeffs, d), codes.indices

    compiled = torch.compile(code_and_decode, fullgraph=True, backend="eager")
    rec, idx = compiled(x, d)
    rec_ref, idx_ref = code_and_decode(x, d)
    assert torch.equal(idx, idx_ref)
    torch.testing.assert_close(rec, rec_ref)


def test_torch_compile_inductor_dynamic_batch(gen):
    d = random_problem(gen, 1, 16, 64)[1]
    compiled = torch.compile(lambda x: batch_omp(x, d, 4).coeffs.sum(1), fullgraph=True, dynamic=True)
    for n in (8, 33):
        x = torch.randn(n, 16, generator=gen)
        torch.testing.assert_close(compiled(x), batch_omp(x, d, 4).coeffs.sum(1))


@pytest.mark.parametrize("backend", KERNELS + ["reference"])
def test_coefficient_gradient_is_least_squares_on_fixed_support(gen, backend):
    x, d = random_problem(gen, 6, 8, 12, torch.float64, normalise=False)
    x.requires_grad_(True)
    d.requires_grad_(True)
    codes = batch_omp(x, d, 3, tol=0.5, backend=backend)
    # Oracle: the same least squares, written with torch.linalg on the support the op chose.
    idx = codes.indices.detach()

    def lstsq_coeffs(x, d):
        out = []
        for n in range(x.shape[0]):
            used = idx[n][idx[n] >= 0]
            sol = torch.linalg.lstsq(d[used].T, x[n][:, None]).solution[:, 0]
            out.append(torch.cat([sol, sol.new_zeros(idx.shape[1] - len(used))]))
        return torch.stack(out)

    torch.testing.assert_close(codes.coeffs, lstsq_coeffs(x, d))
    w = torch.randn(codes.coeffs.shape, generator=gen, dtype=torch.float64)
    gx, gd = torch.autograd.grad((codes.coeffs * w).sum(), (x, d))
    ex, ed = torch.autograd.grad((lstsq_coeffs(x, d) * w).sum(), (x, d))
    torch.testing.assert_close(gx, ex)
    torch.testing.assert_close(gd, ed)


@pytest.mark.parametrize("backend", KERNELS + ["reference"])
def test_gradcheck(gen, backend):
    x, d = random_problem(gen, 5, 6, 10, torch.float64, normalise=False)
    x.requires_grad_(True)
    d.requires_grad_(True)
    # Small perturbations keep the support fixed, where the coefficients are smooth.
    assert torch.autograd.gradcheck(lambda x, d: batch_omp(x, d, 3, backend=backend).coeffs, (x, d), eps=1e-7)


def test_sparse_decode_matches_dense_product(gen):
    x, d = random_problem(gen, 40, 16, 64, normalise=False)
    codes = batch_omp(x, d, 5)
    dense = torch.zeros(40, 64).scatter_(1, codes.indices, codes.coeffs)
    torch.testing.assert_close(sparse_decode(*codes, d), dense @ d)


def test_sparse_decode_ignores_unused_slots_and_keeps_leading_dims(gen):
    d = torch.randn(10, 4, generator=gen)
    idx = torch.tensor([[[3, -1, -1], [0, 1, -1]]])
    coef = torch.tensor([[[2.0, 5.0, 7.0], [1.0, -1.0, 3.0]]])  # values in unused slots must be ignored
    out = sparse_decode(idx, coef, d)
    assert out.shape == (1, 2, 4)
    torch.testing.assert_close(out[0, 0], 2 * d[3])
    torch.testing.assert_close(out[0, 1], d[0] - d[1])


def test_sparse_decode_gradients(gen):
    d = torch.randn(10, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    coef = torch.randn(3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[1, 2], [3, -1], [1, 1]])
    assert torch.autograd.gradcheck(lambda c, d: sparse_decode(idx, c, d), (coef, d))


@pytest.mark.parametrize(
    "args,exc,match",
    [
        ((torch.zeros(2, 3).long(), torch.zeros(2, 2), torch.randn(5, 4)), ValueError, "same shape"),
        ((torch.zeros(2, 3), torch.zeros(2, 3), torch.randn(5, 4)), TypeError, "indices must be int64"),
        ((torch.zeros(2, 3).long(), torch.zeros(2, 3).long(), torch.randn(5, 4)), TypeError, "floating point"),
        ((torch.zeros(2, 3).long(), torch.zeros(2, 3), torch.randn(5)), ValueError, r"\(K, M\)"),
        (([0, 1], torch.zeros(2), torch.randn(5, 4)), TypeError, "indices must be a torch.Tensor"),
    ],
)
def test_sparse_decode_bad_arguments(args, exc, match):
    with pytest.raises(exc, match=match):
        sparse_decode(*args)


@pytest.mark.parametrize("backend", KERNELS + ["reference"])
def test_torch_export(gen, backend):
    class Coder(torch.nn.Module):
        def forward(self, x, d):
            codes = batch_omp(x, d, 3, tol=0.1, backend=backend)
            return codes.indices, sparse_decode(codes.indices, codes.coeffs, d)

    x, d = random_problem(gen, 16, 8, 32)
    program = torch.export.export(Coder(), (x, d))
    x2 = torch.randn(16, 8, generator=gen)
    for got, want in zip(program.module()(x2, d), Coder()(x2, d)):
        torch.testing.assert_close(got, want)


def test_raw_op_gives_non_finite_rows_unused_slots():
    """The raw CPU op (the path torch.compile takes, where the Python NaN check is skipped): a row with a NaN or
    infinite entry gets every slot unused (index -1, coefficient 0), the same on every call; a row whose squared norm
    would overflow (1e20 in float32) is coded like any other; the other rows are coded as batch_omp codes them."""
    g = torch.Generator().manual_seed(0)
    x, d = torch.randn(40, 16, generator=g), torch.randn(64, 16, generator=g)
    bad = x.clone()
    bad[1, 3], bad[2, 0] = float("nan"), float("inf")
    bad[3] = 1e20 * x[3]
    expected = lasers_ext.batch_omp(x, d, 5, backend="cpu")
    for _ in range(3):
        idx, coef = torch.ops.lasers_ext.batch_omp(bad, d, 5)
        assert (idx[1:3] == -1).all() and (coef[1:3] == 0).all()
        assert (idx[3] >= 0).all()
        keep = torch.ones(40, dtype=torch.bool)
        keep[1:4] = False
        assert torch.equal(idx[keep], expected.indices[keep]) and torch.equal(coef[keep], expected.coeffs[keep])


def test_meta_tensors_give_output_shapes():
    x, d = torch.empty(5, 4, device="meta"), torch.empty(6, 4, device="meta")
    codes = batch_omp(x, d, 2)
    assert codes.indices.shape == (5, 2) and codes.indices.dtype == torch.int64 and codes.coeffs.device.type == "meta"


def test_argument_errors_survive_torch_compile():
    """Argument checks run while Dynamo traces: the ValueError itself without fullgraph, and with fullgraph=True
    Dynamo's error carrying the same message (fullgraph cannot contain a raise)."""
    x, d = torch.randn(3, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="sparsity must be in"):
        torch.compile(lambda a, b: batch_omp(a, b, 5), backend="eager")(x, d)
    with pytest.raises(Exception, match="sparsity must be in"):
        torch.compile(lambda a, b: batch_omp(a, b, 5), backend="eager", fullgraph=True)(x, d)


@pytest.mark.parametrize(("coeff_dtype", "dict_dtype", "expected"), [
    (torch.float16, torch.float32, torch.float32), (torch.float32, torch.float16, torch.float32),
    (torch.bfloat16, torch.float64, torch.float64), (torch.float16, torch.float16, torch.float16)])
def test_sparse_decode_promotes_dtypes(coeff_dtype, dict_dtype, expected):
    g = torch.Generator().manual_seed(0)
    d = torch.randn(6, 4, generator=g)
    idx = torch.tensor([[0, 3], [5, -1]])
    coef = torch.tensor([[0.5, -2.0], [1.5, 7.0]])
    out = sparse_decode(idx, coef.to(coeff_dtype), d.to(dict_dtype))
    assert out.dtype == expected
    want = torch.stack([0.5 * d[0] - 2.0 * d[3], 1.5 * d[5]])
    torch.testing.assert_close(out.float(), want, rtol=1e-2, atol=1e-2)
