"""Stage 2: a prior over a trained autoencoder's tokens: training with resume, sampling, NLL, FID.

    lasers prior train runs/dl --steps 2000        # writes runs/dl/prior/ (checkpoint, metrics, eval.json, samples)
    lasers sample runs/dl --n 64                   # decodes 64 samples to runs/dl/prior/samples.png
    lasers compare --stage2 --data fashion-mnist   # both autoencoders and both priors, one table

Two prior classes (``--prior``): ``spatial-depth`` (the default, :mod:`.spatial_depth`: a transformer over the
latent sites and a small one over each site's (atom, coefficient) events) and ``flat`` (:class:`TokenPrior`, one
causal transformer over the whole token sequence). One code path serves DL-VAE tokens
(``SparseDictBottleneck(coeff_bins=B)``: 2S tokens per latent site), VQ-VAE indices (one token per site) and the
peers' tokens (:mod:`.peers`: one per RVQ stage, FSQ channel or LFQ group). Both
priors mask their logits (the flat one with a :class:`~lasers_ext.tokens.TokenGrammar`), so each is a distribution
over decodable codes only: its likelihoods are honest and every sample decodes. With ``fid_every`` the checkpoint
that is evaluated and sampled is the one with the lowest sample FID of the evaluations every so many steps.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..models import Autoencoder
from ..tokens import TokenGrammar
from . import metrics, plots
from .comparison import compare
from .config import TrainConfig, check_choices, config_from_dict, option, resolve_device, run_dataset
from .evaluation import to_image, to_model
from .runs import (
    append_record,
    load_run,
    model_fingerprint,
    read_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    truncate_records,
    writable_dir,
    write_json,
    write_text,
)
from .spatial_depth import CausalBlock, SpatialDepthPrior, check_filters, check_temperature, event_spec, filter_logits

__all__ = ["PriorConfig", "TokenPrior", "train_prior", "load_prior", "sample_tokens", "sample_images",
           "decode_tokens", "compare_stage2", "sequence_nll"]

PRIOR_DIR = "prior"
PRIORS = ("spatial-depth", "flat")
# Options a resumed prior may change (honoured from the resumed step on, recorded in config.json); any other change
# is refused, since the prior would no longer be what its records say.
_PRIOR_RESUMABLE = ("steps", "lr", "eval_images", "samples", "fid_images", "temperature", "top_k", "top_p",
                    "coeff_temperature", "device", "log_every", "checkpoint_every", "progress")
_SPATIAL_DEPTH_ONLY = {"label_smoothing": 0.0, "coeff_sigma": 0.0, "coeff_temperature": None}


@dataclasses.dataclass
class PriorConfig:
    """Options of a prior's training. Every field is also a flag of ``lasers prior train``."""

    prior: str = option("spatial-depth", "spatial-depth (a transformer over latent sites and one over each site's "
                        "(atom, coefficient) events) or flat (one transformer over the token sequence)",
                        choices=PRIORS)
    steps: int = option(2000, "optimiser steps of the prior")
    batch_size: int = option(32, "token sequences (images) per step")
    lr: float = option(3e-4, "AdamW learning rate")
    width: int = option(128, "transformer width (embedding size)")
    layers: int = option(4, "transformer layers (spatial-depth: of the spatial transformer)")
    depth_layers: int = option(2, "spatial-depth: layers of the depth transformer over a site's events")
    heads: int = option(4, "attention heads (must divide the width)")
    dropout: float = option(0.0, "dropout inside the transformer")
    label_smoothing: float = option(0.0, "spatial-depth: share of each atom target spread over the allowed atoms")
    coeff_sigma: float = option(0.0, "spatial-depth: soft coefficient targets, a Gaussian over neighbouring bins "
                              "with this width in bins (0: the bin itself)")
    train_images: int = option(0, "training images encoded to token sequences (0: the whole training split)")
    eval_images: int = option(1000, "test images for the negative log-likelihood (0: the whole test split)")
    samples: int = option(64, "samples drawn at the end (picture and FID)")
    fid_images: int = option(0, "samples and test images for FID at the end (0: no FID; ~0.4 s per image on 2 CPU "
                           "cores)")
    fid_every: int = option(0, "steps between sample-FID evaluations; the checkpoint with the lowest FID is the one "
                          "evaluated and sampled (0: the last step)")
    select_images: int = option(0, "samples and test images of each --fid-every evaluation (0: --fid-images)")
    temperature: float = option(1.0, "sampling temperature (spatial-depth: of the atoms)")
    top_k: int = option(0, "sample among the k most likely atoms (flat: tokens) only (0: all)")
    top_p: float = option(1.0, "sample among the most likely atoms (flat: tokens) whose probability reaches p only "
                        "(1: all)")
    coeff_temperature: float | None = option(None, "spatial-depth: sampling temperature of the coefficient bins "
                                           "(default: --temperature)")
    seed: int = option(0, "seed of the weights, the batch order and the samples")
    device: str = option("auto", "auto, cpu or cuda", choices=("auto", "cpu", "cuda"))
    log_every: int = option(50, "steps between training records")
    checkpoint_every: int = option(250, "steps between checkpoints")
    progress: bool = option(True, "show progress bars")

    def validate(self) -> PriorConfig:
        for name in ("steps", "batch_size", "width", "layers", "heads", "samples", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("train_images", "eval_images", "fid_images", "seed", "fid_every", "select_images"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide width ({self.width})")
        if self.depth_layers < 1:
            raise ValueError(f"depth_layers must be >= 1, got {self.depth_layers}")
        check_temperature(self.temperature)
        if self.coeff_temperature is not None:
            check_temperature(self.coeff_temperature, "coeff_temperature")
        check_filters(self.top_k, self.top_p)
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not (self.coeff_sigma >= 0 and math.isfinite(self.coeff_sigma)):
            raise ValueError(f"coeff_sigma must be a finite number >= 0, got {self.coeff_sigma}")
        if self.prior == "flat":
            for name, off in _SPATIAL_DEPTH_ONLY.items():
                if getattr(self, name) != off:
                    raise ValueError(f"{name} applies to the spatial-depth prior only (prior is flat)")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.fid_images == 1 or self.select_images == 1:
            raise ValueError(f"fid_images and select_images must be 0 (off) or >= 2, got {self.fid_images} and "
                             f"{self.select_images}")
        if self.fid_every and not self.selection_images:
            raise ValueError("fid_every needs sample images to score: give fid_images or select_images (>= 2)")
        check_choices(self)
        return self

    @property
    def selection_images(self) -> int:
        """Samples (and test images) of each checkpoint-selection FID."""
        return self.select_images or self.fid_images

    def sampler(self) -> dict:
        """The sampling settings, as keywords of :func:`sample_tokens`."""
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p,
                "coeff_temperature": self.coeff_temperature}

    @classmethod
    def from_dict(cls, values: dict) -> PriorConfig:
        """A configuration from a dict (a checkpoint); see train.config_from_dict. Checkpoints written before the
        spatial-depth prior hold flat priors."""
        return config_from_dict(cls, {"prior": "flat", **values})


class TokenPrior(nn.Module):
    """Causal transformer over sequences of ``block_size`` tokens from ``vocab_size`` ids.

    ``forward(tokens)`` for tokens (B, t), t <= block_size, returns logits (B, t, vocab_size): position i predicts
    tokens[:, i] from tokens[:, :i] (a learned start token begins every sequence). Pre-norm blocks
    (``F.scaled_dot_product_attention`` under a causal mask, 4x GELU MLP), learned position embeddings;
    :meth:`step` decodes one position at a time with a key/value cache, for sampling.
    """

    def __init__(self, vocab_size: int, block_size: int, width: int = 128, layers: int = 4, heads: int = 4,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"heads ({heads}) must divide width ({width})")
        self.vocab_size, self.block_size = vocab_size, block_size
        self.embed = nn.Embedding(vocab_size + 1, width)  # the last id is the start token
        self.position = nn.Parameter(torch.zeros(block_size, width))
        self.blocks = nn.ModuleList(CausalBlock(width, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)
        nn.init.normal_(self.position, std=0.02)

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, block_size={self.block_size}"

    def forward(self, tokens: Tensor) -> Tensor:
        b, t = tokens.shape
        if t > self.block_size:
            raise ValueError(f"sequences of {t} tokens exceed the prior's block size {self.block_size}")
        start = torch.full((b, 1), self.vocab_size, dtype=torch.long, device=tokens.device)
        h = self.embed(torch.cat([start, tokens[:, :-1]], dim=1)) + self.position[:t]
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))

    def step(self, previous: Tensor, position: int, caches: list[list[Tensor]]) -> Tensor:
        """Logits (B, vocab_size) of the token at ``position`` given the earlier positions held in ``caches`` (one
        list per block, empty at position 0, filled by this call): ``previous`` (B,) is the token at position - 1, or
        :meth:`start` at position 0."""
        if not 0 <= position < self.block_size:
            raise ValueError(f"position {position} is outside the block size {self.block_size}")
        h = (self.embed(previous) + self.position[position]).unsqueeze(1)
        for block, cache in zip(self.blocks, caches):
            h = block(h, cache)
        return self.head(self.norm(h[:, 0]))

    def start(self, batch: int) -> Tensor:
        """The start token for ``batch`` sequences, the ``previous`` of :meth:`step` at position 0."""
        return torch.full((batch,), self.vocab_size, dtype=torch.long, device=self.head.weight.device)


