"""VectorQuantizer: the VQ-VAE/VQ-GAN baseline with the same contract as SparseDictBottleneck.

Gradient mode reproduces taming-transformers' VectorQuantizer2 (nearest codeword by squared distance, the two-term
loss with its ``legacy`` switch, straight-through estimator). EMA mode updates the codebook by exponential moving
averages of assignment counts and sums (van den Oord et al. 2017, appendix; decay 0.99) instead of by gradients; its
loss is then the commitment term beta ||z - sg[z_q]||^2 alone.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .quantizer import (
    QuantizerInfo,
    check_quantizer_call,
    check_quantizer_options,
    codebook_loss,
    resolve_sizes,
    straight_through,
    usage_statistics,
)

__all__ = ["VectorQuantizer"]


class VectorQuantizer(nn.Module):
    """Nearest-codeword quantizer with taming's interface.

    Args:
        n_e, e_dim, beta, remap, unknown_index, sane_index_shape, legacy: as taming's VectorQuantizer2 (and the
            same aliases as :class:`~lasers_ext.SparseDictBottleneck`); only ``remap=None`` is supported.
        ema: update the codebook by exponential moving averages instead of gradients.
        decay: EMA decay (0.99). eps: Laplace smoothing of the EMA cluster sizes.

    ``forward(z)`` returns ``(z_q, loss, info)`` with indices (N,) or, with ``sane_index_shape``, (B, H, W);
    ``info`` also carries ``atom_indices`` (the same), ``coeffs`` (ones) and the usage statistics (``coherence`` of
    the normalised codewords in eval mode only, None in training: a K x K product per step). The indices are
    the stage-2 tokens: ``vocab_size`` = n_e, ``tokens_per_site`` = 1, ``bits_per_site`` = log2 n_e.
    """

    def __init__(
        self,
        n_e: int | None = None,
        e_dim: int | None = None,
        beta: float = 0.25,
        remap: str | None = None,
        unknown_index: str | int = "random",
        sane_index_shape: bool = False,
        legacy: bool = True,
        *,
        ema: bool = False,
        decay: float = 0.99,
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **aliases: int,
    ) -> None:
        super().__init__()
        self.n_e, self.e_dim = resolve_sizes(type(self).__name__, n_e, e_dim, aliases)
        if remap is not None:
            raise NotImplementedError("VectorQuantizer does not support taming's index remapping (remap=None)")
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        check_quantizer_options(beta, legacy)
        self.beta, self.legacy, self.sane_index_shape = float(beta), bool(legacy), bool(sane_index_shape)
        self.remap, self.unknown_index = remap, unknown_index
        self.ema, self.decay, self.eps = bool(ema), float(decay), float(eps)
        self.embedding = nn.Embedding(self.n_e, self.e_dim, device=device, dtype=dtype)
        if self.ema:
            self.embedding.weight.requires_grad_(False)
            self.register_buffer("cluster_size", torch.zeros(self.n_e, device=device, dtype=torch.float32))
            self.register_buffer("embed_avg", torch.zeros(self.n_e, self.e_dim, device=device, dtype=torch.float32))
        self.reset_parameters()

    @property
    def vocab_size(self) -> int:
        return self.n_e

    @property
    def tokens_per_site(self) -> int:
        return 1

    @property
    def bits_per_site(self) -> float:
        return math.log2(self.n_e)

    def reset_parameters(self) -> None:
        """taming's initialisation: uniform(-1/n_e, 1/n_e); EMA statistics start from the codebook."""
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / self.n_e, 1.0 / self.n_e)
            if self.ema:
                self.cluster_size.fill_(1.0)
                self.embed_avg.copy_(self.embedding.weight)

    def extra_repr(self) -> str:
        mode = f"ema=True, decay={self.decay}" if self.ema else "ema=False"
        return f"n_e={self.n_e}, e_dim={self.e_dim}, beta={self.beta}, legacy={self.legacy}, {mode}"

    def forward(self, z: Tensor, temp=None, rescale_logits: bool = False, return_logits: bool = False):
        check_quantizer_call(z, self.e_dim, temp, rescale_logits, return_logits)
        if not torch.compiler.is_compiling() and z.numel() and not bool(torch.isfinite(z).all()):
            raise ValueError("z contains NaN or Inf")  # as SparseDictBottleneck; compiled graphs skip value checks
        b, _, h, w = z.shape
        # the DL bottleneck's dtype rules: float32 inside (float64 for float64 input), outputs in z's dtype
        compute = torch.float64 if z.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=z.device.type, enabled=False):
            z_sites = z.permute(0, 2, 3, 1).reshape(-1, self.e_dim).to(compute)
            weight = self.embedding.weight.to(compute)
            dist_sq = (z_sites**2).sum(1, keepdim=True) + (weight**2).sum(1) - 2 * z_sites @ weight.T
            indices = dist_sq.argmin(1)
            z_q = F.embedding(indices, weight)
            if self.ema and self.training:  # after z_q: this step quantizes with the codebook it was given
                self._ema_update(z_sites.detach(), indices)
            if self.ema:  # the codebook learns by moving averages: the commitment term alone
                loss = self.beta * ((z_q.detach() - z_sites) ** 2).mean()
            else:
                loss = codebook_loss(z_q, z_sites, self.beta, self.legacy)
            z_q = straight_through(z_sites, z_q)
        z_q = z_q.reshape(b, h, w, self.e_dim).permute(0, 3, 1, 2).contiguous().to(z.dtype)
        ones = torch.ones_like(indices, dtype=z.dtype)
        # coherence in eval mode only: its K x K product would cost more than the step at large K (2 s at K = 8192)
        stats = usage_statistics(indices[:, None], ones[:, None], F.normalize(weight.detach(), dim=1),
                                 coherence=not self.training)
        if self.sane_index_shape:
            indices, ones = indices.reshape(b, h, w), ones.reshape(b, h, w)
        return z_q, loss.to(z.dtype), QuantizerInfo(stats.pop("perplexity"), None, indices, atom_indices=indices,
                                                    coeffs=ones, **stats)

    @torch.no_grad()
    def _ema_update(self, z_sites: Tensor, indices: Tensor) -> None:
        """One EMA step. A batch with a NaN or Inf latent (on any rank) leaves the codebook and statistics untouched,
        without a host synchronisation (the forward refuses such input outside torch.compile)."""
        ones = torch.ones_like(indices, dtype=torch.float32)
        counts = torch.zeros(self.n_e + 1, device=z_sites.device).index_add_(0, indices, ones)
        counts[-1] = (~torch.isfinite(z_sites).all()).float()  # rides along in the same all-reduce
        sums = torch.zeros(self.n_e, self.e_dim, device=z_sites.device).index_add_(0, indices, z_sites.float())
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        ok = counts[-1] == 0
        counts = counts[:-1]
        cluster_size = self.cluster_size * self.decay + counts * (1 - self.decay)
        embed_avg = self.embed_avg * self.decay + sums * (1 - self.decay)
        n = cluster_size.sum()
        smoothed = (cluster_size + self.eps) / (n + self.n_e * self.eps) * n
        weight = (embed_avg / smoothed.unsqueeze(1)).to(self.embedding.weight.dtype)
        self.cluster_size.copy_(torch.where(ok, cluster_size, self.cluster_size))
        self.embed_avg.copy_(torch.where(ok, embed_avg, self.embed_avg))
        self.embedding.weight.copy_(torch.where(ok, weight, self.embedding.weight))

    def get_codebook_entry(self, indices: Tensor, shape: tuple[int, int, int, int] | None) -> Tensor:
        """taming's decode: codewords for ``indices``, as (B, C, H, W) for ``shape`` = (B, H, W, C), else
        ``indices.shape + (C,)``."""
        z_q = self.embedding(indices)
        if shape is None:
            return z_q
        b, h, w, c = shape
        if c != self.e_dim or indices.numel() != b * h * w:
            raise ValueError(f"shape must be (B, H, W, {self.e_dim}) with B*H*W = {indices.numel()} indices, got "
                             f"{tuple(shape)}")
        return z_q.reshape(shape).permute(0, 3, 1, 2).contiguous()

    embed_code = get_codebook_entry
