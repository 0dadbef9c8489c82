"""Sparse codes as integer tokens, so that a stage-2 prior can model dictionary-learning codes like VQ indices.

A site's sparse code (S slots in selection order, each an atom id and a real coefficient) becomes 2S tokens
``atom_1, bin_1, ..., atom_S, bin_S`` once :class:`CoefficientQuantizer` maps each coefficient to one of B bins.
All tokens share one flat vocabulary of ``K + B + 1`` ids (:class:`TokenCodec`):

====================  ==========================================
``0 .. K-1``          atom ids
``K .. K+B-1``        coefficient bins (bin b is id K + b)
``K+B``               pad: an unused slot (both of its tokens)
====================  ==========================================

Unused slots (Batch-OMP stopped early: ``tol``, a zero residual, dependent atoms) come only after the last used one,
so a site's pads are a suffix of its tokens.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .quantizer import straight_through

__all__ = ["CoefficientQuantizer", "TokenCodec", "TokenGrammar", "QUANTIZER_MODES"]

QUANTIZER_MODES = ("uniform", "mulaw")


class CoefficientQuantizer(nn.Module):
    """Scalar quantiser of sparse-code coefficients to ``bins`` levels over a fitted range [low, high].

    Modes: ``"uniform"``: B equally spaced levels from ``low`` to ``high`` (both included); ``"mulaw"``: levels equally
    spaced after mu-law companding of the range mapped to [-1, 1], denser near its centre, where most coefficients lie.
    Values outside the range go to the end levels.

    The range lives in buffers (``low``, ``high``, ``fitted``; saved in the state_dict): fitted on data by
    :meth:`fit`, or tracked in training mode by :meth:`observe` as an exponential moving average of each batch's
    min and max (``decay``; the first batch sets it; all-reduced under torch.distributed). Quantising with a range
    never fitted raises an error outside torch.compile.
    """

    def __init__(self, bins: int, mode: str = "uniform", *, mu: float = 255.0, decay: float = 0.99,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
            raise ValueError(f"bins must be an int >= 2, got {bins!r}")
        if mode not in QUANTIZER_MODES:
            raise ValueError(f"mode must be one of {QUANTIZER_MODES}, got {mode!r}")
        for name, value, ok in (("mu", mu, mu > 0), ("decay", decay, 0 <= decay < 1)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or not ok:
                raise ValueError(f"{name} must be a finite number in its range (mu > 0, 0 <= decay < 1), got "
                                 f"{value!r}")
        self.bins, self.mode, self.mu, self.decay = bins, mode, float(mu), float(decay)
        self.register_buffer("low", torch.tensor(-1.0, device=device))
        self.register_buffer("high", torch.tensor(1.0, device=device))
        self.register_buffer("fitted", torch.tensor(False, device=device))

    def extra_repr(self) -> str:
        mu = f", mu={self.mu}" if self.mode == "mulaw" else ""
        return f"bins={self.bins}, mode={self.mode!r}{mu}, decay={self.decay}"

    def _check_fitted(self) -> None:
        if not torch.compiler.is_compiling() and not bool(self.fitted):
            raise RuntimeError("CoefficientQuantizer's range was never fitted: train the model (training mode tracks "
                               "it), call fit(coeffs) on sample coefficients, or load a state_dict that has it")

    def _span(self) -> tuple[Tensor, Tensor]:
        """Centre and half-width of the range (the half-width kept > 0)."""
        half = ((self.high - self.low) / 2).clamp_min(torch.finfo(self.low.dtype).tiny)
        return (self.low + self.high) / 2, half

    def levels(self) -> Tensor:
        """The B values bins decode to, (B,) ascending, in the buffers' dtype."""
        self._check_fitted()
        mid, half = self._span()
        y = torch.linspace(-1.0, 1.0, self.bins, dtype=self.low.dtype, device=self.low.device)
        if self.mode == "mulaw":
            y = torch.sign(y) * torch.expm1(y.abs() * math.log1p(self.mu)) / self.mu
        return mid + half * y

    def quantize(self, coeffs: Tensor) -> Tensor:
        """Coefficients (any shape, floating) -> bins (same shape, int64 in [0, B)), the nearest level (in the
        companded domain for mu-law). NaN maps to bin 0."""
        if not isinstance(coeffs, Tensor) or not coeffs.is_floating_point():
            raise TypeError(f"coeffs must be a floating-point tensor, got {getattr(coeffs, 'dtype', type(coeffs))}")
        self._check_fitted()
        mid, half = self._span()
        t = ((coeffs.to(self.low.dtype) - mid) / half).clamp(-1.0, 1.0)
        if self.mode == "mulaw":
            t = torch.sign(t) * torch.log1p(self.mu * t.abs()) / math.log1p(self.mu)
        b = torch.round((t + 1) * ((self.bins - 1) / 2))
        return torch.nan_to_num(b, nan=0.0).clamp(0, self.bins - 1).long()

    def dequantize(self, bins: Tensor) -> Tensor:
        """Bins (int, any shape, values in [0, B)) -> their levels, same shape, in the buffers' dtype."""
        if not isinstance(bins, Tensor) or bins.is_floating_point() or bins.dtype == torch.bool:
            raise TypeError(f"bins must be an integer tensor, got {getattr(bins, 'dtype', type(bins))}")
        return self.levels()[bins.long()]

    def forward(self, coeffs: Tensor, valid: Tensor | None = None) -> Tensor:
        """Quantised coefficients with a straight-through gradient (the rounding counts as the identity); in training
        mode the range first tracks the batch (``valid`` masks out unused slots)."""
        if self.training:
            self.observe(coeffs, valid)
        return straight_through(coeffs, self.dequantize(self.quantize(coeffs)).to(coeffs.dtype))

    @torch.no_grad()
    def observe(self, coeffs: Tensor, valid: Tensor | None = None) -> None:
        """One moving-average step of the range towards this batch's min and max over ``valid`` finite entries
        (no host synchronisation; a batch without any leaves the range as it is)."""
        keep = torch.isfinite(coeffs) if valid is None else valid & torch.isfinite(coeffs)
        c = coeffs.detach().to(self.low.dtype)
        lo = torch.where(keep, c, math.inf).amin() if c.numel() else self.low.new_tensor(math.inf)
        hi = torch.where(keep, c, -math.inf).amax() if c.numel() else self.low.new_tensor(-math.inf)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(lo, op=dist.ReduceOp.MIN)
            dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        seen = lo <= hi
        for buf, batch in ((self.low, lo), (self.high, hi)):
            moved = torch.where(self.fitted, self.decay * buf + (1 - self.decay) * batch, batch)
            buf.copy_(torch.where(seen, moved, buf))
        self.fitted.logical_or_(seen)

    @torch.no_grad()
    def fit(self, coeffs: Tensor, valid: Tensor | None = None, quantile: float = 1.0) -> CoefficientQuantizer:
        """Sets the range from data: the ``1 - quantile`` and ``quantile`` quantiles of the ``valid`` finite
        coefficients (1.0: min and max; e.g. 0.999 clips outliers). Returns self."""
        if not 0.5 < quantile <= 1.0:
            raise ValueError(f"quantile must be in (0.5, 1], got {quantile}")
        keep = torch.isfinite(coeffs) if valid is None else valid & torch.isfinite(coeffs)
        c = coeffs.detach()[keep].to(self.low.dtype).flatten()
        if c.numel() == 0:
            raise ValueError("fit needs at least one valid finite coefficient")
        if c.numel() > 1 << 24:  # torch.quantile's input limit: an evenly spaced subsample
            c = c[torch.linspace(0, c.numel() - 1, 1 << 24, device=c.device).long()]
        lo, hi = torch.quantile(c, torch.tensor([1 - quantile, quantile], dtype=c.dtype, device=c.device))
        self.low.copy_(lo)
        self.high.copy_(hi)
        self.fitted.fill_(True)
        return self