def _masked_logits(logits: Tensor, grammar: TokenGrammar, prev: Tensor, position: Tensor) -> Tensor:
    allowed = grammar.allowed(prev, position)
    return logits if allowed is None else logits.masked_fill(~allowed, -math.inf)


def sequence_nll(prior: TokenPrior | SpatialDepthPrior, grammar: TokenGrammar, tokens: Tensor) -> Tensor:
    """Negative log-likelihood in nats of each sequence (N, T) under the prior restricted to the grammar (the
    spatial-depth prior: to its masks): (N,)."""
    if isinstance(prior, SpatialDepthPrior):
        return -prior.log_prob(*prior.spec.to_events(tokens))
    t = tokens.shape[1]
    prev = torch.cat([tokens.new_full((tokens.shape[0], 1), -1), tokens[:, :-1]], dim=1)
    logits = _masked_logits(prior(tokens).float(), grammar, prev, torch.arange(t, device=tokens.device))
    return -logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1).sum(1)


@torch.no_grad()
def sample_tokens(prior: TokenPrior | SpatialDepthPrior, grammar: TokenGrammar, n: int, *, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0, coeff_temperature: float | None = None,
                  generator: torch.Generator | None = None, progress: bool = False) -> Tensor:
    """n sequences (n, T) of tokens, each from the grammar's allowed ids only, with the logits divided by
    ``temperature`` (a finite number > 0; as it approaches 0 every draw becomes the most likely id) after keeping the
    ``top_k`` most likely ids / those within probability ``top_p`` (0 / 1: all). The spatial-depth prior draws site
    by site (:meth:`SpatialDepthPrior.sample`; the filters act on its atoms, ``coeff_temperature`` on its bins); the
    flat prior token by token."""
    check_temperature(temperature)
    check_filters(top_k, top_p)
    if isinstance(prior, SpatialDepthPrior):
        atoms, bins, _ = prior.sample(n, temperature=temperature, top_k=top_k, top_p=top_p,
                                      coeff_temperature=coeff_temperature, generator=generator, progress=progress)
        return prior.spec.to_tokens(atoms, bins)
    if coeff_temperature is not None:
        raise ValueError("coeff_temperature applies to the spatial-depth prior only")
    was = prior.training
    prior.eval()
    device = prior.head.weight.device
    out = torch.empty(n, prior.block_size, dtype=torch.long, device=device)
    caches: list[list[Tensor]] = [[] for _ in prior.blocks]
    previous = prior.start(n)
    for t in tqdm(range(prior.block_size), desc="sample", disable=not progress, leave=False):
        logits = prior.step(previous, t, caches).float()
        prev = previous.unsqueeze(1) if t else previous.new_full((n, 1), -1)
        logits = _masked_logits(logits.unsqueeze(1), grammar, prev, torch.tensor([t], device=device))[:, 0]
        if not torch.isfinite(logits.amax(-1)).all():
            raise ValueError("the prior's logits are not finite: its weights are damaged or diverged; retrain it")
        logits = filter_logits(logits, top_k, top_p)
        # shifted so that the largest logit is 0 before the division: a tiny temperature gives 0 and -inf, not NaN
        scaled = (logits - logits.amax(-1, keepdim=True)) / temperature
        previous = torch.multinomial(scaled.softmax(-1).cpu(), 1, generator=generator).to(device)[:, 0]
        out[:, t] = previous
    prior.train(was)
    return out


