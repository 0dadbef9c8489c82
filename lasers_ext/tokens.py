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
import warnings

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .quantizer import straight_through

__all__ = ["CoefficientQuantizer", "TokenCodec", "TokenGrammar", "QUANTIZER_MODES", "MAX_BINS"]

QUANTIZER_MODES = ("uniform", "mulaw", "lloyd")
MAX_BINS = 1 << 24
_NEVER_FITTED = ("CoefficientQuantizer's range was never fitted: train the model (training mode tracks it), call "
                 "fit(coeffs) on sample coefficients, or load a state_dict that has it")


class CoefficientQuantizer(nn.Module):
    """Scalar quantiser of sparse-code coefficients to ``bins`` levels over a fitted range [low, high].

    Modes: ``"uniform"``: B equally spaced levels from ``low`` to ``high`` (both included); ``"mulaw"``: levels equally
    spaced after mu-law companding of the range mapped to [-1, 1], denser near its centre, where most coefficients lie;
    ``"lloyd"``: levels placed by the data (Lloyd-Max: each level the mean of the coefficients nearest to it), kept
    relative to the range (the buffer ``table``, (B,) or (S, B), in [-1, 1]: level = centre + half-width * table, so
    they follow the range as it moves): uniform when the range is first fitted, then in training one moving-average
    Lloyd step per batch (``decay``; sums and counts all-reduced under torch.distributed), or ``lloyd_iters`` full
    Lloyd iterations in :meth:`fit`. Values outside the range go to the end levels. B is at most
    2**24 (:data:`MAX_BINS`): float32 levels beyond that are not told apart.

    ``slots``: None (default) for one range shared by every coefficient, or S for one range per slot (selection
    depth) of codes (..., S): Batch-OMP's coefficients shrink with the selection order, so the later slots get finer
    levels. Bins then mean a level of their slot's range; the buffers have shape (S,).

    The range lives in buffers (``low``, ``high``, ``fitted``; saved in the state_dict): fitted on data by
    :meth:`fit`, or tracked in training mode by :meth:`observe` as an exponential moving average of each batch's
    min and max (``decay``; the first batch with a valid coefficient sets it; all-reduced under torch.distributed).
    Quantising or decoding with a range never fitted raises an error, also under torch.compile (at tracing, and in
    the compiled graph should the range be reset after it). The state_dict also records the scheme (``scheme``:
    bins, mode, mu) and loading a state saved with another scheme is an error: its bins would decode to other levels.
    """

    def __init__(self, bins: int, mode: str = "uniform", *, mu: float = 255.0, decay: float = 0.99,
                 slots: int | None = None, lloyd_iters: int = 30, device: torch.device | str | None = None) -> None:
        super().__init__()
        if isinstance(bins, bool) or not isinstance(bins, int) or not 2 <= bins <= MAX_BINS:
            raise ValueError(f"bins must be an int in [2, 2**24] (float32 levels beyond 2**24 are not told apart), "
                             f"got {bins!r}")
        if mode not in QUANTIZER_MODES:
            raise ValueError(f"mode must be one of {QUANTIZER_MODES}, got {mode!r}")
        for name, value, ok in (("mu", mu, mu > 0), ("decay", decay, 0 <= decay < 1)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or not ok:
                raise ValueError(f"{name} must be a finite number in its range (mu > 0, 0 <= decay < 1), got "
                                 f"{value!r}")
        if slots is not None and (isinstance(slots, bool) or not isinstance(slots, int) or slots < 1):
            raise ValueError(f"slots must be None or a positive int, got {slots!r}")
        self.bins, self.mode, self.mu, self.decay, self.slots = bins, mode, float(mu), float(decay), slots
        shape = () if slots is None else (slots,)
        self.register_buffer("low", torch.full(shape, -1.0, device=device))
        self.register_buffer("high", torch.full(shape, 1.0, device=device))
        self.register_buffer("fitted", torch.zeros(shape, dtype=torch.bool, device=device))
        if isinstance(lloyd_iters, bool) or not isinstance(lloyd_iters, int) or lloyd_iters < 0:
            raise ValueError(f"lloyd_iters must be an int >= 0, got {lloyd_iters!r}")
        self.lloyd_iters = lloyd_iters
        if mode == "lloyd":
            self.register_buffer("table", torch.zeros(*shape, bins, device=device))

    def extra_repr(self) -> str:
        mu = f", mu={self.mu}" if self.mode == "mulaw" else ""
        slots = "" if self.slots is None else f", slots={self.slots}"
        return f"bins={self.bins}, mode={self.mode!r}{mu}, decay={self.decay}{slots}"

    # ------------------------------------------------------------------------------------- the state_dict contract
    @staticmethod
    def _scheme_text(bins: int, mode: str, mu: float, slots: int | None) -> str:
        return (f"bins={bins}, mode={mode!r}" + (f", mu={mu:g}" if mode == "mulaw" else "")
                + (", one range" if slots is None else f", a range per slot ({slots} slots)"))

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "scheme"] = torch.tensor(  # (bins, mode, mu, slots or 0)
            [self.bins, QUANTIZER_MODES.index(self.mode), self.mu, self.slots or 0], dtype=torch.float64,
            device=self.low.device)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        key = prefix + "scheme"
        saved = state_dict.get(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if key in unexpected_keys:
            unexpected_keys.remove(key)
        mine = self._scheme_text(self.bins, self.mode, self.mu, self.slots)
        if saved is None:
            scheme = mine
            warnings.warn(f"the state at '{prefix}' has no record of its coefficient scheme (saved by an older "
                          f"lasers_ext): cannot check that it was saved with {scheme}", UserWarning, stacklevel=2)
            return
        # (bins, mode, mu), before per-slot ranges, or (bins, mode, mu, slots or 0)
        values = saved.tolist() if isinstance(saved, Tensor) and saved.shape in ((3,), (4,)) else None
        if values is None or not 0 <= values[1] < len(QUANTIZER_MODES) or values[1] != int(values[1]):
            error_msgs.append(f"{key}: expected a record (bins, mode, mu, slots), got {saved!r}")
            return
        bins, mode, mu = int(values[0]), QUANTIZER_MODES[int(values[1])], values[2]
        slots = int(values[3]) if len(values) == 4 and values[3] else None
        if (bins, mode, slots) != (self.bins, self.mode, self.slots) or (mode == "mulaw" and mu != self.mu):
            error_msgs.append(f"{prefix}scheme: the state was saved with {self._scheme_text(bins, mode, mu, slots)} "
                              f"but this module has {mine}; its bins would decode to other levels (build the module "
                              f"with the same coeff_bins/coeff_quant/coeff_per_slot)")

    # ----------------------------------------------------------------------------------------------- quantising
    def check_fitted(self) -> None:
        """RuntimeError unless the range was fitted. Under torch.compile: checked when tracing, and in the graph."""
        if torch.compiler.is_compiling():
            if not self._fitted_when_traced():
                raise RuntimeError(_NEVER_FITTED)
            torch._assert_async(self.fitted.all(), _NEVER_FITTED)  # a range reset after compiling
        elif not bool(self.fitted.all()):
            raise RuntimeError(_NEVER_FITTED)

    @torch.compiler.assume_constant_result
    def _fitted_when_traced(self) -> bool:
        return bool(self.fitted.all())

    def _check_slots(self, values: Tensor, name: str) -> None:
        if self.slots is not None and (values.dim() < 1 or values.shape[-1] != self.slots):
            raise ValueError(f"{name} must have the {self.slots} slots as their last dimension (a range per slot), "
                             f"got shape {tuple(values.shape)}")

    def _span(self) -> tuple[Tensor, Tensor]:
        """Centre and half-width of the range (the half-width kept > 0), computed without overflow."""
        half = (self.high / 2 - self.low / 2).clamp_min(torch.finfo(self.low.dtype).tiny)
        return self.low / 2 + self.high / 2, half

    def _levels_of(self, bins: Tensor) -> Tensor:
        """The levels of ``bins`` (int, values in [0, B); (..., S) with per-slot ranges), unchecked: one formula for
        every decode."""
        if self.mode == "lloyd":
            mid, half = self._span()
            if self.slots is None:
                return mid + half * self.table[bins.long()]
            return mid + half * self.table[torch.arange(self.slots, device=bins.device), bins.long()]
        y = (2 * bins.to(torch.float64) - (self.bins - 1)) / (self.bins - 1)  # exact ends -1 and 1, symmetric
        if self.mode == "mulaw":
            y = torch.sign(y) * torch.expm1(y.abs() * math.log1p(self.mu)) / self.mu
        mid, half = self._span()
        return mid + half * y.to(self.low.dtype)

    def _bins_of(self, coeffs: Tensor) -> Tensor:
        """The nearest levels' bins (unchecked; the range as it is)."""
        if self.mode == "lloyd":
            c = coeffs.to(self.low.dtype)
            t = self._relative(c.reshape(-1, self.slots or 1))
            b = self._nearest(t.T.contiguous()).T.reshape(c.shape)
            return torch.where(torch.isnan(c), 0, b)
        mid, half = self._span()
        t = ((coeffs.to(self.low.dtype) - mid) / half).clamp(-1.0, 1.0)
        if self.mode == "mulaw":
            t = torch.sign(t) * torch.log1p(self.mu * t.abs()) / math.log1p(self.mu)
        b = torch.round((t + 1) * ((self.bins - 1) / 2))
        return torch.nan_to_num(b, nan=0.0).clamp(0, self.bins - 1).long()

    def levels(self) -> Tensor:
        """The B values bins decode to, ascending, in the buffers' dtype: (B,), or (S, B) with per-slot ranges."""
        self.check_fitted()
        if self.mode == "lloyd":
            mid, half = self._span()
            return mid.unsqueeze(-1) + half.unsqueeze(-1) * self.table
        b = torch.arange(self.bins, device=self.low.device)
        return self._levels_of(b) if self.slots is None else self._levels_of(b.unsqueeze(1)).T

    def quantize(self, coeffs: Tensor) -> Tensor:
        """Coefficients (any shape, floating; (..., S) with per-slot ranges) -> bins (same shape, int64 in [0, B)),
        the nearest level (in the companded domain for mu-law). NaN maps to bin 0."""
        if not isinstance(coeffs, Tensor) or not coeffs.is_floating_point():
            raise TypeError(f"coeffs must be a floating-point tensor, got {getattr(coeffs, 'dtype', type(coeffs))}")
        self._check_slots(coeffs, "coeffs")
        self.check_fitted()
        return self._bins_of(coeffs)

    def dequantize(self, bins: Tensor) -> Tensor:
        """Bins (int, any shape, values in [0, B); (..., S) with per-slot ranges) -> their levels, same shape, in the
        buffers' dtype."""
        if not isinstance(bins, Tensor) or bins.is_floating_point() or bins.is_complex() or bins.dtype == torch.bool:
            raise TypeError(f"bins must be an integer tensor, got {getattr(bins, 'dtype', type(bins))}")
        self._check_slots(bins, "bins")
        if bins.numel() and not torch.compiler.is_compiling():
            lo, hi = int(bins.min()), int(bins.max())
            if lo < 0 or hi >= self.bins:
                raise ValueError(f"bins must be in [0, {self.bins}), got values in [{lo}, {hi}]")
        self.check_fitted()
        return self._levels_of(bins)

    def forward(self, coeffs: Tensor, valid: Tensor | None = None) -> Tensor:
        """Quantised coefficients with a straight-through gradient (the rounding counts as the identity); in training
        mode the range first tracks the batch (``valid`` masks out unused slots; until a batch has a valid
        coefficient the range stays unfitted and the values are quantised over its initial [-1, 1])."""
        if self.training:
            self._check_slots(coeffs, "coeffs")
            self.observe(coeffs, valid)
            values = self._levels_of(self._bins_of(coeffs))
        else:
            values = self.dequantize(self.quantize(coeffs))
        return straight_through(coeffs, values.to(coeffs.dtype))

    # ------------------------------------------------------------------------------------------ Lloyd-Max levels
    def _rows(self) -> Tensor:
        """The level table as (width, B) rows (width = S, or 1 for a shared range)."""
        return self.table.reshape(self.slots or 1, self.bins)

    def _nearest(self, values: Tensor) -> Tensor:
        """Bins (width, N) of the nearest table levels to values (width, N) (ties to the lower level)."""
        rows = self._rows()
        mids = ((rows[:, 1:] + rows[:, :-1]) / 2).contiguous()
        return torch.searchsorted(mids, values.contiguous())

    def _uniform_rows(self) -> Tensor:
        """Uniform relative levels, (width, B)."""
        y = torch.linspace(-1.0, 1.0, self.bins, dtype=self.low.dtype, device=self.low.device)
        return y.expand(self.slots or 1, self.bins)

    def _relative(self, c: Tensor) -> Tensor:
        """Coefficients c (N, width) relative to their slot's range, clamped to [-1, 1]."""
        mid, half = self._span()
        return ((c - mid.reshape(-1)) / half.reshape(-1)).clamp(-1.0, 1.0)

    def _lloyd_step(self, c: Tensor, keep: Tensor, decay: float, reduce: bool) -> None:
        """One Lloyd step on relative coefficients c (N, width) where ``keep``: each level moves towards the mean of
        the values nearest to it (by 1 - decay; decay 0: onto it); levels without values stay; rows kept sorted.
        ``reduce``: sums and counts all-reduced under torch.distributed."""
        values = c.T.contiguous()
        mask = keep.T
        bins = self._nearest(torch.where(mask, values, 0.0))
        rows = self._rows()
        sums = torch.zeros_like(rows).scatter_add_(1, bins, torch.where(mask, values, 0.0))
        counts = torch.zeros_like(rows).scatter_add_(1, bins, mask.to(rows.dtype))
        if reduce and dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
            dist.all_reduce(counts)
        centroid = sums / counts.clamp_min(1)
        moved = torch.where(counts > 0, decay * rows + (1 - decay) * centroid, rows)
        self.table.copy_(moved.sort(dim=1).values.reshape(self.table.shape))

    @torch.no_grad()
    def observe(self, coeffs: Tensor, valid: Tensor | None = None) -> None:
        """One moving-average step of the range towards this batch's min and max over ``valid`` finite entries
        (no host synchronisation; a batch without any leaves the range as it is). Per-slot ranges: each slot
        tracks its own entries; a slot never seen takes the whole batch's range once any slot has entries."""
        self._check_slots(coeffs, "coeffs")
        width = self.slots or 1
        keep = torch.isfinite(coeffs) if valid is None else valid & torch.isfinite(coeffs)
        c = coeffs.detach().to(self.low.dtype).reshape(-1, width)
        keep = keep.reshape(-1, width)
        lo = torch.where(keep, c, math.inf).amin(0) if c.numel() else c.new_full((width,), math.inf)
        hi = torch.where(keep, c, -math.inf).amax(0) if c.numel() else c.new_full((width,), -math.inf)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(lo, op=dist.ReduceOp.MIN)
            dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        seen = lo <= hi
        fitted = self.fitted.reshape(width)
        update = seen | (~fitted & seen.any())  # a slot seen, or never fitted while another slot was seen
        for buf, batch, whole in ((self.low, lo, lo.amin()), (self.high, hi, hi.amax())):
            flat = buf.reshape(width)
            moved = torch.where(fitted & seen, self.decay * flat + (1 - self.decay) * batch,
                                torch.where(seen, batch, whole))
            buf.copy_(torch.where(update, moved, flat).reshape(buf.shape))
        if self.mode == "lloyd":  # rows fitted just now start uniform over their range, then one Lloyd step
            fresh = (update & ~fitted).unsqueeze(1)
            self.table.copy_(torch.where(fresh, self._uniform_rows(), self._rows()).reshape(self.table.shape))
            self._lloyd_step(self._relative(c), keep, self.decay, reduce=True)
        self.fitted.logical_or_(update.reshape(self.fitted.shape))

    @torch.no_grad()
    def fit(self, coeffs: Tensor, valid: Tensor | None = None, quantile: float = 1.0) -> CoefficientQuantizer:
        """Sets the range from data: the ``1 - quantile`` and ``quantile`` quantiles of the ``valid`` finite
        coefficients (1.0: min and max; e.g. 0.999 clips outliers); per slot with per-slot ranges (a slot without
        data takes the quantiles of all of them). Returns self."""
        if not 0.5 < quantile <= 1.0:
            raise ValueError(f"quantile must be in (0.5, 1], got {quantile}")
        self._check_slots(coeffs, "coeffs")
        width = self.slots or 1
        keep = torch.isfinite(coeffs) if valid is None else valid & torch.isfinite(coeffs)
        c = coeffs.detach().to(self.low.dtype).reshape(-1, width)
        keep = keep.reshape(-1, width)
        if not bool(keep.any()):
            raise ValueError("fit needs at least one valid finite coefficient")
        q = torch.tensor([1 - quantile, quantile], dtype=c.dtype, device=c.device)

        def quantiles(v: Tensor) -> Tensor:
            if v.numel() > 1 << 24:  # torch.quantile's input limit: an evenly spaced subsample
                v = v[torch.linspace(0, v.numel() - 1, 1 << 24, device=v.device).long()]
            return torch.quantile(v, q)

        whole = quantiles(c[keep])
        ranges = torch.stack([quantiles(c[:, j][keep[:, j]]) if bool(keep[:, j].any()) else whole
                              for j in range(width)])  # (width, 2)
        self.low.copy_(ranges[:, 0].reshape(self.low.shape))
        self.high.copy_(ranges[:, 1].reshape(self.high.shape))
        self.fitted.fill_(True)
        if self.mode == "lloyd":
            self.table.copy_(self._uniform_rows().reshape(self.table.shape))
            relative = self._relative(c)
            for _ in range(self.lloyd_iters):
                self._lloyd_step(relative, keep, 0.0, reduce=False)
        return self


class TokenCodec:
    """Sparse codes <-> tokens in one flat vocabulary (see the module docstring) for K atoms, B bins and S slots.

    ``vocab_size`` = K + B + 1, ``pad_id`` = K + B, ``tokens_per_site`` = 2S.

    ``bits_per_site`` counts the distinct codes of S atoms and S bins: when a bin means the same level in every slot
    (``ordered=False``, one coefficient range), the order of the slots carries nothing (the code decodes to the same
    latent in any order, so a rate coder may sort it): the support is a set, log2 C(K, S) + S log2 B bits. When the
    order is informative (``ordered=True``: per-slot ranges, a bin's level depends on its slot): log2 (K! / (K-S)!)
    + S log2 B. ``support`` says which ("set" or "ordered"). Codes that stop early (pads) are not counted apart.
    """

    def __init__(self, atoms: int, bins: int, sparsity: int, ordered: bool = False) -> None:
        for name, value, least in (("atoms", atoms, 1), ("bins", bins, 2), ("sparsity", sparsity, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        if sparsity > atoms:
            raise ValueError(f"sparsity must be <= atoms (S distinct atoms per site), got {sparsity} > {atoms}")
        if not isinstance(ordered, bool):
            raise TypeError(f"ordered must be True or False, got {ordered!r}")
        self.atoms, self.bins, self.sparsity, self.ordered = atoms, bins, sparsity, ordered
        self.pad_id = atoms + bins
        self.vocab_size = atoms + bins + 1
        self.tokens_per_site = 2 * sparsity
        self.support = "ordered" if ordered else "set"
        supports = math.perm(atoms, sparsity) if ordered else math.comb(atoms, sparsity)
        self.bits_per_site = math.log2(supports) + sparsity * math.log2(bins)

    def __repr__(self) -> str:
        return (f"TokenCodec(atoms={self.atoms}, bins={self.bins}, sparsity={self.sparsity}"
                f"{', ordered=True' if self.ordered else ''})")

    def encode(self, indices: Tensor, bins: Tensor) -> Tensor:
        """indices (..., S) int in [-1, K) (-1: unused slot, only after a site's last used one) and bins (..., S) int
        in [0, B) (not looked at in unused slots) -> tokens (..., 2S) int64, always accepted by :meth:`decode`.

        Raises TypeError / ValueError for codes that have no tokens."""
        for name, value in (("indices", indices), ("bins", bins)):
            if not isinstance(value, Tensor) or value.is_floating_point() or value.is_complex() \
                    or value.dtype == torch.bool:
                raise TypeError(f"{name} must be an integer tensor, got {getattr(value, 'dtype', type(value))}")
        if indices.shape != bins.shape or indices.dim() < 1 or indices.shape[-1] != self.sparsity:
            raise ValueError(f"indices and bins must both have shape (..., {self.sparsity}), got "
                             f"{tuple(indices.shape)} and {tuple(bins.shape)}")
        used = indices >= 0
        if indices.numel():
            lo, hi = int(indices.min()), int(indices.max())
            if lo < -1 or hi >= self.atoms:
                raise ValueError(f"atom indices must be in [-1, {self.atoms}) (-1: unused slot), got values in "
                                 f"[{lo}, {hi}]")
            if bool(used.any()):
                b = bins[used]
                lo, hi = int(b.min()), int(b.max())
                if lo < 0 or hi >= self.bins:
                    raise ValueError(f"bins must be in [0, {self.bins}) in used slots, got values in [{lo}, {hi}]")
            if self.sparsity > 1 and not bool((used[..., 1:] <= used[..., :-1]).all()):
                raise ValueError("a used slot comes after an unused slot: unused slots (-1) come only after a "
                                 "site's last used one")
        return self._pack(indices, bins)

    def _pack(self, indices: Tensor, bins: Tensor) -> Tensor:
        """encode without the checks (no host synchronisation), for codes known to be valid (Batch-OMP's)."""
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
