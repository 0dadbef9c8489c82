"""Pure-PyTorch Batch-OMP oracle: written for clarity, computed in float64.

It follows the textbook OMP loop (explicit residual, least squares on the support) rather than the Cholesky
bookkeeping of the kernels, so that it checks them instead of sharing their bugs. Its stopping rules are the ones
documented in :func:`lasers_ext.batch_omp` and use the machine epsilon of the *input* dtype, so a float32 kernel and
this float64 oracle stop at the same places.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["batch_omp_reference", "stopping_eps", "row_exponents", "scale_by_pow2"]


def stopping_eps(dtype: torch.dtype) -> float:
    """Machine epsilon that sets the stopping thresholds for inputs of ``dtype`` (float32 for half types)."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def batch_omp_reference(
    x: Tensor, dictionary: Tensor, sparsity: int, tol: float | None = None, *, chunk: int = 4096
) -> tuple[Tensor, Tensor]:
    """Orthogonal matching pursuit of every row of ``x`` over the rows of ``dictionary``, in float64.

    Args:
        x: (N, M) floating signals.
        dictionary: (K, M) atoms as rows, any norms (zero atoms are never chosen).
        sparsity: S, the most atoms per signal.
        tol: stop a signal once its squared residual norm is at most ``tol``.
        chunk: signals coded together (bounds the (chunk, K) correlation matrix).

    Returns:
        ``(indices, coeffs)``: (N, S) int64 in selection order with -1 in unused slots, and (N, S) coefficients
        with respect to the given atoms, 0 in unused slots, in ``x.dtype``.
    """
    eps = stopping_eps(x.dtype)
    X = x.detach().to(torch.float64)
    D = dictionary.detach().to(torch.float64)
    # OMP's codes do not change when a signal or an atom is scaled: code each row and take each atom's norm at the
    # scale of its largest entry (a power of two, so exactly), so squares neither overflow nor underflow.
    d_exp = row_exponents(D)
    norms = scale_by_pow2(scale_by_pow2(D, -d_exp[:, None]).norm(dim=1), d_exp)
    norms = torch.where(torch.isfinite(norms), norms, torch.zeros_like(norms))  # atoms with NaN/Inf: never chosen
    unit = torch.where(norms[:, None] > 0, D / torch.where(norms > 0, norms, 1.0)[:, None], torch.zeros_like(D))
    x_exp = row_exponents(X)
    finite = torch.isfinite(X).all(dim=1)  # a row with a NaN or infinite entry gets every slot unused
    X = torch.where(finite[:, None], scale_by_pow2(X, -x_exp[:, None]), torch.zeros_like(X))
    tols = None if tol is None else scale_by_pow2(torch.full_like(X[:, 0], float(tol)), -2 * x_exp)
    n = X.shape[0]
    indices = torch.full((n, sparsity), -1, dtype=torch.long, device=x.device)
    coeffs = torch.zeros((n, sparsity), dtype=torch.float64, device=x.device)
    for start in range(0, n, chunk):
        rows = slice(start, start + chunk)
        indices[rows], coeffs[rows] = _omp_chunk(X[rows], unit, sparsity, None if tols is None else tols[rows], eps)
    safe = indices.clamp(min=0)
    scaled = scale_by_pow2(coeffs, x_exp[:, None]) / torch.where(norms[safe] > 0, norms[safe], 1.0)
    coeffs = torch.where(indices >= 0, scaled, torch.zeros_like(coeffs))
    return indices, coeffs.to(x.dtype)


def scale_by_pow2(a: Tensor, e: Tensor) -> Tensor:
    """a * 2^e for integer e (broadcast), exact in the normal range of a's dtype: two factors that each stay
    representable (e up to +-2046 in float64, +-254 in float32)."""
    half = torch.div(e, 2, rounding_mode="floor")
    return a * torch.exp2(half.to(a.dtype)) * torch.exp2((e - half).to(a.dtype))


def row_exponents(a: Tensor) -> Tensor:
    """Per row of a: the int64 e with 2^e <= max |a| < 2^(e+1) (0 for an all-zero or non-finite row)."""
    amax = a.abs().amax(dim=1) if a.shape[1] else a.new_zeros(a.shape[0])
    ok = (amax > 0) & torch.isfinite(amax)
    _, e = torch.frexp(torch.where(ok, amax, torch.ones_like(amax)))  # amax = m * 2^e with m in [0.5, 1)
    return torch.where(ok, e - 1, torch.zeros_like(e)).to(torch.int64)


def _omp_chunk(X: Tensor, unit: Tensor, S: int, tol: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    """OMP over unit-norm atoms for one chunk (tol per row); coefficients refer to the unit atoms."""
    n = X.shape[0]
    gram = unit @ unit.T
    support = torch.full((n, S), -1, dtype=torch.long, device=X.device)
    gamma = torch.zeros((n, S), dtype=X.dtype, device=X.device)
    active = torch.ones(n, dtype=torch.bool, device=X.device)
    xx = (X * X).sum(1)
    residual = X.clone()
    for s in range(S):
        # Rule 1: the residual is small enough.
        if tol is not None:
            active &= (residual * residual).sum(1) > tol
        rows = active.nonzero().squeeze(1)
        corr = residual[rows] @ unit.T  # (r, K)
        if s > 0:
            corr.scatter_(1, support[rows, :s], 0.0)  # never pick an atom twice
        abs_corr = corr.abs()
        j = abs_corr.argmax(dim=1)  # torch.argmax returns the first maximum: lowest index on ties
        # Rule 2: the residual is numerically zero.
        nonzero = abs_corr.gather(1, j[:, None]).squeeze(1).square() > eps * xx[rows]
        active[rows[~nonzero]] = False
        rows, jr = rows[nonzero], j[nonzero]
        if rows.numel() == 0:
            break
        T_prev = support[rows, :s]
        # Rule 3: the new atom depends linearly on the chosen ones (Schur complement of G_TT).
        if s > 0:
            g_prev = gram[T_prev[:, :, None], T_prev[:, None, :]]
            g_new = gram[T_prev, jr[:, None]]
            w = torch.linalg.solve(g_prev, g_new)
            pivot = gram[jr, jr] - (g_new * w).sum(1)
            keep = pivot >= eps**0.5
            active[rows[~keep]] = False
            rows, jr, T_prev = rows[keep], jr[keep], T_prev[keep]
            if rows.numel() == 0:
                break
        support[rows, s] = jr
        T = support[rows, : s + 1]
        # Least squares on the support: (D_T D_T^T) gamma = D_T x.
        atoms = unit[T]  # (r, s+1, M)
        lhs = atoms @ atoms.transpose(1, 2)
        rhs = (atoms @ X[rows].unsqueeze(2)).squeeze(2)
        g = torch.linalg.solve(lhs, rhs)
        gamma[rows, : s + 1] = g
        residual[rows] = X[rows] - (g.unsqueeze(1) @ atoms).squeeze(1)
    return support, gamma