@torch.no_grad()
def decode_tokens(model: Autoencoder, tokens: Tensor, latent_shape: tuple[int, int, int]) -> Tensor:
    """Token sequences (n, T) -> images (n, C, H, W) in [0, 1] through the quantizer's ``get_codebook_entry`` (taming's
    call) and the decoder; ``latent_shape`` is (H', W', C) of the latent."""
    h, w, c = latent_shape
    z = model.bottleneck.get_codebook_entry(tokens.reshape(-1), (tokens.shape[0], h, w, c))
    return to_image(model.decode(z))


@torch.no_grad()
def _encode(model: Autoencoder, dataset, count: int, device: torch.device, progress: bool,
            desc: str) -> tuple[Tensor, tuple[int, int, int]]:
    """The first ``count`` images (0: all) of ``dataset`` as token sequences (N, T) on the CPU, and the latent shape."""
    n = len(dataset) if count == 0 else min(count, len(dataset))
    seqs, shape = [], None
    for start in tqdm(range(0, n, 256), desc=desc, disable=not progress, leave=False):
        x = torch.stack([dataset[i] for i in range(start, min(start + 256, n))]).to(device)
        z_q, _, info = model.encode(to_model(x))
        shape = (z_q.shape[2], z_q.shape[3], z_q.shape[1])
        seqs.append(info[2].reshape(x.shape[0], -1).cpu())  # taming's info[2].view(B, -1)
    return torch.cat(seqs), shape


