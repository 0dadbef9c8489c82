"""SparseDictBottleneck: a drop-in replacement for taming-transformers' / diffusers' VectorQuantizer.

Each latent site (or non-overlapping patch of sites) is coded as a sparse combination of ``sparsity`` unit-norm atoms
of a learned dictionary by Batch-OMP (:func:`lasers_ext.batch_omp`); the decoder gets z_hat = gamma D through a
straight-through estimator, and the loss adds ||sg[z] - z_hat||^2 and beta ||z - sg[z_hat]||^2 with taming's
``legacy`` switch for which term beta weighs.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .backends import BACKENDS
from .dictionary_init import (
    INIT_MODES,
    kmeanspp_atoms,
    sample_atoms,
    sorted_rows,
    spherical_kmeans,
    unit_rows,
    worst_coded,
)
from .ops import batch_omp, gather_atoms, least_squares_backward, sparse_decode
from .quantizer import (
    QuantizerInfo,
    check_quantizer_call,
    check_quantizer_options,
    codebook_loss,
    resolve_sizes,
    straight_through,
    usage_statistics,
)
from .tokens import QUANTIZER_MODES, CoefficientQuantizer, TokenCodec

__all__ = ["SparseDictBottleneck", "SparseCode", "GRADIENTS", "rotation_trick"]

GRADIENTS = ("straight_through", "exact", "rotation")
INIT_SAMPLES_PER_ATOM = 16  # data-driven initialisation looks at no more than 16 K latent vectors


def rotation_trick(x: Tensor, z_hat: Tensor) -> Tensor:
    """``z_hat`` (N, M) exactly, with the rotation trick's gradient to ``x`` (N, M) (Fifty et al. 2024, "Restructuring
    vector quantization with the rotation trick"): z_hat = s R x with R the rotation taking x's direction e to
    z_hat's direction q in their plane, R = I - 2 r r^T + 2 q e^T (r = (e + q) / ||e + q||), s = ||z_hat|| / ||x||,
    both held constant, so x gets s R^T g for the decoder's gradient g instead of g itself. Rows where x or z_hat is
    zero get the straight-through identity."""
    xd, qd = x.detach(), z_hat.detach()
    tiny = torch.finfo(xd.dtype).tiny
    xn, qn = xd.norm(dim=-1, keepdim=True), qd.norm(dim=-1, keepdim=True)
    ok = (xn > 0) & (qn > 0)
    e, q = xd / xn.clamp_min(tiny), qd / qn.clamp_min(tiny)
    r = F.normalize(e + q, dim=-1, eps=tiny)
    rotated = x - 2 * r * (r * x).sum(-1, keepdim=True) + 2 * q * (e * x).sum(-1, keepdim=True)
    rotated = torch.where(ok, (qn / xn.clamp_min(tiny)) * rotated, x)
    return straight_through(rotated, z_hat)


def _gather_rows(x: Tensor) -> Tensor:
    """The rows x (n_r, M) of every rank, concatenated in rank order (ranks may hold different numbers of rows)."""
    world = dist.get_world_size()
    count = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    padded = x.new_zeros(max(counts), *x.shape[1:])
    padded[:x.shape[0]] = x
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:c] for part, c in zip(parts, counts)])


class SparseCode(torch.autograd.Function):
    """z_hat = sum_s coeffs[:, s] * atoms[indices[:, s]] for Batch-OMP codes (indices, coeffs) of x over ``atoms``.

    Forward: x (N, M) and atoms (K, M, unit norm) in float32/float64, indices (N, S) int64 (-1: unused) and coeffs
    (N, S), the codes of x (quantised or not) -> z_hat (N, M). The codes are inputs without a gradient: the backward
    states how they move with x and the atoms. Default: they are held fixed, so the atoms get the gradient of z_hat
    (implicit dictionary learning) and x the identity (straight-through). With ``exact=True``: coeffs is the
    least-squares fit on the chosen support, i.e. x gets P_T g (P_T projects onto the span of the chosen atoms) and
    the atoms also the part through the fit.
    """

    @staticmethod
    def forward(ctx, x: Tensor, atoms: Tensor, indices: Tensor, coeffs: Tensor, exact: bool) -> Tensor:
        ctx.exact = exact
        ctx.save_for_backward(x, atoms, indices, coeffs)
        return sparse_decode(indices, coeffs, atoms.detach())

    @staticmethod
    def backward(ctx, grad_z_hat: Tensor):
        x, atoms, indices, coeffs = ctx.saved_tensors
        valid = indices >= 0
        flat = indices.clamp(min=0).reshape(-1)
        # codes held fixed: d z_hat / d atom_k = coeff_k
        grad_slots = (coeffs * valid).unsqueeze(-1) * grad_z_hat.unsqueeze(1)  # (N, S, M)
        grad_x = grad_z_hat
        if ctx.exact:
            # the fit also moves with x and the atoms through gamma = (D_T D_T^T)^-1 D_T x
            chosen, _ = gather_atoms(atoms, indices)
            grad_gamma = (chosen @ grad_z_hat.unsqueeze(-1)).squeeze(-1)
            grad_x, grad_chosen = least_squares_backward(x, chosen, valid, coeffs, grad_gamma)
            grad_slots = grad_slots + grad_chosen
        grad_atoms = torch.zeros_like(atoms).index_add_(0, flat, grad_slots.reshape(-1, atoms.shape[1]))
        return grad_x, grad_atoms, None, None, None


class SparseDictBottleneck(nn.Module):
    """Dictionary-learning bottleneck with taming-transformers' VectorQuantizer interface.

    Args:
        n_e: K, the number of atoms (aliases ``n_embed``, ``num_embeddings``).
        e_dim: latent channels C (aliases ``embedding_dim``, ``vq_embed_dim``).
        beta: weight of the commitment term; see ``legacy``.
        remap, unknown_index: taming's index remapping; only ``remap=None`` is supported.
        sane_index_shape: return indices as (B, H', W'[, S]) instead of flat.
        legacy: taming's switch: True weighs the codebook term by beta (taming's default), False the commitment term
            (the paper's ||sg[z]-z_hat||^2 + beta ||z-sg[z_hat]||^2).
        sparsity: S, atoms per site; default min(5, atom dim, n_e) (the paper's 5 where it fits).
        patch_size: P or (P_H, P_W): code non-overlapping P_H x P_W patches of sites; atoms then have
            P_H * P_W * C entries laid out (P_H, P_W, C).
        tol: optional squared-residual early stop per site (see :func:`lasers_ext.batch_omp`).
        exact_gradient: give the encoder the exact least-squares gradient (a projection onto the chosen atoms) instead
            of the straight-through identity; the decoder's gradient then also reaches the dictionary. The same as
            ``gradient="exact"``.
        gradient: the encoder's gradient: ``"straight_through"`` (default: the identity), ``"exact"`` (as
            ``exact_gradient``) or ``"rotation"`` (:func:`rotation_trick`: the decoder's gradient rotated from z_hat's
            direction to z's and scaled by ||z_hat|| / ||z||).
        init: the dictionary's start: ``"random"`` (default, the paper's: Gaussian atoms), ``"sample"`` (a random
            sample of the first training batch's latent vectors, scaled to unit norm) or ``"kmeans"`` (k-means++
            seeding on those vectors with OMP's sign-invariant distance 1 - <x, d>^2, then ``init_iters`` rounds of
            spherical k-means; :mod:`lasers_ext.dictionary_init`). Done once, in the first training forward whose
            batch has a nonzero latent vector, from at most 16 K vectors (drawn with ``init_seed``); under
            torch.distributed from the global batch (all ranks' vectors gathered), decided on rank 0 and broadcast.
            The ``initialised`` buffer records it (a state_dict without it, saved before it existed, counts as
            initialised).
        restart_window: None (default) or W: dead-atom restarts. In each training forward an atom that no code of
            the last W training batches used (all ranks counted) is replaced by one of this batch's worst-coded
            latent vectors (largest squared residual, scaled to unit norm; the worst to the lowest dead atom id),
            under torch.distributed the worst of the global batch, the same choice on every rank. Buffers
            ``idle_steps`` (K,) and ``restarts`` (the running count, also ``info.restarts``). The batch's codes do
            not use dead atoms, so its forward is unchanged; the new atoms take part from the next batch. With
            ``dictionary_update="online"`` their statistics are cleared.
        dictionary_update: ``"gradient"`` (the paper's implicit learning through the caller's optimizer) or
            ``"online"``: the learning-rate-free update of the paper's supplementary section 8 (moving statistics A, B
            and one block-coordinate-descent sweep over the atoms per training forward, all-reduced under
            torch.distributed). The online sweep is a Python loop over atoms and runs outside torch.compile graphs.
        backend: Batch-OMP backend (``"auto"`` picks the fastest for the device).
        coeff_bins: B: quantise the coefficients to B levels in the forward (a straight-through estimator on the
            rounding), so the decoder trains on exactly what the tokens encode, and make the codes tokens for a
            stage-2 prior (see :mod:`lasers_ext.tokens`). None (default): real coefficients, no tokens.
        coeff_quant: ``"uniform"`` or ``"mulaw"`` levels (:class:`~lasers_ext.tokens.CoefficientQuantizer`; its range
            is tracked in training mode and saved in the state_dict).
        coeff_per_slot: one coefficient range per slot (selection depth) instead of one for all: OMP's coefficients
            shrink with the selection order. The tokens keep their format; the order of the slots then carries
            information and ``bits_per_site`` counts the support in order (see :class:`~lasers_ext.TokenCodec`).

    ``forward(z)`` for z (B, C, H, W) returns ``(z_q, loss, info)`` like taming: z_q (B, C, H, W) in z's dtype, loss a
    0-dim tensor, info a :class:`QuantizerInfo` ``(perplexity, None, indices)`` with the codes and usage statistics
    as attributes. Indices are (N,) for S = 1 (exactly taming's) and (N, S) otherwise, N = B H' W' sites;
    ``sane_index_shape`` gives (B, H', W'[, S]). Unused slots hold -1 (see :func:`lasers_ext.batch_omp`).
    ``info.atom_indices`` and ``info.coeffs`` are the codes in that layout.

    With ``coeff_bins``, ``info[2]`` holds tokens instead, (N, 2S) or (B, H', W', 2S), so ``info[2].view(B, -1)`` is
    a stage-2 sequence and ``get_codebook_entry(tokens.reshape(-1), (B, H, W, C))`` returns the forward's z_q exactly
    (eval mode); ``info.bins`` holds the coefficient bins. ``vocab_size``, ``tokens_per_site`` and
    ``bits_per_site`` (log2 C(K, S) + S log2 B, the support as a set; with ``coeff_per_slot`` log2 (K!/(K-S)!) +
    S log2 B, in order) describe the tokens (None without ``coeff_bins``).
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
        sparsity: int | None = None,
        patch_size: int | tuple[int, int] = 1,
        tol: float | None = None,
        exact_gradient: bool = False,
        dictionary_update: str = "gradient",
        backend: str = "auto",
        coeff_bins: int | None = None,
        coeff_quant: str = "uniform",
        coeff_per_slot: bool = False,
        gradient: str | None = None,
        init: str = "random",
        init_iters: int = 10,
        init_seed: int = 0,
        restart_window: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **aliases: int,
    ) -> None:
        super().__init__()
        self.n_e, self.e_dim = resolve_sizes(type(self).__name__, n_e, e_dim, aliases)
        if remap is not None:
            raise NotImplementedError("SparseDictBottleneck does not support taming's index remapping (remap=None)")
        ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        if ph < 1 or pw < 1:
            raise ValueError(f"patch_size must be positive, got {patch_size!r}")
        self.patch_size = (ph, pw)
        atom_dim = ph * pw * self.e_dim
        if sparsity is None:
            sparsity = min(5, atom_dim, self.n_e)
        if not 1 <= sparsity <= min(self.n_e, atom_dim):
            raise ValueError(f"sparsity must be in [1, min(n_e, atom dim)] = [1, {min(self.n_e, atom_dim)}], "
                             f"got {sparsity}")
        check_quantizer_options(beta, legacy)
        if tol is not None and (isinstance(tol, bool) or not isinstance(tol, numbers.Real)
                                or not (math.isfinite(tol) and tol >= 0)):
            raise ValueError(f"tol must be None or a finite number >= 0, got {tol!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.beta, self.legacy, self.sane_index_shape = float(beta), bool(legacy), bool(sane_index_shape)
        self.remap, self.unknown_index = remap, unknown_index
        if gradient is None:
            gradient = "exact" if exact_gradient else "straight_through"
        if gradient not in GRADIENTS:
            raise ValueError(f"gradient must be one of {GRADIENTS}, got {gradient!r}")
        if exact_gradient and gradient != "exact":
            raise ValueError(f"exact_gradient=True is gradient='exact'; it conflicts with gradient={gradient!r}")
        self.gradient = gradient
        self.sparsity, self.tol, self.exact_gradient, self.backend = int(sparsity), tol, gradient == "exact", backend
        if dictionary_update not in ("gradient", "online"):
            raise ValueError(f"dictionary_update must be 'gradient' or 'online', got {dictionary_update!r}")
        if dictionary_update == "online" and self.exact_gradient:
            raise ValueError("exact_gradient trains the dictionary by gradients; it does not combine with 'online'")
        if init not in INIT_MODES:
            raise ValueError(f"init must be one of {INIT_MODES}, got {init!r}")
        for name, value, least in (("init_iters", init_iters, 0), ("init_seed", init_seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        if restart_window is not None and (isinstance(restart_window, bool) or not isinstance(restart_window, int)
                                           or restart_window < 1):
            raise ValueError(f"restart_window must be None or a positive int (training steps), got {restart_window!r}")
        if not isinstance(coeff_per_slot, bool):
            raise TypeError(f"coeff_per_slot must be True or False, got {coeff_per_slot!r}")
        self.init, self.init_iters, self.init_seed, self.restart_window = init, init_iters, init_seed, restart_window
        self.dictionary_update = dictionary_update
        self.embedding = nn.Embedding(self.n_e, atom_dim, device=device, dtype=dtype)
        if dictionary_update == "online":
            self.embedding.weight.requires_grad_(False)
            self.register_buffer("stat_a", torch.zeros(self.n_e, self.n_e, device=device))  # A = sum gamma gamma^T
            self.register_buffer("stat_b", torch.zeros(self.n_e, atom_dim, device=device))  # B^T = sum gamma z^T
            self.register_buffer("online_steps", torch.zeros((), dtype=torch.long, device=device))
        if init != "random":
            self.register_buffer("initialised", torch.zeros((), dtype=torch.bool, device=device))
        if restart_window is not None:
            self.register_buffer("idle_steps", torch.zeros(self.n_e, dtype=torch.long, device=device))
            self.register_buffer("restarts", torch.zeros((), dtype=torch.long, device=device))
        if coeff_quant not in QUANTIZER_MODES:
            raise ValueError(f"coeff_quant must be one of {QUANTIZER_MODES}, got {coeff_quant!r}")
        self.coeff_quantizer: CoefficientQuantizer | None = None
        self.codec: TokenCodec | None = None
        self.coeff_per_slot = coeff_per_slot
        if coeff_bins is not None:
            self.coeff_quantizer = CoefficientQuantizer(coeff_bins, coeff_quant, device=device,
                                                        slots=self.sparsity if coeff_per_slot else None)
            self.codec = TokenCodec(self.n_e, coeff_bins, self.sparsity, ordered=coeff_per_slot)
        self.reset_parameters()

    @property
    def vocab_size(self) -> int | None:
        """Token ids per position (K + B + 1) with ``coeff_bins``, else None."""
        return None if self.codec is None else self.codec.vocab_size

    @property
    def tokens_per_site(self) -> int | None:
        """Tokens per coded site (2S) with ``coeff_bins``, else None."""
        return None if self.codec is None else self.codec.tokens_per_site

    @property
    def bits_per_site(self) -> float | None:
        """Bits per coded site with ``coeff_bins`` (the codec's count, ``codec.support`` says how), else None."""
        return None if self.codec is None else self.codec.bits_per_site

    def reset_parameters(self) -> None:
        """Gaussian atoms scaled to unit norm; online statistics, initialisation and restart records cleared."""
        with torch.no_grad():
            self.embedding.weight.normal_()
            self.embedding.weight.div_(self.embedding.weight.norm(dim=1, keepdim=True).clamp_min(1e-12))
            if self.dictionary_update == "online":
                self.stat_a.zero_()
                self.stat_b.zero_()
                self.online_steps.zero_()
            if self.init != "random":
                self.initialised.zero_()
            if self.restart_window is not None:
                self.idle_steps.zero_()
                self.restarts.zero_()

    def extra_repr(self) -> str:
        levers = "".join(f", {k}={v!r}" for k, v, default in (
            ("init", self.init, "random"), ("restart_window", self.restart_window, None),
            ("coeff_per_slot", self.coeff_per_slot, False)) if v != default)
        return (f"n_e={self.n_e}, e_dim={self.e_dim}, sparsity={self.sparsity}, patch_size={self.patch_size}, "
                f"beta={self.beta}, legacy={self.legacy}, gradient={self.gradient!r}, "
                f"dictionary_update={self.dictionary_update!r}{levers}")  # coeff_quantizer shows as a child module

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """A state saved without the initialisation or restart records (before they existed, or with the lever
        off) loads: its dictionary counts as initialised, its atoms as just used."""
        weight = state_dict.get(prefix + "embedding.weight")
        if weight is not None:
            if self.init != "random":
                state_dict.setdefault(prefix + "initialised", torch.ones((), dtype=torch.bool))
            if self.restart_window is not None:
                state_dict.setdefault(prefix + "idle_steps", torch.zeros(self.n_e, dtype=torch.long))
                state_dict.setdefault(prefix + "restarts", torch.zeros((), dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def atoms(self) -> Tensor:
        """The dictionary with unit-norm rows (K, P_H * P_W * C), as forward uses it; zero rows stay zero."""
        return F.normalize(self.embedding.weight, dim=1, eps=1e-12)

    def _to_sites(self, z: Tensor) -> Tensor:
        b, c, h, w = z.shape
        ph, pw = self.patch_size
        z = z.reshape(b, c, h // ph, ph, w // pw, pw).permute(0, 2, 4, 3, 5, 1)  # (B, H', W', P_H, P_W, C)
        return z.reshape(-1, ph * pw * c)

    def _from_sites(self, sites: Tensor, b: int, h: int, w: int) -> Tensor:
        ph, pw = self.patch_size
        z = sites.reshape(b, h // ph, w // pw, ph, pw, self.e_dim).permute(0, 5, 1, 3, 2, 4)
        return z.reshape(b, self.e_dim, h, w).contiguous()  # channels-first memory, as the decoder expects

    def forward(self, z: Tensor, temp=None, rescale_logits: bool = False, return_logits: bool = False):
        check_quantizer_call(z, self.e_dim, temp, rescale_logits, return_logits)
        ph, pw = self.patch_size
        if z.shape[2] % ph or z.shape[3] % pw:
            raise ValueError(f"latent height and width {tuple(z.shape[2:])} must be divisible by the patch size "
                             f"{self.patch_size}")
        b, _, h, w = z.shape
        compute = torch.float64 if z.dtype == torch.float64 else torch.float32  # half types are coded in float32
        with torch.autocast(device_type=z.device.type, enabled=False):
            x = self._to_sites(z.to(compute))
            if self.training and self.init != "random":
                self._initialise(x.detach())
            with torch.no_grad():
                coding_atoms = self.atoms().to(compute)
            indices, coeffs = batch_omp(x.detach(), coding_atoms, self.sparsity, tol=self.tol, backend=self.backend)
            if self.training and self.restart_window is not None:
                self._restart_dead_atoms(x.detach(), indices, coeffs, coding_atoms)
            atoms = self.atoms().to(compute)  # after any restart: the codes use no restarted atom
            bins = None
            if self.coeff_quantizer is not None:
                if self.training:  # fitted by now, or no slot is used yet and no level is looked at
                    self.coeff_quantizer.observe(coeffs, indices >= 0)
                else:
                    self.coeff_quantizer.check_fitted()
                bins = self.coeff_quantizer._bins_of(coeffs)
                coeffs = self._dequantize(indices, bins, compute)
            z_hat = SparseCode.apply(x if self.exact_gradient else x.detach(), atoms, indices, coeffs,
                                     self.exact_gradient)
            if self.exact_gradient:
                z_q = z_hat  # the decoder's gradient reaches z through P_T and the atoms through the fit
                z_hat = sparse_decode(indices, coeffs, atoms)  # the loss sees the codes held fixed in both modes
            elif self.gradient == "rotation":
                z_q = rotation_trick(x, z_hat)
            else:
                z_q = straight_through(x, z_hat)
            loss = codebook_loss(z_hat, x, self.beta, self.legacy)
            stats = usage_statistics(indices, coeffs, atoms)
            if self.dictionary_update == "online" and self.training:
                self._online_update(x.detach(), indices, coeffs)
        z_q = self._from_sites(z_q, b, h, w).to(z.dtype)
        sites = (b, h // self.patch_size[0], w // self.patch_size[1])
        codes = {"atom_indices": indices, "coeffs": coeffs.to(z.dtype)}
        if self.restart_window is not None:
            stats["restarts"] = self.restarts.clone()
        if bins is not None:
            codes["bins"] = bins
        tokens = None if bins is None else self.codec._pack(indices, bins)  # (N, 2S): taming's info[2] in stage 2
        if self.sparsity == 1:  # taming's (N,) layout
            codes = {k: v[:, 0] for k, v in codes.items()}

        def layout(v: Tensor) -> Tensor:
            return v.reshape(*sites, *v.shape[1:]) if self.sane_index_shape else v

        codes = {k: layout(v) for k, v in codes.items()}
        third = codes["atom_indices"] if tokens is None else layout(tokens)
        info = QuantizerInfo(stats.pop("perplexity"), None, third, **codes, **stats)
        return z_q, loss.to(z.dtype), info

    @torch.compiler.disable
    @torch.no_grad()
    def _initialise(self, x: Tensor) -> None:
        """The data-driven start (``init``), once, from the sites x (N, M) of this batch, all ranks' sites under
        torch.distributed (gathered in rank order, as one process would see the global batch): computed on rank 0
        and broadcast."""
        if bool(self.initialised):
            return
        weight = self.embedding.weight
        ddp = dist.is_available() and dist.is_initialized()
        if ddp:
            x = _gather_rows(x)
        atoms = torch.zeros_like(weight)
        done = torch.zeros((), dtype=torch.long, device=weight.device)
        if not ddp or dist.get_rank() == 0:
            generator = torch.Generator().manual_seed(self.init_seed)
            rows = sorted_rows(unit_rows(x.to(torch.float64).cpu()))  # the same draws in any order of the sites
            limit = INIT_SAMPLES_PER_ATOM * self.n_e
            if rows.shape[0] > limit:
                rows = rows[torch.randperm(rows.shape[0], generator=generator)[:limit]]
            if rows.shape[0]:
                if self.init == "sample":
                    new = sample_atoms(rows, self.n_e, generator)
                else:
                    new = spherical_kmeans(rows, kmeanspp_atoms(rows, self.n_e, generator), self.init_iters)
                atoms.copy_(new)
                done.fill_(1)
        if ddp:
            dist.broadcast(atoms, 0)
            dist.broadcast(done, 0)
        if bool(done):
            weight.copy_(atoms)
            self.initialised.fill_(True)
            if self.dictionary_update == "online":
                self.stat_a.zero_()
                self.stat_b.zero_()

    @torch.compiler.disable
    @torch.no_grad()
    def _restart_dead_atoms(self, x: Tensor, indices: Tensor, coeffs: Tensor, atoms: Tensor) -> None:
        """Counts this batch's atom usage (all ranks) into ``idle_steps`` and replaces the atoms idle for
        ``restart_window`` batches by the worst-coded sites of x (N, M) under their codes (indices, coeffs) over
        ``atoms``. Under torch.distributed each rank offers its worst sites and every rank picks the same ones from
        all offers, in the order one process would on the global batch (rank order breaks ties)."""
        used = torch.zeros(self.n_e, dtype=torch.long, device=indices.device)
        used.index_add_(0, indices.clamp(min=0).reshape(-1), (indices >= 0).reshape(-1).long())
        ddp = dist.is_available() and dist.is_initialized()
        if ddp:
            dist.all_reduce(used)
        self.idle_steps.copy_(torch.where(used > 0, 0, self.idle_steps + 1))
        dead = torch.nonzero(self.idle_steps >= self.restart_window).squeeze(1)  # the same on every rank
        if dead.numel() == 0:
            return
        d = dead.numel()
        residual, pick = worst_coded(x, sparse_decode(indices, coeffs, atoms), d)
        offered = torch.full((d,), -1.0, dtype=residual.dtype, device=x.device)  # -1: no vector offered
        offered[:pick.numel()] = residual
        rows = torch.zeros(d, x.shape[1], dtype=x.dtype, device=x.device)
        rows[:pick.numel()] = x[pick]
        if ddp:
            offered, rows = _gather_rows(offered.unsqueeze(1)).squeeze(1), _gather_rows(rows)
        order = torch.sort(offered, descending=True, stable=True).indices[:d]
        order = order[offered[order] > 0]
        n = order.numel()
        ids = dead[:n]
        weight = self.embedding.weight
        weight[ids] = F.normalize(rows[order], dim=1).to(weight.dtype)
        self.idle_steps[ids] = 0
        self.restarts += n
        if self.dictionary_update == "online":
            self.stat_a[ids] = 0
            self.stat_a[:, ids] = 0
            self.stat_b[ids] = 0

    def _dequantize(self, indices: Tensor, bins: Tensor, dtype: torch.dtype) -> Tensor:
        """The coefficients that bins stand for, 0 in unused slots: one definition for forward and decoding."""
        return torch.where(indices >= 0, self.coeff_quantizer._levels_of(bins).to(dtype), 0.0)

    @torch.compiler.disable
    @torch.no_grad()
    def _online_update(self, x: Tensor, indices: Tensor, coeffs: Tensor) -> None:
        """Supplementary section 8: A = b A + gamma gamma^T, B = b B + z gamma^T (eqs. 23-26, summed over the batch
        and all-reduced across processes), then one block-coordinate-descent sweep over the atoms (eqs. 27-28)."""
        k, m = self.stat_b.shape
        valid = indices >= 0
        idx = indices.clamp(min=0)
        c = (coeffs * valid).to(self.stat_a.dtype)
        pairs = (idx.unsqueeze(2) * k + idx.unsqueeze(1)).reshape(-1)
        products = (c.unsqueeze(2) * c.unsqueeze(1)).reshape(-1)
        batch_a = torch.zeros_like(self.stat_a).view(-1).index_add_(0, pairs, products)
        slots = (c.unsqueeze(2) * x.to(c.dtype).unsqueeze(1)).reshape(-1, m)
        batch_b = torch.zeros_like(self.stat_b).index_add_(0, idx.reshape(-1), slots)
        xi = torch.full((), float(x.shape[0]), dtype=torch.float64, device=x.device)  # sites in this step (all ranks)
        if dist.is_available() and dist.is_initialized():
            for stat in (batch_a, batch_b, xi):
                dist.all_reduce(stat)
        self.online_steps += 1
        t = self.online_steps.to(torch.float64)
        theta = torch.where(t < xi, t * xi, xi * xi + t - xi)  # eq. 26, as tensors: no host synchronisation
        forget = ((theta + 1 - xi) / (theta + 1)).to(self.stat_a.dtype)
        self.stat_a.mul_(forget).add_(batch_a.view(k, k))
        self.stat_b.mul_(forget).add_(batch_b)
        weight = self.atoms().to(self.stat_a.dtype)
        a = self.stat_a
        for j in range(k):  # sequential: each atom sees the ones updated before it
            ajj = a[j, j]
            atom = (self.stat_b[j] - a[:, j] @ weight + ajj * weight[j]) / ajj.clamp_min(1e-12)
            # an atom that no code has used (A_jj = 0) keeps its value; no host sync for the test
            weight[j] = torch.where(ajj > 0, atom / atom.norm().clamp_min(1e-12), weight[j])
        self.embedding.weight.copy_(weight)

    def get_codebook_entry(self, indices: Tensor, shape: tuple[int, int, int, int] | None,
                           coeffs: Tensor | None = None) -> Tensor:
        """Decodes codes to latents, taming's call. ``shape`` is taming's (B, H, W, C) of the latent, giving
        (B, C, H, W), or None for one decoded site per code: the sites' layout + (atom dim,).

        With ``coeff_bins`` and no ``coeffs``, ``indices`` are tokens as in ``info[2]``: (..., 2S), or flat (any
        length that is a multiple of 2S) when ``shape`` is given; the result is exactly the forward's z_q (eval mode).
        Otherwise ``indices``/``coeffs`` are atom indices and coefficients as in ``info.atom_indices``/``info.coeffs``
        (any layout of sites, S last for S > 1); ``coeffs=None`` is then allowed for S = 1 only and means
        coefficient 1 (the unit atom itself, like VQ): without tokens, a site's indices alone do not give its latent
        when S > 1."""
        s = self.sparsity
        if not isinstance(indices, Tensor):
            raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
        if coeffs is None and self.codec is not None:
            width = self.codec.tokens_per_site
            if shape is not None or indices.dim() <= 1:
                if indices.numel() % width:
                    raise ValueError(f"a token sequence holds {width} tokens per site (2S, S={s}); got "
                                     f"{indices.numel()} tokens")
                indices = indices.reshape(-1, width)
            idx, bins = self.codec.decode(indices)
            self.coeff_quantizer.check_fitted()
            site_shape = idx.shape[:-1]
            idx = idx.reshape(-1, s)
            cf = self._dequantize(idx, bins.reshape(-1, s), self.embedding.weight.dtype)
        else:
            if coeffs is None:
                if s != 1:
                    raise ValueError("coeffs are required to decode sparse codes with sparsity > 1 (or tokens, with "
                                     "coeff_bins)")
                coeffs = torch.ones(indices.shape, dtype=self.embedding.weight.dtype, device=indices.device)
            if coeffs.shape != indices.shape:
                raise ValueError(f"indices and coeffs must have the same shape, got {tuple(indices.shape)} and "
                                 f"{tuple(coeffs.shape)}")
            if s > 1 and (indices.dim() < 1 or indices.shape[-1] != s):
                raise ValueError(f"indices must have the sparsity S={s} as their last dimension, got "
                                 f"{tuple(indices.shape)}")
            site_shape = indices.shape[:-1] if s > 1 else indices.shape
            idx, cf = indices.reshape(-1, s), coeffs.reshape(-1, s).to(self.embedding.weight.dtype)
        sites = sparse_decode(idx, cf, self.atoms())
        if shape is None:
            return sites.reshape(*site_shape, sites.shape[-1])
        b, h, w, c = shape
        ph, pw = self.patch_size
        if c != self.e_dim or h % ph or w % pw:
            raise ValueError(f"shape must be (B, H, W, {self.e_dim}) with H, W divisible by the patch size "
                             f"{self.patch_size}, got {tuple(shape)}")
        if idx.shape[0] != b * (h // ph) * (w // pw):
            raise ValueError(f"shape {tuple(shape)} holds {b * (h // ph) * (w // pw)} coded sites but the codes "
                             f"given hold {idx.shape[0]}")
        return self._from_sites(sites, b, h, w)

    embed_code = get_codebook_entry
