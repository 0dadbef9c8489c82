"""Stage 2, the spatial-depth prior: a causal transformer over an image's latent sites and a small one over the
events inside each site (RQ-Transformer's split, Lee et al. 2022, with the LASER authors' (atom, coefficient) events).

A site's code is a sequence of ``depth`` events (an :class:`EventSpec` says which):

* DL (``SparseDictBottleneck(coeff_bins=B)``): S events, each an atom of K or *stop*, then, for an atom, one of B
  coefficient bins. Atoms already chosen at the site are masked; after a stop the site's remaining events are pads,
  which the prior does not model. Every sample therefore decodes.
* VQ: one event, a code of K, no coefficient. Residual VQ: D events, one codebook per depth, no stop, no mask.

:class:`SpatialDepthPrior` models ``p(site_t | sites < t)`` with the spatial transformer, whose input at a site is a
projection of the previous site's decoded latent (the frozen codebooks and coefficient levels, buffers of the prior)
plus the embeddings of its events, with row and column embeddings and a learned start vector. Given the spatial
state, the depth transformer models the events in order from the cumulative partial reconstructions: event j gives
``p(atom_j | context)`` and then ``p(bin_j | context, atom_j)``. Attention costs (H'W')^2 + H'W' D^2 instead of the
flat prior's (H'W' 2S)^2, and atoms and bins no longer share one softmax.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..bottleneck import SparseDictBottleneck
from ..tokens import TokenCodec
from ..vq import VectorQuantizer
from .peers import PeerQuantizer

__all__ = ["CausalBlock", "EventSpec", "SpatialDepthPrior", "event_spec", "filter_logits", "check_temperature",
           "LAYOUTS"]

LAYOUTS = ("codec", "index")


def check_temperature(temperature: float, name: str = "temperature") -> None:
    """ValueError unless ``temperature`` is a finite number > 0 (tiny values approach greedy decoding)."""
    if isinstance(temperature, bool) or not (isinstance(temperature, (int, float)) and temperature > 0
                                             and math.isfinite(temperature)):
        raise ValueError(f"{name} must be a finite number > 0, got {temperature!r}")


def check_filters(top_k: int, top_p: float) -> None:
    """ValueError unless ``top_k`` is an int >= 0 (0: off) and ``top_p`` a number in (0, 1] (1: off)."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0: off), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1] (1: off), got {top_p!r}")