def _token_data(run: Path, model: Autoencoder, stage1: TrainConfig, fingerprint: str, cfg: PriorConfig,
                device: torch.device) -> dict:
    """Train/test token sequences of run's autoencoder (int16 where the ids fit), cached in RUN/prior/tokens.pt for
    this autoencoder (its content fingerprint) and these image counts."""
    path = run / PRIOR_DIR / "tokens.pt"
    key = {"autoencoder": fingerprint, "train_images": cfg.train_images, "eval_images": cfg.eval_images}
    if path.exists():
        try:
            cached = torch.load(path, weights_only=False)
            if cached.get("key") == key:
                return cached
        except Exception:  # a damaged cache is rebuilt
            pass
    train_set, test_set = run_dataset(stage1, "train"), run_dataset(stage1, "test")
    train_set.set_epoch(0)
    train_tokens, shape = _encode(model, train_set, cfg.train_images, device, cfg.progress, "encode train")
    test_tokens, _ = _encode(model, test_set, cfg.eval_images, device, cfg.progress, "encode test")
    small = torch.int16 if max(int(train_tokens.max()), int(test_tokens.max())) < 2**15 else torch.int32
    data = {"key": key, "train": train_tokens.to(small), "test": test_tokens.to(small), "latent_shape": shape,
            "image_dims": test_set.channels * math.prod(test_set.image_size)}
    save_checkpoint(path, data)
    return data


def _load_stage1(run: Path, device: torch.device) -> tuple[TrainConfig, Autoencoder, int, TokenGrammar, str]:
    """The run's configuration, autoencoder (eval mode), step, token grammar and content fingerprint."""
    if not Path(run).is_dir():
        raise FileNotFoundError(f"no run directory at {run}: train an autoencoder there first (lasers train --out "
                                f"{run} --model dl-vae --coeff-bins 16, or --model vq-vae)")
    stage1, model, step = load_run(run, device)
    try:
        grammar = TokenGrammar.of(model.bottleneck)
    except ValueError as err:
        raise ValueError(f"{run}: {err}") from None
    return stage1, model.eval(), step, grammar, model_fingerprint(model)


def _check_autoencoder(ckpt: Path, saved: dict, fingerprint: str) -> None:
    """ValueError unless the prior checkpoint ``saved`` was trained on the autoencoder with ``fingerprint``."""
    if "autoencoder" not in saved:
        raise ValueError(f"{ckpt} was written by an older version that did not record its autoencoder; move "
                         f"{ckpt.parent} away and train the prior again")
    if saved["autoencoder"] != fingerprint:
        raise ValueError(f"{ckpt} was trained on another autoencoder (fingerprint {saved.get('autoencoder')}, the "
                         f"checkpoint in {ckpt.parent.parent} now has {fingerprint}); its tokens would mean something "
                         f"else. Move {ckpt.parent} away to train a prior for this autoencoder")


def _site_grid(bottleneck: nn.Module, latent_shape: tuple[int, int, int]) -> tuple[int, int]:
    """(rows, columns) of the coded sites of a latent (H', W', C): its grid over the bottleneck's patch size."""
    ph, pw = getattr(bottleneck, "patch_size", (1, 1))
    return latent_shape[0] // ph, latent_shape[1] // pw


