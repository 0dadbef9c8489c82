"""The strong peers: vector-quantize-pytorch's quantizers as bottlenecks of the training tool, beside DL and VQ.

Each peer is wrapped once in an adapter that honours the package's quantizer contract (the one
:class:`~lasers_ext.SparseDictBottleneck` and :class:`~lasers_ext.VectorQuantizer` share), so that ``lasers train``,
``eval``, ``compare``, ``rate-distortion``, ``prior train`` and ``sample`` take them unchanged:

=========  ==============================================================  ==============  ====================
kind       vector-quantize-pytorch module                                  bits / site     tokens / site
=========  ==============================================================  ==============  ====================
``vqp``    ``VectorQuantize`` (EMA codebook, k-means init, dead-code        log2 K          1
           restarts, its rotation-trick gradient)
``rvq``    ``ResidualVQ``: Q stages of ``VectorQuantize``, same options    Q log2 K        Q
``fsq``    ``FSQ`` with levels L_1..L_d                                    sum log2 L_i    d
``lfq``    ``LFQ`` with G groups of log2 K bits (entropy loss 0.1; its     G log2 K        G
           codebook entropy over all processes under torch.distributed)
=========  ==============================================================  ==============  ====================

``forward(z)`` for z (B, C, H, W) returns ``(z_q, loss, info)``: z_q (B, C, H, W) in z's dtype (the quantizers work in
float32), the peer's own loss (commitment; LFQ adds its entropy term; FSQ has none: 0), and a
:class:`~lasers_ext.QuantizerInfo` whose ``info[2]`` holds the stage-2 tokens, (N, T) for N = B H W sites and T tokens
per site ((N,) when T = 1, as VQ; (B, H, W[, T]) with ``sane_index_shape``). The tokens of all slots share one flat
vocabulary, each slot its own range of ids (``token_ranges``: RVQ stage q uses ids q K .. (q+1) K - 1, FSQ dimension i
the L_i ids after those of the dimensions before it), so that an id always means one codeword, usage statistics count
codewords, and a prior's grammar masks each position to its slot. ``info.atom_indices`` are the same ids (``n_e`` of
them: the vocabulary), ``info.perplexity`` and ``info.active_atoms`` their usage. In eval mode z_q is exactly
``get_codebook_entry(info[2].reshape(-1), (B, H, W, C))``; in training mode it is the library's own output (its
straight-through or rotation-trick gradient, the codebook it quantised with).

FSQ and LFQ quantize their latent directly: the latent has one channel per FSQ level or LFQ bit (the encoder's last
1 x 1 convolution and the decoder's first convolution play the role of the library's optional projections), so that
``e_dim`` is ``len(levels)`` or ``G log2 K`` and the tokens decode exactly.

The adapters belong to the training tool; vector-quantize-pytorch (in lasers_ext's ``[train]`` extra) is imported
when one is built.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import numbers
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.distributed.nn as dist_nn
from torch import Tensor, nn

from ..quantizer import QuantizerInfo, check_quantizer_call, straight_through

__all__ = ["PEER_KINDS", "PeerQuantizer", "VQPeer", "RVQPeer", "FSQPeer", "LFQPeer", "build_peer", "parse_levels",
           "lfq_codebook_size", "peer_bits"]

PEER_KINDS = ("vqp", "rvq", "fsq", "lfq")
MAX_LFQ_GROUP_BITS = 16  # LFQ's entropy loss scores every site against all 2^bits codes of a group


def _library():
    try:
        import vector_quantize_pytorch
    except ImportError as err:
        raise ImportError("the strong peers (vqp, rvq, fsq, lfq) need vector-quantize-pytorch, part of lasers_ext's "
                          "[train] extra: pip install vector-quantize-pytorch") from err
    return vector_quantize_pytorch


def _int_at_least(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _finite(name: str, value: object, low: float, high: float | None = None) -> float:
    """A real number in [low, high) (no upper bound when ``high`` is None)."""
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value) and value >= low
          and (high is None or value < high))
    if not ok:
        where = f">= {low}" if high is None else f"in [{low}, {high})"
        raise ValueError(f"{name} must be a finite number {where}, got {value!r}")
    return float(value)


def parse_levels(levels: str | Sequence[int]) -> tuple[int, ...]:
    """FSQ levels from "8,5,5,5" or a sequence of ints; ValueError unless every level is an int >= 3 (FSQ's even
    levels sit off zero, and vector-quantize-pytorch's FSQ takes 2 levels only in another mode, which LFQ covers)."""
    if isinstance(levels, str):
        try:
            values: list = [int(v) for v in levels.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"fsq_levels must be comma-separated ints such as 8,5,5,5, got {levels!r}") from None
    else:
        values = list(levels)
    if not values or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 3 for v in values):
        raise ValueError(f"fsq_levels must be a non-empty list of ints >= 3 (one per latent channel), got {levels!r}")
    return tuple(int(v) for v in values)