class CausalBlock(nn.Module):
    """Pre-norm transformer block: causal multi-head self-attention and a 4x GELU MLP, each with a residual (both
    priors use it)."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width),
                                 nn.Dropout(dropout))

    def extra_repr(self) -> str:
        return f"heads={self.heads}, dropout={self.dropout}"

    def forward(self, h: Tensor, cache: list[Tensor] | None = None) -> Tensor:
        """h (B, t, width). With ``cache`` (a list, empty at the first position) the t new positions follow the
        cached ones: their keys and values are appended and they attend to all of them (incremental decoding)."""
        b, t, w = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        past = 0
        if cache is not None:
            if cache:
                past = cache[0].shape[2]
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            cache[:] = [k, v]
        if t > 1 and past:
            raise ValueError("incremental decoding takes one new position at a time")
        a = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, dropout_p=self.dropout if self.training else 0.0)
        h = h + self.proj(a.transpose(1, 2).reshape(b, t, w))
        return h + self.mlp(self.norm2(h))


@dataclasses.dataclass
class EventSpec:
    """What a latent site's code is, as ``depth`` events.

    Fields: ``depth`` D events per site; ``atoms`` K ids per event; ``bins`` B coefficient bins per event (None: no
    coefficient, each event contributes its codeword itself); ``stop``: an event may be *stop* (id K), after which
    the site's events are pads; ``distinct``: an atom appears at most once per site; ``codebooks`` (G, K, M) float,
    G = 1 (one codebook for every depth) or D (one per depth, as residual VQ); ``levels`` (B,) the coefficient
    values of the bins; ``layout`` how an image's tokens hold the events: ``"codec"`` (:class:`TokenCodec`: per site
    ``atom_1, bin_1, ..., pads``) or ``"index"`` (per site D ids, event j's id plus ``offsets[j]``). ``limits``:
    event j takes ids in [0, limits[j]) only (None: all K; FSQ's channels have different numbers of levels);
    ``offsets``: the flat token id of event j's id 0 (None: 0 for every event; the peers' tokens share one vocabulary).
    ``kind`` names the bottleneck in error messages.
    """

    depth: int
    atoms: int
    bins: int | None
    stop: bool
    distinct: bool
    codebooks: Tensor
    levels: Tensor | None = None
    layout: str = "index"
    kind: str = "codes"
    limits: tuple[int, ...] | None = None
    offsets: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("depth", "atoms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.bins is not None and (isinstance(self.bins, bool) or not isinstance(self.bins, int) or self.bins < 2):
            raise ValueError(f"bins must be None or an int >= 2, got {self.bins!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.layout == "codec" and not (self.bins and self.stop and self.distinct):
            raise ValueError("the codec layout holds DL codes: it needs bins, stop and distinct atoms")
        if self.distinct and not self.stop and self.depth > self.atoms:
            raise ValueError(f"{self.depth} distinct atoms per site cannot come from {self.atoms} without a stop")
        for name in ("limits", "offsets"):
            value = getattr(self, name)
            if value is not None:
                value = tuple(value)
                low, high = (1, self.atoms) if name == "limits" else (0, math.inf)
                if len(value) != self.depth or any(isinstance(v, bool) or not isinstance(v, int) for v in value) \
                        or min(value) < low or max(value) > high:
                    raise ValueError(f"{name} must be {self.depth} ints (limits in [1, {self.atoms}], offsets "
                                     f">= 0), got {value!r}")
                if self.layout == "codec":
                    raise ValueError(f"{name} apply to the index layout only")
                setattr(self, name, value)
        cb = self.codebooks
        if not isinstance(cb, Tensor) or cb.dim() != 3 or cb.shape[0] not in (1, self.depth) \
                or cb.shape[1] != self.atoms or not cb.is_floating_point():
            raise ValueError(f"codebooks must be a float tensor (1 or depth={self.depth}, atoms={self.atoms}, M), got "
                             f"{getattr(cb, 'dtype', type(cb))} {tuple(getattr(cb, 'shape', ()))}")
        if (self.levels is None) != (self.bins is None) or (
                self.levels is not None and tuple(self.levels.shape) != (self.bins,)):
            raise ValueError(f"levels must be a ({self.bins},) tensor exactly when bins is given, got "
                             f"{None if self.levels is None else tuple(self.levels.shape)}")

    @property
    def tokens_per_site(self) -> int:
        return 2 * self.depth if self.layout == "codec" else self.depth

    @property
    def stop_id(self) -> int | None:
        """The atom id of a stop (and of the pads after it): K, or None without stops."""
        return self.atoms if self.stop else None

    def signature(self) -> dict:
        """The spec without its tensors: what a trained prior's checkpoint must agree with."""
        return {"kind": self.kind, "depth": self.depth, "atoms": self.atoms, "bins": self.bins, "stop": self.stop,
                "distinct": self.distinct, "codebooks": list(self.codebooks.shape), "layout": self.layout,
                "limits": None if self.limits is None else list(self.limits),
                "offsets": None if self.offsets is None else list(self.offsets)}

    def valid(self, device: torch.device | None = None) -> Tensor:
        """Which atom-or-stop ids each event may take by the spec alone, bool (D, K [+1 with stops])."""
        ids = torch.arange(self.atoms + (1 if self.stop else 0), device=device)
        if self.limits is None:
            return torch.ones(self.depth, ids.numel(), dtype=torch.bool, device=device)
        limit = torch.tensor(self.limits, device=device)[:, None]
        return (ids < limit) | (ids == self.atoms)

    def _offsets(self, device: torch.device) -> Tensor:
        return torch.tensor(self.offsets or (0,) * self.depth, dtype=torch.long, device=device)

    def describe(self) -> str:
        bins = f", {self.bins} coefficient bins" if self.bins else ""
        return f"{self.kind} codes ({self.depth} events per site of {self.atoms} atoms{bins})"

    def _codec(self) -> TokenCodec:
        return TokenCodec(self.atoms, self.bins, self.depth)

    def to_events(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Token sequences (N, T) -> events: atoms (N, L, D) int64 (stop and pads: K) and bins (N, L, D) int64 (0
        where unused). ValueError for tokens that are not codes of this spec (see :meth:`check`)."""
        if tokens.dim() != 2 or tokens.shape[1] % self.tokens_per_site:
            raise ValueError(f"token sequences must be (N, T) with T a multiple of {self.tokens_per_site} tokens per "
                             f"site, got {tuple(tokens.shape)}")
        n = tokens.shape[0]
        if self.layout == "codec":
            idx, bins = self._codec().decode(tokens.reshape(n, -1, 2 * self.depth))
            atoms = torch.where(idx >= 0, idx, self.atoms)
        else:
            atoms = tokens.long().reshape(n, -1, self.depth) - self._offsets(tokens.device)
            bins = torch.zeros_like(atoms)
        self.check(atoms, bins)
        return atoms, bins

    def to_tokens(self, atoms: Tensor, bins: Tensor) -> Tensor:
        """Events (N, L, D) -> token sequences (N, L * tokens_per_site) int64, the inverse of :meth:`to_events`."""
        if self.layout == "codec":
            idx = torch.where(atoms == self.atoms, -1, atoms)
            return self._codec().encode(idx, bins).flatten(1)
        return (atoms.long() + self._offsets(atoms.device)).flatten(1)

    def check(self, atoms: Tensor, bins: Tensor) -> None:
        """ValueError unless atoms and bins (N, L, D) are codes this spec allows: ids in range, stops only where
        allowed and only pads (stop ids, bin 0) after one, no atom twice in a site when ``distinct``."""
        if atoms.shape != bins.shape or atoms.dim() != 3 or atoms.shape[-1] != self.depth:
            raise ValueError(f"atoms and bins must both be (N, L, {self.depth}), got {tuple(atoms.shape)} and "
                             f"{tuple(bins.shape)}")
        if not atoms.numel():
            return
        top = self.atoms + (1 if self.stop else 0)
        if int(atoms.min()) < 0 or int(atoms.max()) >= top:
            raise ValueError(f"{self.describe()}: atom ids must be in [0, {top}), got values in "
                             f"[{int(atoms.min())}, {int(atoms.max())}]")
        if self.limits is not None and bool((atoms >= torch.tensor(self.limits, device=atoms.device)).any()):
            raise ValueError(f"{self.describe()}: event j's ids must be below {list(self.limits)}[j]")
        if int(bins.min()) < 0 or int(bins.max()) >= (self.bins or 1):
            raise ValueError(f"{self.describe()}: bins must be in [0, {self.bins or 1}), got values in "
                             f"[{int(bins.min())}, {int(bins.max())}]")
        if self.stop:
            stopped = atoms == self.atoms
            if not bool((stopped[..., 1:] >= stopped[..., :-1]).all()):
                raise ValueError(f"{self.describe()}: an atom follows a stop; pads come only after a site's last atom")
            if bool((bins[stopped] != 0).any()):
                raise ValueError(f"{self.describe()}: a stop or pad event carries a coefficient bin")
        if self.distinct and self.depth > 1:
            real = atoms != self.atoms if self.stop else torch.ones_like(atoms, dtype=torch.bool)
            same = (atoms.unsqueeze(-1) == atoms.unsqueeze(-2)) & real.unsqueeze(-1) & real.unsqueeze(-2)
            if bool((same.sum((-1, -2)) > self.depth).any()):
                raise ValueError(f"{self.describe()}: a site repeats an atom; its atoms must be distinct")

    def contributions(self, atoms: Tensor, bins: Tensor, depths: Tensor, codebooks: Tensor,
                      levels: Tensor | None) -> Tensor:
        """Each event's part of the site's latent (..., M) for events (...) at ``depths`` (broadcast): coefficient
        level times the event's codeword (from the codebook of its depth), 0 for stops and pads. ``codebooks`` and
        ``levels`` are this spec's (a module's buffers, on its device)."""
        group = depths if codebooks.shape[0] > 1 else torch.zeros_like(depths)
        real = atoms < self.atoms
        vectors = codebooks[group.expand_as(atoms), atoms.clamp(max=self.atoms - 1)]
        scale = real.to(vectors.dtype) if levels is None else torch.where(real, levels[bins], 0.0)
        return vectors * scale.unsqueeze(-1)


def event_spec(bottleneck: nn.Module) -> EventSpec:
    """The :class:`EventSpec` of a trained bottleneck's tokens: ``SparseDictBottleneck`` with ``coeff_bins`` (DL),
    ``VectorQuantizer`` (VQ), a peer adapter (:class:`~.peers.PeerQuantizer`: one event per token slot), or any
    bottleneck with an ``event_spec()`` method."""
    if hasattr(bottleneck, "event_spec"):
        return bottleneck.event_spec()
    if isinstance(bottleneck, SparseDictBottleneck):
        if bottleneck.codec is None:
            raise ValueError("this bottleneck has no tokens: build SparseDictBottleneck with coeff_bins (lasers train "
                             "--coeff-bins B) to model its codes with a prior")
        with torch.no_grad():
            return EventSpec(bottleneck.sparsity, bottleneck.n_e, bottleneck.codec.bins, True, True,
                             bottleneck.atoms().detach().float()[None].clone(),
                             bottleneck.coeff_quantizer.levels().detach().float().clone(), "codec", "DL")
    if isinstance(bottleneck, PeerQuantizer):
        widths = [end - first for first, end in bottleneck.token_ranges]
        with torch.no_grad():
            codebooks = bottleneck.slot_codewords()
        return EventSpec(len(widths), max(widths), None, False, False, codebooks, None, "index",
                         bottleneck.kind.upper(), limits=None if len(set(widths)) == 1 else tuple(widths),
                         offsets=tuple(first for first, _ in bottleneck.token_ranges))
    if isinstance(bottleneck, VectorQuantizer):
        return EventSpec(1, bottleneck.n_e, None, False, False, bottleneck.embedding.weight.detach().float()[None]
                         .clone(), None, "index", "VQ")
    raise ValueError(f"the spatial-depth prior does not know the codes of {type(bottleneck).__name__}")


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """logits (n, V) (-inf where not allowed) with everything outside the ``top_k`` largest (0: no limit) and
    outside the smallest set of largest logits whose probability reaches ``top_p`` (1: no limit) set to -inf; ids
    tied with the last one kept stay as well, and the most likely id always stays."""
    check_filters(top_k, top_p)
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1:
        ordered = logits.sort(dim=-1, descending=True).values
        probs = ordered.softmax(-1)
        drop = (probs.cumsum(-1) - probs) >= top_p  # the mass before an id already reaches top_p
        drop[..., 0] = False
        cutoff = ordered.masked_fill(drop, math.inf).amin(-1, keepdim=True)
        logits = logits.masked_fill(logits < cutoff, -math.inf)  # ids tied with the last one kept stay too
    return logits


def _draw(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """One id per row of logits (n, V) at ``temperature`` (shifted so that the largest logit is 0 first: a tiny
    temperature gives 0 and -inf, greedy, not NaN)."""
    scaled = (logits - logits.amax(-1, keepdim=True)) / temperature
    return torch.multinomial(scaled.softmax(-1).cpu(), 1, generator=generator)[:, 0].to(logits.device)


class SpatialDepthPrior(nn.Module):
    """The spatial-depth prior over the codes of ``spec`` on a ``grid`` (H', W') of latent sites.

    ``forward(atoms, bins)`` for events (N, L, D), L = H' W', returns the raw logits (no masks): atom-or-stop logits
    (N, L, D, K [+1 with stops]) and coefficient logits (N, L, D, B) or None, where event (t, j) sees sites < t
    and events < j of site t (the coefficient logits also its atom j). :meth:`log_prob` applies the masks and sums
    the likelihood; :meth:`loss` is the training objective (label smoothing, soft coefficient targets);
    :meth:`sample` draws codes with key/value caches. The codebooks and levels are frozen buffers.
    """

    def __init__(self, spec: EventSpec, grid: tuple[int, int], width: int = 128, layers: int = 4, heads: int = 4,
                 depth_layers: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        for name, value in (("width", width), ("layers", layers), ("heads", heads), ("depth_layers", depth_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if width % heads:
            raise ValueError(f"heads ({heads}) must divide width ({width})")
        if len(grid) != 2 or min(grid) < 1:
            raise ValueError(f"grid must be (rows, columns) of latent sites, got {grid!r}")
        self.spec, self.grid = spec, (int(grid[0]), int(grid[1]))
        self.width = width
        self.sites = self.grid[0] * self.grid[1]
        self.classes = spec.atoms + (1 if spec.stop else 0)  # atom-or-stop
        groups = spec.codebooks.shape[0]
        self.register_buffer("codebooks", spec.codebooks.detach().float().clone())
        self.register_buffer("levels", None if spec.levels is None else spec.levels.detach().float().clone())
        self.register_buffer("valid", spec.valid(), persistent=False)  # (D, classes): ids each event may take
        scale = spec.codebooks.float().norm(dim=-1).mean()
        if spec.levels is not None:
            scale = scale * spec.levels.float().abs().mean()
        self.register_buffer("latent_scale", 1.0 / scale.clamp_min(1e-12))
        self.atom_embed = nn.Embedding(groups * self.classes, width)  # one table per codebook
        self.bin_embed = nn.Embedding(spec.bins, width) if spec.bins else None
        self.latent_in = nn.Linear(spec.codebooks.shape[-1], width)  # a site's decoded latent -> spatial input
        self.partial_in = nn.Linear(spec.codebooks.shape[-1], width)  # partial reconstruction -> depth input
        self.start = nn.Parameter(torch.zeros(width))
        self.row = nn.Parameter(torch.zeros(self.grid[0], width))
        self.col = nn.Parameter(torch.zeros(self.grid[1], width))
        self.spatial = nn.ModuleList(CausalBlock(width, heads, dropout) for _ in range(layers))
        self.spatial_norm = nn.LayerNorm(width)
        self.depth_pos = nn.Parameter(torch.zeros(spec.depth, width))
        self.depth = nn.ModuleList(CausalBlock(width, heads, dropout) for _ in range(depth_layers))
        self.depth_norm = nn.LayerNorm(width)
        self.atom_head = nn.Linear(width, groups * self.classes)
        self.coeff_head = (nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, spec.bins))
                           if spec.bins else None)
        for p in (self.start, self.row, self.col, self.depth_pos, self.atom_embed.weight):
            nn.init.normal_(p, std=0.02)
        if self.bin_embed is not None:
            nn.init.normal_(self.bin_embed.weight, std=0.02)

    def extra_repr(self) -> str:
        return f"spec={self.spec.describe()!r}, grid={self.grid}"

    # ---------------------------------------------------------------------------------------------- pieces
    def _group(self, j: Tensor | int) -> Tensor | int:
        return j if self.codebooks.shape[0] > 1 else 0 * j

    def _event_embed(self, atoms: Tensor, bins: Tensor, j: Tensor) -> Tensor:
        """Embeddings (..., width) of events (...) at depths j (broadcast): atom (per codebook) plus bin."""
        e = self.atom_embed(self._group(j) * self.classes + atoms)
        if self.bin_embed is not None:
            e = e + self.bin_embed(bins) * (atoms < self.spec.atoms).unsqueeze(-1)
        return e

    def _site_input(self, events: Tensor, latent: Tensor) -> Tensor:
        """Spatial input (..., width) of sites from their event embeddings (..., D, width) and decoded latents
        (..., M)."""
        return self.latent_in(latent * self.latent_scale) + events.sum(-2)

    def _positions(self, t: Tensor) -> Tensor:
        return self.row[t // self.grid[1]] + self.col[t % self.grid[1]]

    def _atom_logits(self, o: Tensor, j: Tensor) -> Tensor:
        """Atom-or-stop logits (..., classes) from depth outputs (..., width) at depths j."""
        logits = self.atom_head(o)
        if self.codebooks.shape[0] == 1:
            return logits
        g = self._group(j).expand(o.shape[:-1])
        return logits.unflatten(-1, (-1, self.classes)).gather(
            -2, g[..., None, None].expand(*o.shape[:-1], 1, self.classes)).squeeze(-2)

    def _coeff_logits(self, o: Tensor, atoms: Tensor, j: Tensor) -> Tensor | None:
        if self.coeff_head is None:
            return None
        return self.coeff_head(o + self.atom_embed(self._group(j) * self.classes + atoms))

    # ---------------------------------------------------------------------------------------------- full pass
    def forward(self, atoms: Tensor, bins: Tensor) -> tuple[Tensor, Tensor | None]:
        n, sites, depth = atoms.shape
        if sites != self.sites or depth != self.spec.depth:
            raise ValueError(f"events must be (N, {self.sites}, {self.spec.depth}) for this prior's grid "
                             f"{self.grid} and depth, got {tuple(atoms.shape)}")
        j = torch.arange(depth, device=atoms.device)
        events = self._event_embed(atoms, bins, j)  # (N, L, D, W)
        partial = self.spec.contributions(atoms, bins, j, self.codebooks, self.levels).cumsum(2)  # after events <= j
        site = self._site_input(events, partial[:, :, -1])  # (N, L, W)
        x = torch.cat([self.start.expand(n, 1, -1), site[:, :-1]], 1) + self._positions(
            torch.arange(sites, device=atoms.device))
        for block in self.spatial:
            x = block(x)
        h = self.spatial_norm(x)
        previous = self.partial_in(partial[:, :, :-1] * self.latent_scale) + events[:, :, :-1]
        d = h.unsqueeze(2) + self.depth_pos + F.pad(previous, (0, 0, 1, 0))  # event j sees events < j
        d = d.reshape(n * sites, depth, -1)
        for block in self.depth:
            d = block(d)
        o = self.depth_norm(d).reshape(n, sites, depth, -1)
        return self._atom_logits(o, j), self._coeff_logits(o, atoms, j)

    def allowed(self, atoms: Tensor) -> tuple[Tensor, Tensor]:
        """For events (N, L, D): which atom-or-stop ids each event may take, bool (N, L, D, classes) (atoms chosen
        earlier in the site masked when distinct), and which events are modelled, bool (N, L, D) (not after a
        stop: those are pads)."""
        n, sites, depth = atoms.shape
        ok = self.valid.expand(n, sites, depth, self.classes)
        if self.spec.distinct:
            chosen = F.one_hot(atoms, self.classes).cumsum(2) - F.one_hot(atoms, self.classes)  # before event j
            if self.spec.stop:
                chosen[..., self.spec.atoms] = 0
            ok = ok & (chosen == 0)
        if self.spec.stop:
            stops = (atoms == self.spec.atoms).long()
            active = (stops.cumsum(2) - stops) == 0
        else:
            active = torch.ones_like(atoms, dtype=torch.bool)
        return ok, active

    def event_log_probs(self, atoms: Tensor, bins: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """Masked log-probabilities (N, L, D) of each event's atom and of its coefficient bin (None without bins;
        0 where the event has none), and the modelled events, bool (N, L, D)."""
        atom_logits, coeff_logits = self(atoms, bins)
        ok, active = self.allowed(atoms)
        logp = atom_logits.float().masked_fill(~ok, -math.inf).log_softmax(-1)
        atom_lp = torch.where(active, logp.gather(-1, atoms.unsqueeze(-1)).squeeze(-1), 0.0)
        coeff_lp = None
        if coeff_logits is not None:
            scored = active & (atoms < self.spec.atoms)
            lp = coeff_logits.float().log_softmax(-1).gather(-1, bins.unsqueeze(-1)).squeeze(-1)
            coeff_lp = torch.where(scored, lp, 0.0)
        return atom_lp, coeff_lp, active

    def log_prob(self, atoms: Tensor, bins: Tensor) -> Tensor:
        """Log-likelihood in nats of each image's codes (N,) (float32): the sum over sites and modelled events of
        log p(atom) + log p(bin | atom)."""
        atom_lp, coeff_lp, _ = self.event_log_probs(atoms, bins)
        total = atom_lp.sum((1, 2))
        return total if coeff_lp is None else total + coeff_lp.sum((1, 2))

    def loss(self, atoms: Tensor, bins: Tensor, label_smoothing: float = 0.0, coeff_sigma: float = 0.0) -> Tensor:
        """Training objective per image in nats (N,): the negative log-likelihood, with ``label_smoothing`` of the
        atom targets (that share spread over the ids allowed at the event) and soft coefficient targets (a Gaussian
        kernel of ``coeff_sigma`` bins around the true bin, cut at 3 sigma; 0: the bin itself)."""
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if not (coeff_sigma >= 0 and math.isfinite(coeff_sigma)):
            raise ValueError(f"coeff_sigma must be a finite number >= 0, got {coeff_sigma}")
        atom_logits, coeff_logits = self(atoms, bins)
        ok, active = self.allowed(atoms)
        logp = atom_logits.float().masked_fill(~ok, -math.inf).log_softmax(-1)
        nll = -logp.gather(-1, atoms.unsqueeze(-1)).squeeze(-1)
        if label_smoothing:
            uniform = -torch.where(ok, logp, 0.0).sum(-1) / ok.sum(-1)
            nll = (1 - label_smoothing) * nll + label_smoothing * uniform
        total = torch.where(active, nll, 0.0).sum((1, 2))
        if coeff_logits is not None:
            lp = coeff_logits.float().log_softmax(-1)
            if coeff_sigma:
                b = torch.arange(self.spec.bins, device=bins.device)
                dist = (b - bins.unsqueeze(-1)).float()
                kernel = torch.exp(-0.5 * (dist / coeff_sigma) ** 2) * (dist.abs() <= 3 * coeff_sigma)
                target = kernel / kernel.sum(-1, keepdim=True)
            else:
                target = F.one_hot(bins, self.spec.bins).float()
            coeff_nll = -(target * lp).sum(-1)
            total = total + torch.where(active & (atoms < self.spec.atoms), coeff_nll, 0.0).sum((1, 2))
        return total

    # ---------------------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, n: int, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               coeff_temperature: float | None = None, generator: torch.Generator | None = None,
               progress: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """n images' codes drawn site by site and event by event with key/value caches: atoms (n, L, D), bins
        (n, L, D) (int64, on the prior's device) and their log-likelihood under the prior, (n,) float32 nats.

        Atoms (and stops) are drawn from the masked logits divided by ``temperature`` after ``top_k`` / ``top_p``
        filtering (0 / 1: off); coefficient bins at ``coeff_temperature`` (None: ``temperature``) without
        filtering. After a stop the site's events are pads. ``generator`` (a CPU generator) makes draws
        repeatable."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        coeff_temperature = temperature if coeff_temperature is None else coeff_temperature
        check_temperature(temperature)
        check_temperature(coeff_temperature, "coeff_temperature")
        check_filters(top_k, top_p)
        was = self.training
        self.eval()
        device, spec = self.start.device, self.spec
        depth = spec.depth
        atoms = torch.empty(n, self.sites, depth, dtype=torch.long, device=device)
        bins = torch.zeros_like(atoms)
        log_prob = torch.zeros(n, device=device)
        caches: list[list[Tensor]] = [[] for _ in self.spatial]
        x = self.start.expand(n, -1)
        for t in tqdm(range(self.sites), desc="sample", disable=not progress, leave=False):
            x = (x + self._positions(torch.tensor(t, device=device))).unsqueeze(1)
            for block, cache in zip(self.spatial, caches):
                x = block(x, cache)
            h = self.spatial_norm(x[:, 0])
            depth_caches: list[list[Tensor]] = [[] for _ in self.depth]
            partial = torch.zeros(n, self.codebooks.shape[-1], device=device)
            chosen = torch.zeros(n, self.classes, dtype=torch.bool, device=device)
            stopped = torch.zeros(n, dtype=torch.bool, device=device)
            events = []
            d = h + self.depth_pos[0]
            for j in range(depth):
                jt = torch.tensor(j, device=device)
                d = d.unsqueeze(1)
                for block, cache in zip(self.depth, depth_caches):
                    d = block(d, cache)
                o = self.depth_norm(d[:, 0])
                logits = self._atom_logits(o, jt).float().masked_fill(chosen | ~self.valid[j], -math.inf)
                if not torch.isfinite(logits.amax(-1)).all():
                    raise ValueError("the prior's logits are not finite: its weights are damaged or diverged; "
                                     "retrain it")
                logp = logits.log_softmax(-1)
                a = _draw(filter_logits(logits, top_k, top_p), temperature, generator)
                if spec.stop:
                    a = torch.where(stopped, spec.atoms, a)
                log_prob += torch.where(stopped, 0.0, logp.gather(1, a[:, None])[:, 0])
                b = torch.zeros_like(a)
                coeff = self._coeff_logits(o, a, jt)
                if coeff is not None:
                    coeff = coeff.float()
                    b = torch.where(stopped | (a == spec.atoms), 0, _draw(coeff, coeff_temperature, generator))
                    lp = coeff.log_softmax(-1).gather(1, b[:, None])[:, 0]
                    log_prob += torch.where(stopped | (a == spec.atoms), 0.0, lp)
                atoms[:, t, j], bins[:, t, j] = a, b
                if spec.stop:
                    stopped |= a == spec.atoms
                if spec.distinct:
                    chosen[torch.arange(n, device=device), a] = True
                    if spec.stop:
                        chosen[:, spec.atoms] = False
                e = self._event_embed(a, b, jt)
                events.append(e)
                partial = partial + spec.contributions(a, b, jt, self.codebooks, self.levels)
                if j + 1 < depth:
                    d = h + self.depth_pos[j + 1] + self.partial_in(partial * self.latent_scale) + e
            x = self._site_input(torch.stack(events, 1), partial)
        self.train(was)
        return atoms, bins, log_prob