def _build_prior(model: Autoencoder, grammar: TokenGrammar, block_size: int, latent_shape: tuple[int, int, int],
                 cfg: PriorConfig) -> TokenPrior | SpatialDepthPrior:
    """The ``cfg.prior`` class over ``model``'s token sequences of ``block_size`` tokens."""
    if cfg.prior == "flat":
        return TokenPrior(grammar.vocab_size, block_size, cfg.width, cfg.layers, cfg.heads, cfg.dropout)
    spec = event_spec(model.bottleneck)
    grid = _site_grid(model.bottleneck, latent_shape)
    if grid[0] * grid[1] * spec.tokens_per_site != block_size:
        raise ValueError(f"{block_size} tokens per image do not fill a {grid[0]} x {grid[1]} grid of sites with "
                         f"{spec.tokens_per_site} tokens each")
    return SpatialDepthPrior(spec, grid, cfg.width, cfg.layers, cfg.heads, cfg.depth_layers, cfg.dropout)


def _codes_of(prior: TokenPrior | SpatialDepthPrior) -> dict | None:
    """What a checkpoint records of the codes its prior models (None for the flat prior: its vocabulary says it)."""
    return prior.spec.signature() if isinstance(prior, SpatialDepthPrior) else None


def _check_codes(ckpt: Path, saved: dict, prior: TokenPrior | SpatialDepthPrior) -> None:
    """ValueError unless the checkpoint ``saved`` models the codes that ``prior`` (built for this run) models."""
    if saved.get("codes") != _codes_of(prior):
        raise ValueError(f"{ckpt} models other codes ({saved.get('codes')}) than this run's autoencoder gives "
                         f"({_codes_of(prior)}); move {ckpt.parent} away to train a prior for this autoencoder")


def _prior_device(prior: TokenPrior | SpatialDepthPrior) -> torch.device:
    return next(prior.parameters()).device


@torch.no_grad()
def _evaluate_nll(prior: TokenPrior | SpatialDepthPrior, grammar: TokenGrammar, tokens: Tensor, image_dims: int,
                  device: torch.device) -> dict:
    was = prior.training
    prior.eval()
    total = 0.0
    for start in range(0, len(tokens), 128):
        batch = tokens[start:start + 128].to(device).long()
        total += sequence_nll(prior, grammar, batch).double().sum().item()
    prior.train(was)
    per_image = total / len(tokens)
    return {"nll_bits_per_dim": per_image / (math.log(2) * image_dims), "nll_bits_per_image": per_image / math.log(2),
            "test_images": len(tokens)}


def _batch_loss(prior: TokenPrior | SpatialDepthPrior, grammar: TokenGrammar, tokens: Tensor, cfg: PriorConfig,
                device: torch.device):
    """The training objective of a batch, in nats per token, as a function of the picked image indices: the flat
    prior's NLL, or the spatial-depth prior's loss (its events converted and checked once, kept as int16)."""
    block = tokens.shape[1]
    if isinstance(prior, SpatialDepthPrior):
        chunks = [prior.spec.to_events(tokens[i:i + 4096].long()) for i in range(0, len(tokens), 4096)]
        atoms = torch.cat([a for a, _ in chunks]).to(torch.int16)
        bins = torch.cat([b for _, b in chunks]).to(torch.int16)

        def loss(picks: Tensor) -> Tensor:
            a, b = atoms[picks].to(device).long(), bins[picks].to(device).long()
            return prior.loss(a, b, cfg.label_smoothing, cfg.coeff_sigma).mean() / block
        return loss
    return lambda picks: sequence_nll(prior, grammar, tokens[picks].to(device).long()).mean() / block


class _FidReference:
    """Inception features of the first ``n`` test images, computed once, to score several sets of images against."""

    def __init__(self, test_set, n: int, device: torch.device) -> None:
        self.n, self.device = min(n, len(test_set)), device
        self.fid = metrics.FID(device)
        for start in range(0, self.n, 64):
            real = torch.stack([test_set[i] for i in range(start, min(start + 64, self.n))])
            self.fid.update(real.to(device), real=True)

    def score(self, images: Tensor) -> float:
        """FID of the first n of ``images`` (N >= n, C, H, W) in [0, 1] against the reference."""
        self.fid.clear(real=False)
        for start in range(0, self.n, 64):
            self.fid.update(images[start:min(start + 64, self.n)].to(self.device), real=False)
        return self.fid.compute()["fid"]


_SELECTION_SEED = 1_000_003  # selection samples are drawn apart from the final ones (no selection bias in the FID)


