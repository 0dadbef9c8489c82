"""Data-driven dictionaries for :class:`~lasers_ext.SparseDictBottleneck`: atoms drawn from latent vectors, and the
choice of replacements for dead atoms.

Atoms are unit-norm and Batch-OMP picks them by the absolute correlation |<x, d>|, so an atom stands for a line
through the origin, not a point: the distance used here between a vector x and an atom d is the sign-invariant
``1 - <x/||x||, d>^2`` (the squared sine of the angle between their lines).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["INIT_MODES", "unit_rows", "sorted_rows", "sample_atoms", "kmeanspp_atoms", "spherical_kmeans",
           "worst_coded"]

INIT_MODES = ("random", "sample", "kmeans")
EXACT = 1e-10  # a squared residual below EXACT ||x||^2 counts as an exact code (float32 rounding is ~1e-13 of it)


def unit_rows(x: Tensor) -> Tensor:
    """The nonzero finite rows of x (N, M), each scaled to unit norm: (N', M), N' <= N, in x's dtype."""
    norms = x.norm(dim=1)
    keep = torch.isfinite(norms) & (norms > 0)
    return x[keep] / norms[keep].unsqueeze(1)


def sorted_rows(x: Tensor) -> Tensor:
    """The rows of x (N, M) in lexicographic order (by column 0, then 1, ...): a canonical order, so that what is
    drawn from a set of vectors does not depend on the order they came in (one process or several ranks)."""
    order = torch.arange(x.shape[0], device=x.device)
    for j in reversed(range(x.shape[1])):  # stable sorts from the last key to the first
        order = order[torch.sort(x[order, j], stable=True).indices]
    return x[order]


def _check(x: Tensor, k: int) -> None:
    if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point (N, M) tensor of vectors, got "
                         f"{getattr(x, 'shape', type(x))}")
    if x.shape[0] == 0:
        raise ValueError("x holds no nonzero vector to draw atoms from")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")


@torch.no_grad()
def sample_atoms(x: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """k atoms (k, M): a uniformly random sample of the unit rows ``x`` (N, M) (see :func:`unit_rows`), without
    replacement while it lasts (N < k: every row, then again in a new random order)."""
    _check(x, k)
    n = x.shape[0]
    order = torch.cat([torch.randperm(n, generator=generator) for _ in range(-(-k // n))])[:k]
    return x[order.to(x.device)]


@torch.no_grad()
def kmeanspp_atoms(x: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """k atoms (k, M) seeded by k-means++ on the unit rows ``x`` (N, M): the first a uniformly random row, each next
    one a row drawn with probability proportional to its distance ``1 - <x, d>^2`` to the nearest line chosen so
    far. Once every row lies on a chosen line (fewer distinct lines than k), the rest are drawn uniformly."""
    _check(x, k)
    n = x.shape[0]
    chosen = torch.empty(k, dtype=torch.long)
    first = int(torch.randint(n, (1,), generator=generator))
    chosen[0] = first
    dist = (1 - (x @ x[first]) ** 2).clamp_min(0)
    for j in range(1, k):
        weights = dist.double().cpu()
        if not bool(weights.sum() > 0):
            weights = torch.ones(n, dtype=torch.float64)
        nxt = int(torch.multinomial(weights, 1, generator=generator))
        chosen[j] = nxt
        dist = torch.minimum(dist, (1 - (x @ x[nxt]) ** 2).clamp_min(0))
    return x[chosen.to(x.device)]


@torch.no_grad()
def spherical_kmeans(x: Tensor, atoms: Tensor, iters: int) -> Tensor:
    """``iters`` rounds of sign-invariant spherical k-means from ``atoms`` (k, M) on the unit rows ``x`` (N, M): each
    row goes to the atom of largest |<x, d>| (the lowest index on ties), each atom becomes its rows' sum, each row
    signed by its correlation, scaled to unit norm (the leading direction of the cluster, for nearly aligned rows).
    An atom no row goes to keeps its value. Returns the new atoms (k, M)."""
    atoms = atoms.clone()
    for _ in range(iters):
        corr = x @ atoms.T  # (N, k)
        owner = corr.abs().argmax(dim=1)
        signs = torch.sign(corr.gather(1, owner.unsqueeze(1)))
        signs = torch.where(signs == 0, 1.0, signs)
        sums = torch.zeros_like(atoms).index_add_(0, owner, x * signs)
        norms = sums.norm(dim=1, keepdim=True)
        atoms = torch.where(norms > 0, sums / norms.clamp_min(torch.finfo(x.dtype).tiny), atoms)
    return atoms


@torch.no_grad()
def worst_coded(x: Tensor, z_hat: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """The ``count`` worst-coded rows of x (N, M) by their codes z_hat (N, M): (their squared residuals
    ||x - z_hat||^2 (count',), their row indices (count',)), largest residual first, the lower row index first on
    ties; only rows coded worse than rounding (a residual above 1e-10 ||x||^2), so count' <= count: which of the
    rows coded to rounding precision is "worst" would be noise."""
    residual = ((x - z_hat) ** 2).sum(dim=1)
    usable = (residual > EXACT * (x ** 2).sum(dim=1)) & torch.isfinite(residual)
    residual = torch.where(usable, residual, -1.0)
    order = torch.sort(residual, descending=True, stable=True).indices[:count]
    order = order[usable[order]]
    return residual[order], order