def lfq_codebook_size(bits: int, groups: int) -> int:
    """The per-group LFQ codebook size 2^(bits / groups); ValueError unless ``groups`` divides ``bits`` into groups
    of 1..16 bits."""
    bits, groups = _int_at_least("lfq_bits", bits, 1), _int_at_least("lfq_groups", groups, 1)
    if bits % groups:
        raise ValueError(f"lfq_groups ({groups}) must divide lfq_bits ({bits}): every group has the same bits")
    if bits // groups > MAX_LFQ_GROUP_BITS:
        raise ValueError(f"lfq_bits / lfq_groups = {bits // groups} bits per group exceeds {MAX_LFQ_GROUP_BITS}: LFQ's "
                         f"entropy loss scores each site against all 2^{bits // groups} codes of a group; use more "
                         "--lfq-groups")
    return 2 ** (bits // groups)


class PeerQuantizer(nn.Module):
    """What every peer adapter shares: the contract's checks, layouts, tokens, usage statistics and decoding.

    A subclass sets ``kind``, ``e_dim``, ``token_ranges`` (one (first id, end id) pair per token slot of a site, the
    ranges adjacent from 0) and ``bits_per_site``, and implements ``_quantize(sites)`` -- sites (B, N, e_dim) float32
    -> (quantised sites (B, N, e_dim) carrying the library's gradient, tokens (B, N, T) int64 in their slots' ranges,
    the library's loss, 0-dim) -- and ``_decode(tokens)`` -- (M, T) -> (M, e_dim) float32, the codewords the tokens
    stand for, computed the same way in forward (eval mode) and in :meth:`get_codebook_entry`.
    """

    kind: str
    e_dim: int
    bits_per_site: float
    token_ranges: tuple[tuple[int, int], ...]

    def __init__(self, sane_index_shape: bool = False) -> None:
        super().__init__()
        if not isinstance(sane_index_shape, bool):
            raise TypeError(f"sane_index_shape must be True or False, got {sane_index_shape!r}")
        self.sane_index_shape = sane_index_shape

    @property
    def vocab_size(self) -> int:
        """Token ids in the flat vocabulary (the end of the last slot's range)."""
        return self.token_ranges[-1][1]

    @property
    def n_e(self) -> int:
        """Distinct code ids in ``info.atom_indices`` (the usage statistics' histogram size): the vocabulary."""
        return self.vocab_size

    @property
    def tokens_per_site(self) -> int:
        return len(self.token_ranges)

    def _offsets(self, device: torch.device) -> Tensor:
        return torch.tensor([lo for lo, _ in self.token_ranges], dtype=torch.long, device=device)

    def codewords(self) -> Tensor | None:
        """The explicit codewords (n, e_dim) for pictures, or None for an implicit codebook (FSQ, LFQ)."""
        return None

    def _quantize(self, sites: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def _decode(self, tokens: Tensor) -> Tensor:
        raise NotImplementedError

    def slot_codewords(self) -> Tensor:
        """What each token of a site adds to its latent: (T, K, e_dim) float32, K the widest slot's range, zero past
        a slot's end; a site decodes (as :meth:`_decode`) to the sum over slots j of [j, token_j - slot j's first id].
        Stage 2's spatial-depth prior reads the peers' codes through it."""
        raise NotImplementedError

    def forward(self, z: Tensor, temp=None, rescale_logits: bool = False, return_logits: bool = False):
        check_quantizer_call(z, self.e_dim, temp, rescale_logits, return_logits)
        if z.numel() and not bool(torch.isfinite(z).all()):
            raise ValueError("z contains NaN or Inf")
        b, c, h, w = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            sites = z.permute(0, 2, 3, 1).reshape(b, h * w, c).float()
            out, tokens, loss = self._quantize(sites)
            tokens = tokens.reshape(-1, self.tokens_per_site)
            if not self.training:  # exactly what the tokens decode to, with the library's gradient
                out = straight_through(out.reshape(-1, c), self._decode(tokens))
        z_q = out.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous().to(z.dtype)
        stats = self._usage(tokens)
        if self.tokens_per_site == 1:
            tokens = tokens[:, 0]  # taming's (N,) layout, as VQ
        if self.sane_index_shape:
            tokens = tokens.reshape(b, h, w, *tokens.shape[1:])
        info = QuantizerInfo(stats.pop("perplexity"), None, tokens, atom_indices=tokens,
                             coeffs=torch.ones_like(tokens, dtype=z.dtype), **stats)
        return z_q, loss.reshape(()).to(z.dtype), info

    @torch.no_grad()
    def _usage(self, tokens: Tensor) -> dict[str, Tensor]:
        """Perplexity (exp of the entropy of the id histogram), active and dead ids, as 0-dim tensors."""
        counts = torch.zeros(self.n_e, dtype=torch.float32, device=tokens.device)
        counts.index_add_(0, tokens.reshape(-1), torch.ones(tokens.numel(), device=tokens.device))
        p = counts / counts.sum().clamp_min(1.0)
        active = (counts > 0).sum()
        return {"perplexity": torch.exp(-(p * torch.log(p + 1e-10)).sum()), "active_atoms": active,
                "dead_atoms": self.n_e - active}

    def check_tokens(self, tokens: Tensor) -> Tensor:
        """``tokens`` (..., T) as int64 after checking that each slot's ids lie in its range; ValueError otherwise."""
        if not isinstance(tokens, Tensor) or tokens.is_floating_point() or tokens.is_complex() \
                or tokens.dtype == torch.bool:
            raise TypeError(f"tokens must be an integer tensor, got {getattr(tokens, 'dtype', type(tokens))}")
        tokens = tokens.long()
        if tokens.numel():
            lo = torch.tensor([a for a, _ in self.token_ranges], device=tokens.device)
            hi = torch.tensor([e for _, e in self.token_ranges], device=tokens.device)
            if not bool(((tokens >= lo) & (tokens < hi)).all()):
                raise ValueError(f"token ids must lie in their slot's range {list(self.token_ranges)} (slot = "
                                 f"position within a site of {self.tokens_per_site} tokens)")
        return tokens

    def get_codebook_entry(self, indices: Tensor, shape: tuple[int, int, int, int] | None) -> Tensor:
        """Tokens -> latents, taming's call: ``indices`` as in ``info[2]`` -- (..., T) sites, or flat (a multiple of T
        ids) with ``shape`` -- and ``shape`` taming's (B, H, W, C) of the latent, giving (B, C, H, W) float32, exactly
        the eval-mode forward's z_q; None gives the sites' layout + (C,)."""
        t = self.tokens_per_site
        if not isinstance(indices, Tensor):
            raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
        if shape is not None or t == 1 or indices.dim() <= 1:
            if indices.numel() % t:
                raise ValueError(f"a token sequence holds {t} tokens per site; got {indices.numel()} tokens")
            site_shape = indices.shape if t == 1 and shape is None else (indices.numel() // t,)
            flat = indices.reshape(-1, t)
        else:
            if indices.shape[-1] != t:
                raise ValueError(f"indices must have the {t} tokens of a site as their last dimension, got "
                                 f"{tuple(indices.shape)}")
            site_shape, flat = indices.shape[:-1], indices.reshape(-1, t)
        sites = self._decode(self.check_tokens(flat))
        if shape is None:
            return sites.reshape(*site_shape, self.e_dim)
        b, h, w, c = shape
        if c != self.e_dim or flat.shape[0] != b * h * w:
            raise ValueError(f"shape must be (B, H, W, {self.e_dim}) with B*H*W = {flat.shape[0]} sites, got "
                             f"{tuple(shape)}")
        return sites.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()

    embed_code = get_codebook_entry


def _vq_options(decay: float, kmeans_init: bool, threshold_ema_dead_code: float, beta: float) -> dict:
    if not isinstance(kmeans_init, bool):
        raise TypeError(f"kmeans_init must be True or False, got {kmeans_init!r}")
    return {"decay": _finite("decay", decay, 0.0, 1.0), "kmeans_init": kmeans_init,
            "threshold_ema_dead_code": _finite("threshold_ema_dead_code", threshold_ema_dead_code, 0.0),
            "commitment_weight": _finite("beta", beta, 0.0)}


class VQPeer(PeerQuantizer):
    """vector-quantize-pytorch's ``VectorQuantize``: K codewords of e_dim, EMA updates (``decay``), k-means
    initialisation on the first training batch, codewords used less than ``threshold_ema_dead_code`` (EMA count)
    restarted from the batch, commitment loss beta ||z - sg[z_q]||^2, the library's default rotation-trick gradient.
    Under torch.distributed its statistics and k-means are synchronised by the library. Rate log2 K bits per site."""

    kind = "vqp"

    def __init__(self, e_dim: int, codebook_size: int, *, beta: float = 0.25, decay: float = 0.8,
                 kmeans_init: bool = True, threshold_ema_dead_code: float = 2.0,
                 sane_index_shape: bool = False) -> None:
        super().__init__(sane_index_shape)
        self.e_dim = _int_at_least("e_dim", e_dim, 1)
        self.codebook_size = _int_at_least("codebook_size", codebook_size, 2)
        self.options = _vq_options(decay, kmeans_init, threshold_ema_dead_code, beta)
        self.vq = _library().VectorQuantize(dim=self.e_dim, codebook_size=self.codebook_size, **self.options)
        self.token_ranges = ((0, self.codebook_size),)
        self.bits_per_site = math.log2(self.codebook_size)

    def extra_repr(self) -> str:
        return f"e_dim={self.e_dim}, codebook_size={self.codebook_size}, " + \
            ", ".join(f"{k}={v}" for k, v in self.options.items())

    def codewords(self) -> Tensor:
        return self.vq.codebook.detach()

    def _quantize(self, sites: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out, indices, loss = self.vq(sites)
        return out, indices.unsqueeze(-1), loss

    def _decode(self, tokens: Tensor) -> Tensor:
        return self.vq.codebook.detach().float()[tokens[:, 0]]

    def slot_codewords(self) -> Tensor:
        return self.vq.codebook.detach().float()[None].clone()


class RVQPeer(PeerQuantizer):
    """vector-quantize-pytorch's ``ResidualVQ``: ``num_quantizers`` stages of ``VectorQuantize`` (K codewords each,
    the options of :class:`VQPeer`), each coding the residual the stages before it left; the loss is the sum of the
    stages' commitment losses. Rate Q log2 K bits per site; token q of a site is stage q's codeword id + q K."""

    kind = "rvq"

    def __init__(self, e_dim: int, codebook_size: int, num_quantizers: int, *, beta: float = 0.25,
                 decay: float = 0.8, kmeans_init: bool = True, threshold_ema_dead_code: float = 2.0,
                 sane_index_shape: bool = False) -> None:
        super().__init__(sane_index_shape)
        self.e_dim = _int_at_least("e_dim", e_dim, 1)
        self.codebook_size = _int_at_least("codebook_size", codebook_size, 2)
        self.num_quantizers = _int_at_least("num_quantizers", num_quantizers, 1)
        self.options = _vq_options(decay, kmeans_init, threshold_ema_dead_code, beta)
        self.rvq = _library().ResidualVQ(dim=self.e_dim, codebook_size=self.codebook_size,
                                         num_quantizers=self.num_quantizers, **self.options)
        k = self.codebook_size
        self.token_ranges = tuple((q * k, (q + 1) * k) for q in range(self.num_quantizers))
        self.bits_per_site = self.num_quantizers * math.log2(k)

    def extra_repr(self) -> str:
        return f"e_dim={self.e_dim}, codebook_size={self.codebook_size}, num_quantizers={self.num_quantizers}, " + \
            ", ".join(f"{k}={v}" for k, v in self.options.items())

    def codewords(self) -> Tensor:
        return self.rvq.codebooks.detach().reshape(-1, self.e_dim)

    def _quantize(self, sites: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out, indices, losses = self.rvq(sites)
        return out, indices + self._offsets(sites.device), losses.sum()

    def _decode(self, tokens: Tensor) -> Tensor:
        codebooks = self.rvq.codebooks.detach().float()  # (Q, K, e_dim)
        z = torch.zeros(tokens.shape[0], self.e_dim, device=codebooks.device)
        for q in range(self.num_quantizers):  # stage by stage, as the forward sums them
            z = z + codebooks[q][tokens[:, q] - q * self.codebook_size]
        return z

    def slot_codewords(self) -> Tensor:
        return self.rvq.codebooks.detach().float().clone()


class FSQPeer(PeerQuantizer):
    """vector-quantize-pytorch's ``FSQ`` (finite scalar quantization): latent channel i is bounded and rounded to
    one of ``levels[i]`` values in [-1, 1]; no codebook and no loss. The latent has ``len(levels)`` channels (no
    projections). Rate sum_i log2 L_i bits per site; token i of a site is channel i's level + L_1 + ... + L_{i-1}."""

    kind = "fsq"

    def __init__(self, levels: str | Sequence[int], *, sane_index_shape: bool = False) -> None:
        super().__init__(sane_index_shape)
        self.levels = parse_levels(levels)
        self.e_dim = len(self.levels)
        self.fsq = _library().FSQ(levels=list(self.levels), return_indices=False)  # indices: below, per channel
        ends = torch.tensor(self.levels).cumsum(0).tolist()
        self.token_ranges = tuple((end - n, end) for end, n in zip(ends, self.levels))
        self.bits_per_site = sum(math.log2(n) for n in self.levels)
        self.register_buffer("half_width", torch.tensor([n // 2 for n in self.levels], dtype=torch.float32),
                             persistent=False)

    def extra_repr(self) -> str:
        return f"levels={list(self.levels)}"

    def _quantize(self, sites: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out, _ = self.fsq(sites)
        # codes are k / (L // 2) for integers k: the level index is k + L // 2 (FSQ's own index arithmetic)
        level = torch.round(out.detach() * self.half_width + self.half_width).long()
        return out, level + self._offsets(sites.device), sites.new_zeros(())

    def _decode(self, tokens: Tensor) -> Tensor:
        level = (tokens - self._offsets(tokens.device)).float()
        return (level - self.half_width) / self.half_width

    def slot_codewords(self) -> Tensor:
        widest = max(self.levels)
        out = torch.zeros(self.e_dim, widest, self.e_dim, device=self.half_width.device)
        for i, n in enumerate(self.levels):  # channel i at level l: ((l - h) / h) e_i
            h = self.half_width[i]
            out[i, :n, i] = (torch.arange(n, device=out.device).float() - h) / h
        return out


@contextlib.contextmanager
def _lfq_global_mean():
    """Under torch.distributed, LFQ's codebook entropy must use the batch-average code probabilities of all
    processes. vector-quantize-pytorch (up to 1.32 at least) drops the result of its differentiable all-reduce and
    uses the local average divided by the world size; this swaps in the intended mean for the duration of a forward
    (outside torch.distributed nothing changes)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        yield
        return
    module = importlib.import_module("vector_quantize_pytorch.lookup_free_quantization")
    original = module.maybe_distributed_mean

    def global_mean(t: Tensor) -> Tensor:
        return dist_nn.all_reduce(t) / dist.get_world_size()

    module.maybe_distributed_mean = global_mean
    try:
        yield
    finally:
        module.maybe_distributed_mean = original


class LFQPeer(PeerQuantizer):
    """vector-quantize-pytorch's ``LFQ`` (lookup-free quantization): each latent channel becomes its sign (+-1),
    in ``groups`` groups of log2(codebook_size) channels; the loss is its entropy term (weight
    ``entropy_loss_weight``: low per-site entropy, high codebook entropy) plus beta times its commitment term. The
    latent has groups * log2 K channels. Rate groups * log2 K bits per site; token g is group g's code + g K."""

    kind = "lfq"

    def __init__(self, codebook_size: int, groups: int = 1, *, beta: float = 0.25, entropy_loss_weight: float = 0.1,
                 sane_index_shape: bool = False) -> None:
        super().__init__(sane_index_shape)
        k = _int_at_least("codebook_size", codebook_size, 2)
        if k & (k - 1):
            raise ValueError(f"codebook_size must be a power of two for LFQ (each of its log2 K bits is one latent "
                             f"channel), got {k}")
        self.codebook_size, self.groups = k, _int_at_least("groups", groups, 1)
        self.group_bits = k.bit_length() - 1
        if self.group_bits > MAX_LFQ_GROUP_BITS:
            raise ValueError(f"codebook_size 2^{self.group_bits} exceeds 2^{MAX_LFQ_GROUP_BITS} per group: LFQ's "
                             "entropy loss scores each site against every code of a group; use more groups")
        self.e_dim = self.groups * self.group_bits
        self.beta = _finite("beta", beta, 0.0)
        self.entropy_loss_weight = _finite("entropy_loss_weight", entropy_loss_weight, 0.0)
        self.lfq = _library().LFQ(dim=self.e_dim, codebook_size=k, num_codebooks=self.groups,
                                  entropy_loss_weight=self.entropy_loss_weight, commitment_loss_weight=self.beta)
        self.token_ranges = tuple((g * k, (g + 1) * k) for g in range(self.groups))
        self.bits_per_site = float(self.e_dim)
        # bit j of a group's code is its channel j, most significant first (LFQ's mask)
        self.register_buffer("bit_values", 2 ** torch.arange(self.group_bits - 1, -1, -1), persistent=False)

    def extra_repr(self) -> str:
        return (f"codebook_size={self.codebook_size}, groups={self.groups}, beta={self.beta}, "
                f"entropy_loss_weight={self.entropy_loss_weight}")

    def _quantize(self, sites: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        with _lfq_global_mean():
            out, indices, loss = self.lfq(sites)
        indices = indices.reshape(*sites.shape[:2], self.groups)
        return out, indices + self._offsets(sites.device), loss

    def _decode(self, tokens: Tensor) -> Tensor:
        code = tokens - self._offsets(tokens.device)  # (M, G)
        bits = (code.unsqueeze(-1) & self.bit_values) != 0  # (M, G, bits)
        return (bits.float() * 2 - 1).reshape(tokens.shape[0], self.e_dim)

    def slot_codewords(self) -> Tensor:
        k, b = self.codebook_size, self.group_bits
        signs = ((torch.arange(k, device=self.bit_values.device)[:, None] & self.bit_values) != 0).float() * 2 - 1
        out = torch.zeros(self.groups, k, self.e_dim, device=signs.device)
        for g in range(self.groups):  # group g's code: the signs of its channels g b .. (g + 1) b - 1
            out[g, :, g * b:(g + 1) * b] = signs
        return out


def peer_bits(kind: str, *, n_e: int, rvq_quantizers: int, fsq_levels: str, lfq_bits: int) -> float:
    """Bits per latent site of the peer ``kind`` under these options, without building it (for tables)."""
    if kind == "vqp":
        return math.log2(n_e)
    if kind == "rvq":
        return rvq_quantizers * math.log2(n_e)
    if kind == "fsq":
        return sum(math.log2(n) for n in parse_levels(fsq_levels))
    if kind == "lfq":
        return float(lfq_bits)
    raise ValueError(f"kind must be one of {PEER_KINDS}, got {kind!r}")


def build_peer(kind: str, *, e_dim: int, n_e: int, beta: float, decay: float, kmeans_init: bool,
               threshold_ema_dead_code: float, rvq_quantizers: int, fsq_levels: str, lfq_bits: int,
               lfq_groups: int) -> PeerQuantizer:
    """The adapter of ``kind`` from the training tool's options (``n_e`` is K of vqp and rvq; FSQ and LFQ fix their
    own latent width, ``e_dim`` applies to vqp and rvq)."""
    vq = {"beta": beta, "decay": decay, "kmeans_init": kmeans_init, "threshold_ema_dead_code": threshold_ema_dead_code}
    if kind == "vqp":
        return VQPeer(e_dim, n_e, **vq)
    if kind == "rvq":
        return RVQPeer(e_dim, n_e, rvq_quantizers, **vq)
    if kind == "fsq":
        return FSQPeer(fsq_levels)
    if kind == "lfq":
        return LFQPeer(lfq_codebook_size(lfq_bits, lfq_groups), lfq_groups, beta=beta)
    raise ValueError(f"kind must be one of {PEER_KINDS}, got {kind!r}")