def train_prior(run: str | Path, cfg: PriorConfig) -> dict:
    """Trains (or resumes, or re-evaluates when finished) the prior of the autoencoder in run directory ``run``;
    writes RUN/prior/ (checkpoint.pt, config.json, metrics.jsonl, eval.json, samples.png) and returns the evaluation:
    NLL in bits per image dimension on the test split, tokens and bits per image, prior parameters, training time
    and seconds per step; with ``cfg.fid_images`` the FID of samples and of the decoded test tokens (what stage 2 can
    at best reach) against as many test images; with ``cfg.fid_every`` the step whose sample FID was lowest, whose
    weights are then the ones evaluated and sampled."""
    cfg.validate()
    run = Path(run)
    device = resolve_device(cfg.device)
    stage1, model, stage1_step, grammar, fingerprint = _load_stage1(run, device)
    out = writable_dir(run / PRIOR_DIR)
    ckpt_path, metrics_path = out / "checkpoint.pt", out / "metrics.jsonl"
    saved = read_checkpoint(ckpt_path, device) if ckpt_path.exists() else None
    if saved is not None:
        _check_autoencoder(ckpt_path, saved, fingerprint)
        old = PriorConfig.from_dict(saved["config"])
        changed = {f.name: [getattr(old, f.name), getattr(cfg, f.name)] for f in dataclasses.fields(PriorConfig)
                   if getattr(old, f.name) != getattr(cfg, f.name)}
        refused = [f"{k}={a!r} (now {b!r})" for k, (a, b) in changed.items() if k not in _PRIOR_RESUMABLE]
        if refused:
            raise ValueError(f"{ckpt_path} was trained with {', '.join(refused)}; resume with the same values, or "
                             f"move {out} away to train a new prior")
    torch.manual_seed(cfg.seed)
    data = _token_data(run, model, stage1, fingerprint, cfg, device)
    train_tokens, test_tokens, shape = data["train"], data["test"], data["latent_shape"]
    grammar.check(train_tokens[:256].long())
    block = train_tokens.shape[1]
    prior = _build_prior(model, grammar, block, shape, cfg).to(device)
    batch_loss = _batch_loss(prior, grammar, train_tokens, cfg, device)
    opt = torch.optim.AdamW(prior.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.01)
    step, elapsed, resumes, best, selections = 0, 0.0, [], None, []
    if saved is not None:
        _check_codes(ckpt_path, saved, prior)
        prior.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        for group in opt.param_groups:
            group["lr"] = cfg.lr  # a changed --lr is honoured
        step, elapsed, resumes = saved["step"], saved["elapsed_s"], saved.get("resumes", [])
        best, selections = saved.get("best"), saved.get("selections", [])
        if changed:
            resumes = [*resumes, {"step": step, "changed": changed}]
        set_rng_state(saved["rng"])
        truncate_records(metrics_path, step)
    write_json(out / "config.json", {"prior": dataclasses.asdict(cfg), "stage1_step": stage1_step,
                                      "autoencoder": fingerprint, "latent_shape": list(shape),
                                      "tokens_per_image": block, "vocab_size": grammar.vocab_size,
                                      "codes": _codes_of(prior), "train_sequences": len(train_tokens),
                                      "resumes": resumes})
    references: dict[int, _FidReference] = {}

    def reference(n: int) -> _FidReference:
        if n not in references:
            references[n] = _FidReference(run_dataset(stage1, "test"), n, device)
        return references[n]

    def diverged(at: int) -> None:
        bar.close()
        kept = f"the checkpoint of step {saved_step} is kept" if ckpt_path.exists() else "no checkpoint was written"
        raise ValueError(f"the prior's loss or weights are not finite at step {at}: training diverged (is lr "
                         f"{cfg.lr} too high?); {kept}. Resume with a lower --lr, or move {out} away to start again")

    def checkpoint() -> None:
        if not all(torch.isfinite(p).all() for p in prior.parameters()):
            diverged(step)  # never a checkpoint of diverged weights
        save_checkpoint(ckpt_path, {"config": dataclasses.asdict(cfg), "model": prior.state_dict(),
                                    "opt": opt.state_dict(), "step": step, "elapsed_s": elapsed,
                                    "stage1_step": stage1_step, "autoencoder": fingerprint, "resumes": resumes,
                                    "latent_shape": shape, "tokens_per_image": block, "codes": _codes_of(prior),
                                    "best": best, "selections": selections, "rng": rng_state()})

    def select() -> None:
        """Sample FID of the current weights; the best weights so far are kept for the evaluation."""
        nonlocal best
        ref = reference(cfg.selection_images)
        images = _sample_decoded(model, prior, grammar, shape, ref.n, cfg.sampler(), cfg.seed + _SELECTION_SEED,
                                 cfg.progress)
        fid = ref.score(images)
        selections.append({"step": step, "fid": fid})
        append_record(metrics_path, {"kind": "select", "step": step, "fid": fid, "fid_images": ref.n})
        if best is None or fid < best["fid"]:
            best = {"step": step, "fid": fid, "model": {k: v.detach().clone() for k, v in prior.state_dict().items()}}

    n = len(train_tokens)
    saved_step = step
    bar = tqdm(total=cfg.steps, initial=step, desc="prior", disable=not cfg.progress, file=sys.stderr)
    window: list[Tensor] = []
    prior.train()
    while step < cfg.steps:
        tic = time.perf_counter()
        epoch, offset = divmod(step * cfg.batch_size, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))
        loss = batch_loss(order[offset:offset + cfg.batch_size])  # nats per token
        if not torch.isfinite(loss):
            diverged(step + 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(prior.parameters(), 1.0)
        opt.step()
        step += 1
        window.append(loss.detach())
        elapsed += time.perf_counter() - tic
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            nats = torch.stack(window).mean().item()
            window.clear()
            bpd = nats * block / (math.log(2) * data["image_dims"])
            append_record(metrics_path, {"kind": "train", "step": step, "nats_per_token": nats,
                                          "bits_per_dim": bpd, "elapsed_s": elapsed})
            bar.set_postfix(bpd=f"{bpd:.3f}")
        if cfg.fid_every and (step % cfg.fid_every == 0 or step == cfg.steps):
            select()
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            checkpoint()
            saved_step = step
    bar.close()
    if best is not None:
        prior.load_state_dict(best["model"])
    result = _evaluate_nll(prior, grammar, test_tokens, data["image_dims"], device)
    images = _sample_decoded(model, prior, grammar, shape, max(cfg.samples, cfg.fid_images), cfg.sampler(),
                             cfg.seed, cfg.progress)
    plots.save_image_grid(images[:cfg.samples], out / "samples.png")
    result.update(model=stage1.model, prior=cfg.prior, steps=step, selected_step=best["step"] if best else step,
                  selections=[dict(s) for s in selections], tokens_per_image=block,
                  bits_per_image=model.bottleneck.bits_per_site * block / grammar.tokens_per_site,
                  prior_parameters=sum(p.numel() for p in prior.parameters()), train_time_s=elapsed,
                  seconds_per_step=elapsed / step if step else None, sampler=cfg.sampler(),
                  vocab_size=grammar.vocab_size, fid=None, fid_images=0, recon_fid=None, recon_fid_images=0)
    if cfg.fid_images:
        ref = reference(cfg.fid_images)
        result.update(fid=ref.score(images), fid_images=ref.n)
        rec = reference(min(cfg.fid_images, len(test_tokens)))
        decoded = torch.cat([decode_tokens(model, test_tokens[i:i + 256].to(device).long(), shape).cpu()
                             for i in range(0, rec.n, 256)])
        result.update(recon_fid=rec.score(decoded), recon_fid_images=rec.n)
    write_json(out / "eval.json", result)
    append_record(metrics_path, {"kind": "eval", "step": step, **result})
    return result


@torch.no_grad()
def _sample_decoded(model: Autoencoder, prior: TokenPrior | SpatialDepthPrior, grammar: TokenGrammar,
                    latent_shape: tuple[int, int, int], n: int, sampler: dict, seed: int, progress: bool) -> Tensor:
    """n samples of ``prior`` (``sampler``: keywords of :func:`sample_tokens`) decoded by ``model``, 256 at a time:
    images (n, C, H, W) on the CPU."""
    generator = torch.Generator().manual_seed(seed)
    device = _prior_device(prior)
    images = []
    for start in range(0, n, 256):
        seqs = sample_tokens(prior, grammar, min(256, n - start), **sampler, generator=generator, progress=progress)
        images.append(decode_tokens(model, seqs.to(device), latent_shape).cpu())
    return torch.cat(images)


def _load_prior(run: str | Path, device: torch.device | str = "cpu"):
    """(autoencoder, prior (the selected weights, eval mode), grammar, latent shape, its PriorConfig)."""
    run = Path(run)
    device = torch.device(device)
    _, model, _, grammar, fingerprint = _load_stage1(run, device)
    ckpt = run / PRIOR_DIR / "checkpoint.pt"
    if not ckpt.exists():
        raise FileNotFoundError(f"no prior in {run}: train one first (lasers prior train {run})")
    saved = read_checkpoint(ckpt, device)
    _check_autoencoder(ckpt, saved, fingerprint)
    cfg = PriorConfig.from_dict(saved["config"])
    prior = _build_prior(model, grammar, saved["tokens_per_image"], tuple(saved["latent_shape"]), cfg).to(device)
    _check_codes(ckpt, saved, prior)
    prior.load_state_dict(saved["best"]["model"] if saved.get("best") else saved["model"])
    return model, prior.eval(), grammar, tuple(saved["latent_shape"]), cfg


def load_prior(run: str | Path, device: torch.device | str = "cpu"):
    """(autoencoder, prior, grammar, latent shape) of a run whose prior was trained (eval mode; the checkpoint that
    the sample-FID selection chose, when the prior was trained with ``fid_every``)."""
    return _load_prior(run, device)[:4]


def sample_images(run: str | Path, n: int = 64, *, temperature: float | None = None, top_k: int | None = None,
                  top_p: float | None = None, coeff_temperature: float | None = None, seed: int = 0,
                  device: torch.device | str = "cpu", progress: bool = True) -> Tensor:
    """n images (n, C, H, W) in [0, 1] sampled from the prior of ``run`` and decoded by its autoencoder; sampler
    settings left None are the prior's own (its training options); ``device`` is "auto", "cpu" or "cuda"."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if temperature is not None:
        check_temperature(temperature)
    model, prior, grammar, shape, cfg = _load_prior(run, resolve_device(str(device)))
    given = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "coeff_temperature": coeff_temperature}
    sampler = {**cfg.sampler(), **{k: v for k, v in given.items() if v is not None}}
    return _sample_decoded(model, prior, grammar, shape, n, sampler, seed, progress)


def format_stage2_table(results: dict[str, dict]) -> str:
    """The stage-2 table of {model name: train_prior's evaluation} (markdown)."""
    head = ("| model | prior | tokens / image | bits / image | prior parameters | prior steps (selected) | s / step | "
            "NLL (bits / dim) | sample FID (images) | reconstruction FID (images) |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name, r in results.items():
        fid = f"{r['fid']:.2f} ({r['fid_images']})" if r.get("fid") is not None else "-"
        rec = f"{r['recon_fid']:.2f} ({r['recon_fid_images']})" if r.get("recon_fid") is not None else "-"
        per_step = f"{r['seconds_per_step']:.3f}" if r.get("seconds_per_step") else "-"
        rows.append(f"| {name} | {r.get('prior', 'flat')} | {r['tokens_per_image']} | {r['bits_per_image']:.0f} | "
                    f"{r['prior_parameters'] / 1e6:.2f} M | {r['steps']} ({r.get('selected_step', r['steps'])}) | "
                    f"{per_step} | {r['nll_bits_per_dim']:.4f} | {fid} | {rec} |")
    return "\n".join([head, *rows])


def compare_stage2(cfg: TrainConfig, prior_cfg: PriorConfig, models: list[str] | None = None) -> dict[str, dict]:
    """``lasers compare`` of ``models`` (default VQ-VAE and DL-VAE; a DL model gets coefficient tokens:
    ``coeff_bins`` 16 unless set), then a prior of the same class and budget over each one's tokens; writes
    stage2.md/.json and the sample grids under ``cfg.out`` and prints the table. Returns {model name: prior
    evaluation}."""
    prior_cfg.validate()
    if cfg.coeff_bins is None:
        cfg = dataclasses.replace(cfg, coeff_bins=16)
    names = list(models) if models is not None else ["vq-vae", "dl-vae"]
    compare(cfg, models=names)
    base = Path(cfg.out)
    results = {name: train_prior(base / name, prior_cfg) for name in names}
    table = format_stage2_table(results)
    write_text(base / "stage2.md", table + "\n")
    write_json(base / "stage2.json", results)
    (base / "pictures").mkdir(exist_ok=True)
    for name in results:
        shutil.copyfile(base / name / PRIOR_DIR / "samples.png", base / "pictures" / f"samples-{name}.png")
    print(table)
    print(f"\nsamples: {base / 'pictures'}/samples-*.png; table: {base / 'stage2.md'}")
    return results
