"""The contract both quantizers share (SparseDictBottleneck and the VectorQuantizer baseline): taming's size names and
their aliases, argument checks, the info tuple they return, usage statistics, and the two-term loss with taming's
``legacy`` switch."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

__all__ = ["QuantizerInfo", "resolve_sizes", "check_quantizer_options", "check_quantizer_call", "usage_statistics",
           "codebook_loss", "straight_through"]

_ALIASES = {"n_embed": "n_e", "num_embeddings": "n_e", "embedding_dim": "e_dim", "vq_embed_dim": "e_dim"}


def resolve_sizes(owner: str, n_e: int | None, e_dim: int | None, aliases: dict[str, int]) -> tuple[int, int]:
    """(n_e, e_dim) from taming's names or the aliases other codebases use; TypeError/ValueError otherwise."""
    sizes = {"n_e": n_e, "e_dim": e_dim}
    for name, value in aliases.items():
        if name not in _ALIASES:
            raise TypeError(f"{owner} got an unexpected keyword argument {name!r}")
        target = _ALIASES[name]
        if sizes[target] is not None and sizes[target] != value:
            raise TypeError(f"{name}={value} conflicts with {target}={sizes[target]}")
        sizes[target] = value
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    return sizes["n_e"], sizes["e_dim"]


def check_quantizer_options(beta: object, legacy: object) -> None:
    """Constructor checks both quantizers share: beta a finite number >= 0, legacy a bool."""
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not (math.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    if not isinstance(legacy, bool):
        raise TypeError(f"legacy must be True or False, got {legacy!r}")


def check_quantizer_call(z: object, e_dim: int, temp, rescale_logits: bool, return_logits: bool) -> None:
    """Checks a quantizer's forward arguments: z (B, e_dim, H, W) floating; the Gumbel-only arguments unused."""
    if temp not in (None, 1.0) or rescale_logits or return_logits:
        raise ValueError("temp, rescale_logits and return_logits exist only for interface compatibility with "
                         "taming's GumbelQuantize")
    if not isinstance(z, Tensor):
        raise TypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
    if z.dim() != 4 or z.shape[1] != e_dim:
        raise ValueError(f"z must have shape (B, {e_dim}, H, W), got {tuple(z.shape)}")
    if not z.is_floating_point():
        raise TypeError(f"z must be a floating-point tensor, got {z.dtype}")


class QuantizerInfo(tuple):
    """The third output of the quantizer: the 3-tuple ``(perplexity, min_encodings, indices)`` taming returns,
    also readable as attributes (``info.perplexity``, ``info.indices``), with more: ``atom_indices`` and ``coeffs``
    (same layout; together they are the sparse codes; ``indices`` is ``atom_indices`` unless the quantizer makes
    tokens), ``bins`` with quantised coefficients, and the usage statistics of
    :func:`usage_statistics` (``active_atoms``, ``dead_atoms``, ``weighted_perplexity``, ``coherence``)."""

    def __new__(cls, perplexity: Tensor, min_encodings: Tensor | None, indices: Tensor, **extra: Tensor):
        info = super().__new__(cls, (perplexity, min_encodings, indices))
        # one setattr per field: torch.compile (Dynamo) traces that, but not a __dict__.update (torch 2.11)
        info.perplexity, info.indices = perplexity, indices
        for name, value in extra.items():
            setattr(info, name, value)
        return info

    def __reduce__(self):
        """Pickling and copy.deepcopy (Lightning and loggers copy outputs): the tuple and the extra fields."""
        extra = {k: v for k, v in vars(self).items() if k not in ("perplexity", "indices")}
        return _rebuild_quantizer_info, (tuple(self), extra)


def _rebuild_quantizer_info(items: tuple, extra: dict) -> QuantizerInfo:
    return QuantizerInfo(*items, **extra)


@torch.no_grad()
def usage_statistics(indices: Tensor, coeffs: Tensor, atoms: Tensor,
                     coherence: bool = True) -> dict[str, Tensor | None]:
    """Atom usage of codes (N, S) over ``atoms`` (K, M, unit norm), as 0-dim tensors (no host sync, compile-safe).

    perplexity: exp of the entropy of the usage histogram (each used slot counts once; taming's formula for S=1);
    weighted_perplexity: the same with |coeff| as weights; active_atoms / dead_atoms: atoms used at least once / never;
    coherence: max_{i != j} |<d_i, d_j>| (a K x K product; None when ``coherence`` is False).
    """
    k = atoms.shape[0]
    valid = indices >= 0
    flat = indices.clamp(min=0).reshape(-1)

    def perplexity(weights: Tensor) -> Tensor:
        hist = torch.zeros(k, dtype=torch.float32, device=atoms.device).index_add_(0, flat, weights.reshape(-1))
        p = hist / hist.sum().clamp_min(1e-12)
        return torch.exp(-(p * torch.log(p + 1e-10)).sum()), hist

    perp, counts = perplexity(valid.float())
    weighted, _ = perplexity(coeffs.abs().float() * valid)
    active = (counts > 0).sum()
    return {"perplexity": perp, "weighted_perplexity": weighted, "active_atoms": active, "dead_atoms": k - active,
            "coherence": _coherence(atoms) if coherence else None}


def _coherence(atoms: Tensor) -> Tensor:
    """max_{i != j} |<d_i, d_j>| of ``atoms`` (K, M), a 0-dim float32 tensor (0 for K = 1)."""
    k = atoms.shape[0]
    gram = (atoms.float() @ atoms.float().T).abs()
    return (gram - torch.eye(k, device=atoms.device)).clamp_min(0).amax() if k > 1 else gram.new_zeros(())


def straight_through(source: Tensor, value: Tensor) -> Tensor:
    """The straight-through estimator: ``value`` exactly (equal values where ``source`` is finite), with the gradient
    of the identity to ``source`` (none to ``value``). Exact, unlike ``source + (value - source).detach()``, so a
    quantised latent equals what its codes decode to."""
    return value.detach() + (source - source.detach())


def codebook_loss(z_hat: Tensor, x: Tensor, beta: float, legacy: bool) -> Tensor:
    """||sg[x] - z_hat||^2 + beta ||x - sg[z_hat]||^2 (means over elements); taming's ``legacy=True`` puts beta on the
    first (codebook / dictionary) term instead, the paper's weighting (``legacy=False``) on the commitment term."""
    if legacy:
        return ((z_hat.detach() - x) ** 2).mean() + beta * ((z_hat - x.detach()) ** 2).mean()
    return beta * ((z_hat.detach() - x) ** 2).mean() + ((z_hat - x.detach()) ** 2).mean()
