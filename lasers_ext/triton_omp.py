"""Triton Batch-OMP kernel: the fallback for GPUs without the CUDA extension (imported lazily).

One program codes BLOCK_N vectors. Its state lives in registers: the correlations alpha (BLOCK_N, K), the support
(BLOCK_N, S), the Cholesky factor L (BLOCK_N, S, S) and the forward-substitution vector y (BLOCK_N, S). The per-step
arithmetic follows csrc/omp_core.h operation by operation (same selection and stopping rules, same order of the
Cholesky and triangular-solve sums), so supports match the C++ kernel and coefficients agree to rounding.
Under TRITON_INTERPRET=1 the kernel runs on CPU tensors, which is how CI tests it.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .backends import triton_interpreting
from .reference import row_exponents, scale_by_pow2

__all__ = ["batch_omp_triton"]


@triton.jit
def _pick(mat, ids, t):
    """Column t of a (BLOCK_N, W) tensor whose column numbers are ``ids`` (W,)."""
    return tl.sum(tl.where(ids[None, :] == t, mat, 0), axis=1)


@triton.jit
def _row(mat, ids, r):
    """Row r of a (BLOCK_N, W, W) tensor, as (BLOCK_N, W)."""
    return tl.sum(tl.where(ids[None, :, None] == r, mat, 0), axis=1)


@triton.jit
def _batch_omp_kernel(
    x_ptr, atoms_t_ptr, gram_ptr, inv_norm_ptr, idx_ptr, coef_ptr, tol_ptr,
    N, K, M, pivot_min, corr_rel_sq,
    S: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < K
    ss = tl.arange(0, BLOCK_S)
    dtype = x_ptr.dtype.element_ty

    # alpha0 = D_n x (the same accumulation order over m as the C++ kernel) and ||x||^2
    alpha0 = tl.zeros((BLOCK_N, BLOCK_K), dtype=dtype)
    xx = tl.zeros((BLOCK_N,), dtype=dtype)
    for m in range(M):
        xm = tl.load(x_ptr + rows * M + m, mask=row_ok, other=0.0)
        xx += xm * xm
        dm = tl.load(atoms_t_ptr + m * K + ks, mask=k_ok, other=0.0)
        alpha0 += xm[:, None] * dm[None, :]
    zero_level = corr_rel_sq * xx
    tol = tl.load(tol_ptr + rows, mask=row_ok, other=-1.0)
    residual = xx
    alpha = alpha0
    active = row_ok
    support = tl.full((BLOCK_N, BLOCK_S), -1, tl.int32)
    eye = (ss[:, None] == ss[None, :]).to(dtype)
    L = tl.zeros((BLOCK_N, BLOCK_S, BLOCK_S), dtype=dtype) + eye[None, :, :]  # unused rows stay identity
    y = tl.zeros((BLOCK_N, BLOCK_S), dtype=dtype)
    gamma = tl.zeros((BLOCK_N, BLOCK_S), dtype=dtype)

    for s in tl.static_range(S):
        # argmax |alpha| over atoms not chosen yet (chosen ones masked to 0), lowest index on ties
        mag = tl.where(k_ok[None, :], tl.abs(alpha), -1.0)
        for t in tl.static_range(s):
            mag = tl.where(ks[None, :] == _pick(support, ss, t)[:, None], 0.0, mag)
        best = tl.max(mag, axis=1)
        j = tl.argmax(mag, axis=1, tie_break_left=True).to(tl.int32)
        active = active & (residual > tol) & (best * best > zero_level)

        # Cholesky append: solve L[:s, :s] w = G[T, j], pivot = G_jj - w^T w (cholesky_append in omp_core.h)
        w = tl.zeros((BLOCK_N, BLOCK_S), dtype=dtype)
        ww = tl.zeros((BLOCK_N,), dtype=dtype)
        for r in tl.static_range(s):
            g = tl.load(gram_ptr + j.to(tl.int64) * K + _pick(support, ss, r), mask=active, other=0.0)
            l_row = _row(L, ss, r)
            acc = g
            for c in tl.static_range(r):
                acc -= _pick(l_row, ss, c) * _pick(w, ss, c)
            acc = acc / _pick(l_row, ss, r)
            w = tl.where(ss[None, :] == r, acc[:, None], w)
            ww += acc * acc
        g_jj = tl.load(gram_ptr + j.to(tl.int64) * K + j, mask=active, other=1.0)
        pivot = g_jj - ww
        active = active & (pivot >= pivot_min)
        new_row = tl.where(ss[None, :] == s, tl.sqrt(tl.where(active, pivot, 1.0))[:, None], w)
        L = tl.where((ss[None, :, None] == s) & active[:, None, None], new_row[:, None, :], L)

        # forward step: y_s = (alpha0_j - L[s, :s] y[:s]) / L[s, s]; ||r||^2 -= y_s^2
        alpha0_j = tl.sum(tl.where(ks[None, :] == j[:, None], alpha0, 0.0), axis=1)
        acc = alpha0_j
        for c in tl.static_range(s):
            acc -= _pick(new_row, ss, c) * _pick(y, ss, c)
        y_s = acc / _pick(new_row, ss, s)
        y = tl.where((ss[None, :] == s) & active[:, None], y_s[:, None], y)
        residual = tl.where(active, residual - y_s * y_s, residual)
        support = tl.where((ss[None, :] == s) & active[:, None], j[:, None], support)

        if s + 1 < S:
            # back substitution L^T gamma = y, then alpha = alpha0 - G_T gamma
            for r in tl.static_range(s, -1, -1):  # loop variables stay constexpr (Triton 3.6 needs that below)
                acc = _pick(y, ss, r)
                for c in tl.static_range(r + 1, s + 1):
                    l_cr = _pick(_row(L, ss, c), ss, r)
                    acc -= l_cr * _pick(gamma, ss, c)
                l_rr = _pick(_row(L, ss, r), ss, r)
                gamma = tl.where(ss[None, :] == r, (acc / l_rr)[:, None], gamma)
            alpha = alpha0
            for t in tl.static_range(s + 1):
                sup_t = _pick(support, ss, t)
                g_row = tl.load(gram_ptr + sup_t.to(tl.int64)[:, None] * K + ks[None, :],
                                mask=active[:, None] & k_ok[None, :] & (sup_t[:, None] >= 0), other=0.0)
                alpha = alpha - _pick(gamma, ss, t)[:, None] * g_row

    # final back substitution over all S slots (identity rows and y = 0 give 0 in unused slots)
    gamma = tl.zeros((BLOCK_N, BLOCK_S), dtype=dtype)
    for r in tl.static_range(S - 1, -1, -1):
        acc = _pick(y, ss, r)
        for c in tl.static_range(r + 1, S):
            acc -= _pick(_row(L, ss, c), ss, r) * _pick(gamma, ss, c)
        l_rr = _pick(_row(L, ss, r), ss, r)
        gamma = tl.where(ss[None, :] == r, (acc / l_rr)[:, None], gamma)
    used = support >= 0
    inv = tl.load(inv_norm_ptr + tl.where(used, support, 0), mask=used, other=0.0)
    out = rows[:, None] * S + ss[None, :]
    out_ok = row_ok[:, None] & (ss[None, :] < S)
    tl.store(idx_ptr + out, support.to(tl.int64), mask=out_ok)
    tl.store(coef_ptr + out, tl.where(used, gamma * inv, 0.0), mask=out_ok)


# GPU launch: autotuned over rows per program and warps (keyed on the problem shape); LASERS_TRITON_AUTOTUNE=0 or
# the interpreter use the fixed configuration instead.
_FIXED = {"BLOCK_N": 16, "num_warps": 4}
_INTERPRETER_BLOCK_N = 128  # the interpreter pays per program: fewer, larger programs
_autotuned_kernel = triton.autotune(
    configs=[triton.Config({"BLOCK_N": bn}, num_warps=nw) for bn in (8, 16, 32) for nw in (2, 4, 8)],
    key=["K", "M", "S"],
)(_batch_omp_kernel)


def batch_omp_triton(x: Tensor, dictionary: Tensor, sparsity: int, tol: float | None = None) -> tuple[Tensor, Tensor]:
    """Batch-OMP of x (N, M) over the rows of dictionary (K, M), float32 or float64, on a CUDA device (or on the CPU
    under TRITON_INTERPRET=1). Returns indices (N, S) int64 and coeffs (N, S) like :func:`lasers_ext.batch_omp`;
    argument checking happens there."""
    n, m = x.shape
    k = dictionary.shape[0]
    indices = torch.empty((n, sparsity), dtype=torch.long, device=x.device)
    coeffs = torch.empty((n, sparsity), dtype=x.dtype, device=x.device)
    if n == 0:
        return indices, coeffs
    # the compiled kernels' own preparation (the same numbers on every device) and their per-row scaling by a power
    # of two (csrc/omp_core.h): rows with NaN/Inf entries are coded as 0 (every slot unused)
    atoms_t, gram, inv_norm = torch.ops.lasers_ext.prepare_dictionary(dictionary)
    exponent = row_exponents(x)
    finite = torch.isfinite(x).all(dim=1, keepdim=True)
    xs = torch.where(finite, scale_by_pow2(x, -exponent[:, None]), torch.zeros_like(x)).contiguous()
    tol_rows = torch.full((n,), -1.0 if tol is None else float(tol), dtype=torch.float64, device=x.device)
    if tol is not None:
        tol_rows = scale_by_pow2(tol_rows, -2 * exponent)
    eps = torch.finfo(x.dtype).eps
    args = (xs, atoms_t, gram, inv_norm, indices, coeffs, tol_rows.to(x.dtype), n, k, m, math.sqrt(eps), eps)
    shape = {"S": sparsity, "BLOCK_K": triton.next_power_of_2(k), "BLOCK_S": triton.next_power_of_2(sparsity)}
    if triton_interpreting():
        _batch_omp_kernel[(triton.cdiv(n, _INTERPRETER_BLOCK_N),)](*args, BLOCK_N=_INTERPRETER_BLOCK_N, **shape)
    elif os.environ.get("LASERS_TRITON_AUTOTUNE", "1") == "0":
        _batch_omp_kernel[(triton.cdiv(n, _FIXED["BLOCK_N"]),)](*args, **_FIXED, **shape)
    else:
        _autotuned_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](*args, **shape)
    return indices, scale_by_pow2(coeffs, exponent[:, None])