class TokenCodec:
    """Sparse codes <-> tokens in one flat vocabulary (see the module docstring) for K atoms, B bins and S slots.

    ``vocab_size`` = K + B + 1, ``pad_id`` = K + B, ``tokens_per_site`` = 2S, ``bits_per_site`` = S (log2 K + log2 B).
    """

    def __init__(self, atoms: int, bins: int, sparsity: int) -> None:
        for name, value in (("atoms", atoms), ("bins", bins), ("sparsity", sparsity)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.atoms, self.bins, self.sparsity = atoms, bins, sparsity
        self.pad_id = atoms + bins
        self.vocab_size = atoms + bins + 1
        self.tokens_per_site = 2 * sparsity
        self.bits_per_site = sparsity * (math.log2(atoms) + math.log2(bins))

    def __repr__(self) -> str:
        return f"TokenCodec(atoms={self.atoms}, bins={self.bins}, sparsity={self.sparsity})"

    def encode(self, indices: Tensor, bins: Tensor) -> Tensor:
        """indices (..., S) int (-1: unused slot) and bins (..., S) int in [0, B) -> tokens (..., 2S) int64."""
        if indices.shape != bins.shape or indices.dim() < 1 or indices.shape[-1] != self.sparsity:
            raise ValueError(f"indices and bins must both have shape (..., {self.sparsity}), got "
                             f"{tuple(indices.shape)} and {tuple(bins.shape)}")
        used = indices >= 0
        atom = torch.where(used, indices.long(), self.pad_id)
        value = torch.where(used, bins.long() + self.atoms, self.pad_id)
        return torch.stack([atom, value], dim=-1).flatten(-2)

    def decode(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """tokens (..., 2S) -> (indices (..., S) int64 with -1 for pads, bins (..., S) int64, 0 for pads).

        Raises ValueError for ids outside the vocabulary, an atom id where a bin belongs or the reverse, half-padded
        slots, or a used slot after a pad."""
        if not isinstance(tokens, Tensor) or tokens.is_floating_point() or tokens.is_complex() \
                or tokens.dtype == torch.bool:
            raise TypeError(f"tokens must be an integer tensor, got {getattr(tokens, 'dtype', type(tokens))}")
        if tokens.dim() < 1 or tokens.shape[-1] != self.tokens_per_site:
            raise ValueError(f"tokens must have shape (..., {self.tokens_per_site}) (2 tokens per slot, "
                             f"S={self.sparsity}), got {tuple(tokens.shape)}")
        pairs = tokens.long().unflatten(-1, (self.sparsity, 2))
        atom, value = pairs[..., 0], pairs[..., 1]
        if tokens.numel():
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"token ids must be in [0, {self.vocab_size}) (vocab_size), got values in "
                                 f"[{lo}, {hi}]")
        pad_a, pad_v = atom == self.pad_id, value == self.pad_id
        if not bool(((atom < self.atoms) | pad_a).all()):
            raise ValueError(f"even positions (0, 2, ...) must hold atom ids in [0, {self.atoms}) or the pad "
                             f"{self.pad_id}; found a coefficient-bin id there")
        if not bool(((value >= self.atoms) | pad_v).all()):
            raise ValueError(f"odd positions (1, 3, ...) must hold bin ids in [{self.atoms}, {self.pad_id}) or the "
                             f"pad {self.pad_id}; found an atom id there")
        if not bool((pad_a == pad_v).all()):
            raise ValueError("a slot is half padded: an unused slot is two pad tokens")
        used = ~pad_a
        if self.sparsity > 1 and not bool((used[..., 1:] <= used[..., :-1]).all()):
            raise ValueError("a used slot follows a pad: pads come only after a site's last used slot")
        return torch.where(used, atom, -1), torch.where(used, value - self.atoms, 0)


class TokenGrammar:
    """Which ids may come next in a sequence of sites, for a prior that must only produce decodable sequences.

    For DL tokens (``codec`` given): at a site's even positions an atom id or the pad, at its odd positions a bin id,
    and only pads after a pad inside the site. With ``ranges`` (one (first id, end id) pair per position of a site,
    e.g. the stages of a residual quantizer): the ids of that position's range. Otherwise (VQ indices): any of the
    ``vocab_size`` ids.
    """

    def __init__(self, vocab_size: int, tokens_per_site: int, codec: TokenCodec | None = None,
                 ranges: tuple[tuple[int, int], ...] | None = None) -> None:
        if ranges is not None and (len(ranges) != tokens_per_site or codec is not None
                                   or any(not 0 <= lo < hi <= vocab_size for lo, hi in ranges)):
            raise ValueError(f"ranges must hold one (first, end) pair within [0, {vocab_size}] per token of a site "
                             f"({tokens_per_site}), without a codec; got {ranges!r}")
        if ranges is not None and all(r == (0, vocab_size) for r in ranges):
            ranges = None  # every id everywhere
        self.vocab_size, self.tokens_per_site, self.codec, self.ranges = vocab_size, tokens_per_site, codec, ranges

    @classmethod
    def of(cls, bottleneck) -> TokenGrammar:
        """The grammar of a quantizer's tokens (SparseDictBottleneck with ``coeff_bins``, VectorQuantizer, or any
        quantizer with ``vocab_size``, ``tokens_per_site`` and per-position ``token_ranges``)."""
        if bottleneck.vocab_size is None:
            raise ValueError("this bottleneck has no tokens: build SparseDictBottleneck with coeff_bins (lasers train "
                             "--coeff-bins B) to model its codes with a prior")
        return cls(bottleneck.vocab_size, bottleneck.tokens_per_site, getattr(bottleneck, "codec", None),
                   getattr(bottleneck, "token_ranges", None))

    def _range_mask(self, device: torch.device) -> Tensor:
        """(tokens_per_site, vocab_size) bool: the ids of each position's range."""
        ids = torch.arange(self.vocab_size, device=device)
        lo = torch.tensor([a for a, _ in self.ranges], device=device)
        hi = torch.tensor([b for _, b in self.ranges], device=device)
        return (ids >= lo[:, None]) & (ids < hi[:, None])

    def allowed(self, prev: Tensor, position: Tensor) -> Tensor | None:
        """Mask of the ids allowed at sequence ``position`` (T,) given the token just before it, ``prev`` (..., T)
        (any value where position is 0): bool (..., T, vocab_size), or None when every id is always allowed."""
        if self.ranges is not None:
            mask = self._range_mask(prev.device)[position % self.tokens_per_site]  # (T, V)
            return mask.expand(*prev.shape, self.vocab_size)
        if self.codec is None:
            return None
        c = self.codec
        ids = torch.arange(self.vocab_size, device=prev.device)
        atom_or_pad = (ids < c.atoms) | (ids == c.pad_id)
        bin_only = (ids >= c.atoms) & (ids < c.pad_id)
        pad_only = ids == c.pad_id
        q = position % self.tokens_per_site
        after_pad = ((q > 0) & (prev == c.pad_id)).unsqueeze(-1)
        by_position = torch.where((q % 2 == 0).unsqueeze(-1), atom_or_pad, bin_only)  # (T, V)
        return torch.where(after_pad, pad_only, by_position)

    def check(self, tokens: Tensor) -> None:
        """ValueError unless ``tokens`` (N, T) is a sequence of whole sites of valid tokens."""
        if tokens.dim() != 2 or tokens.shape[1] % self.tokens_per_site:
            raise ValueError(f"token sequences must be (N, T) with T a multiple of {self.tokens_per_site} tokens per "
                             f"site, got {tuple(tokens.shape)}")
        if self.codec is not None:
            self.codec.decode(tokens.reshape(tokens.shape[0], -1, self.tokens_per_site))
        elif self.ranges is not None and tokens.numel():
            sites = tokens.reshape(-1, self.tokens_per_site)
            inside = self._range_mask(tokens.device).gather(1, sites.T.long().clamp(0, self.vocab_size - 1)).T
            if not (bool(inside.all()) and 0 <= int(tokens.min()) and int(tokens.max()) < self.vocab_size):
                raise ValueError(f"token ids must lie in their position's range {list(self.ranges)}")
        elif tokens.numel() and not (0 <= int(tokens.min()) and int(tokens.max()) < self.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.vocab_size})")
