"""Training, evaluation and side-by-side comparison of the paper's four models: DL-VAE, DL-GAN, VQ-VAE, VQ-GAN.

A run lives in one directory (``TrainConfig.out``)::

    config.json        the full configuration, plus notes (perceptual loss used or not and why, world size, versions)
    metrics.jsonl      one JSON record per logged training step ({"kind": "train", ...}) and per evaluation
    checkpoint.pt      the latest checkpoint (written to a temporary file, then renamed: never half-written)
    eval.json/eval.md  the final evaluation
    pictures/          reconstructions, FLIP heatmaps, training curves, atom images, 2-D atom embedding

Running ``train`` again on the same directory resumes from ``checkpoint.pt``: model, optimisers, EMA codebook
buffers, RNG states and step, with the data stream positioned where the checkpoint left it, so a killed run loses at
most the steps since its last checkpoint and ends with the same parameters as an uninterrupted one (on CPU, bit for
bit). Under ``torchrun`` every process runs the same loop with DistributedDataParallel; see :mod:`.distributed`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
import time
import typing
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from . import distributed, metrics, plots
from .data import build_dataset
from .models import Autoencoder, GANLoss, PatchDiscriminator, ReconstructionLoss, build_autoencoder
from .quantizer import QuantizerInfo
from .tasks import TASKS, degrade

__all__ = ["MODELS", "TrainConfig", "TrainState", "train", "evaluate", "evaluate_run", "compare", "load_run",
           "format_results_table"]

MODELS = ("dl-vae", "dl-gan", "vq-vae", "vq-gan")
CHECKPOINT = "checkpoint.pt"
# Fields that fix the saved tensors or the objective: a checkpoint resumes only under the same values.
_ARCHITECTURE = ("model", "hidden", "res_hidden", "n_res_blocks", "n_e", "e_dim", "sparsity",
                 "patch_size", "ndf", "disc_layers", "coeff_bins", "coeff_quant", "legacy_weighting")


def _opt(default, help: str, **kw):
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def _check_choices(cfg) -> None:
    """ValueError naming the first field of the dataclass ``cfg`` whose value is not among its metadata choices."""
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, f.name) not in choices:
            raise ValueError(f"{f.name} must be one of {', '.join(choices)}, got {getattr(cfg, f.name)!r}")


def _config_from_dict(cls, values: dict):
    """An instance of the options dataclass ``cls`` (TrainConfig, PriorConfig) from a dict (a --config file, a
    checkpoint): unknown keys and values of the wrong type raise ValueError naming the key (an int is accepted for a
    float field)."""
    if not isinstance(values, dict):
        raise ValueError(f"a configuration must be a JSON object of option values, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown configuration keys: {', '.join(sorted(unknown))}")
    hints = typing.get_type_hints(cls)
    checked = {}
    for name, value in values.items():
        types = tuple(t for t in (typing.get_args(hints[name]) or (hints[name],)))
        if value is None and type(None) in types:
            checked[name] = value
            continue
        if float in types and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            wanted = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise ValueError(f"configuration value {name}={value!r} must be {wanted}")
        checked[name] = value
    return cls(**checked)


def resolve_device(name: str) -> torch.device:
    """"auto" (CUDA when available, else CPU), "cpu" or "cuda"; ValueError for "cuda" without a GPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for but no CUDA GPU is available")
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


@dataclasses.dataclass
class TrainConfig:
    """Everything a run needs. Every field is also a command-line flag (``--batch-size`` for ``batch_size``)."""

    model: str = _opt("dl-vae", "dl-vae, dl-gan (dictionary learning, Batch-OMP), vq-vae, vq-gan (EMA vector "
                      "quantiser)", choices=MODELS)
    out: str = _opt("runs/dl-vae", "run directory (config, metrics, checkpoint, pictures); an existing checkpoint "
                    "there is resumed")
    # data
    data: str = _opt("photos", "photos (bundled with scikit-image, the default), fashion-mnist, mnist, cifar10 or "
                     "folder", choices=("photos", "fashion-mnist", "mnist", "cifar10", "folder"))
    data_root: str | None = _opt(None, "folder with the data set's files (mnist: IDX files, cifar10: python batches, "
                                 "folder: images; fashion-mnist defaults to /usr/share/datasets/fashion-mnist)")
    image_size: int | None = _opt(None, "crop size for photos (default 32) and folder (default 256)")
    gray: bool = _opt(False, "convert colour images to one channel")
    train_length: int | None = _opt(None, "photos only: random crops per epoch (default 4096)")
    workers: int = _opt(0, "DataLoader worker processes per training process")
    task: str = _opt("reconstruction", "what the model learns: reconstruction, or the paper's downstream tasks "
                     "(supplementary 12) super-resolution (bicubic x4 down and up) and inpainting (a centred square "
                     "of 0.25 of the side set to 0): degraded input, the original as target", choices=TASKS)
    # model (paper section 5)
    hidden: int = _opt(128, "hidden channels of encoder and decoder")
    res_hidden: int = _opt(32, "hidden channels inside a residual block")
    n_res_blocks: int = _opt(2, "residual blocks in encoder and in decoder")
    n_e: int = _opt(512, "atoms in the dictionary / codewords in the codebook (K)")
    e_dim: int = _opt(16, "latent channels = atom / codeword dimension")
    sparsity: int = _opt(5, "DL only: atoms per latent vector (S)")
    beta: float = _opt(0.25, "commitment weight of the bottleneck loss")
    legacy_weighting: bool = _opt(False, "taming's weighting (legacy=True: beta on the codebook/dictionary term) "
                                  "instead of the paper's equation 13 (beta on the commitment term)")
    patch_size: int = _opt(1, "DL only: code non-overlapping patch_size x patch_size latent patches as one vector")
    coeff_bins: int | None = _opt(None, "DL only: quantise coefficients to this many bins, making the codes stage-2 "
                                  "tokens (default: real coefficients)")
    coeff_quant: str = _opt("uniform", "DL only: coefficient levels with --coeff-bins: uniform or mulaw",
                            choices=("uniform", "mulaw"))
    ema_decay: float = _opt(0.99, "VQ only: EMA decay of the codebook")
    backend: str = _opt("auto", "DL only: Batch-OMP backend (auto, cpu, cuda, triton, reference)")
    dictionary_update: str = _opt("gradient", "DL only: 'gradient' (the optimiser learns the dictionary, codes held "
                                  "fixed) or 'online' (the paper's learning-rate-free update, supplementary section "
                                  "8; all-reduced under torchrun)", choices=("gradient", "online"))
    # optimisation
    steps: int = _opt(2000, "total training steps (optimiser updates)")
    batch_size: int = _opt(32, "GLOBAL batch size: the sum over all processes (each takes batch_size / world size)")
    lr: float = _opt(1e-4, "Adam learning rate of the autoencoder (paper: 1e-4)")
    eta: float = _opt(0.5, "weight of L2 in the reconstruction loss eta*L2 + (1-eta)*LPIPS (L2 alone when LPIPS "
                      "weights are not on disk)")
    perceptual: bool = _opt(True, "use LPIPS in the loss when its pretrained weights are already on disk")
    # GAN variants
    disc_start: int = _opt(1000, "GAN only: step at which the discriminator is switched on")
    disc_weight: float = _opt(1.0, "GAN only: factor on the adaptive GAN weight")
    disc_lr: float | None = _opt(None, "GAN only: discriminator learning rate (default: lr)")
    ndf: int = _opt(64, "GAN only: discriminator base channels")
    disc_layers: int = _opt(3, "GAN only: PatchGAN downsampling layers")
    # bookkeeping
    seed: int = _opt(0, "seed of weights, data order and crops")
    device: str = _opt("auto", "auto, cpu or cuda", choices=("auto", "cpu", "cuda"))
    amp: bool = _opt(True, "bfloat16 autocast on CUDA (the Batch-OMP coding itself stays float32)")
    log_every: int = _opt(10, "steps between training-metric records")
    eval_every: int = _opt(500, "steps between evaluations on the test split (0: only at the end)")
    eval_images: int = _opt(256, "test images per evaluation (0: the whole test split)")
    fid_images: int = _opt(0, "images for FID in the final evaluation (0: no FID; ~0.4 s per image on 2 CPU cores)")
    checkpoint_every: int = _opt(250, "steps between checkpoints")
    progress: bool = _opt(True, "show a progress bar")

    @property
    def kind(self) -> str:
        """'dl' or 'vq'."""
        return self.model.split("-")[0]

    @property
    def gan(self) -> bool:
        return self.model.endswith("-gan")

    def validate(self) -> TrainConfig:
        """Raises ValueError naming the first bad field; returns self."""
        _check_choices(self)
        positive = ("steps", "batch_size", "hidden", "res_hidden", "n_e", "e_dim", "sparsity", "patch_size", "ndf",
                    "disc_layers", "log_every", "checkpoint_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "eval_images", "fid_images", "workers", "n_res_blocks", "disc_start", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (self.lr > 0 and (self.disc_lr is None or self.disc_lr > 0)):
            raise ValueError("learning rates must be > 0")
        if not 0 <= self.eta <= 1:
            raise ValueError(f"eta must be in [0, 1], got {self.eta}")
        if self.kind == "dl" and self.sparsity > min(self.n_e, self.e_dim * self.patch_size ** 2):
            raise ValueError(f"sparsity must be <= min(n_e, e_dim * patch_size^2) = "
                             f"{min(self.n_e, self.e_dim * self.patch_size ** 2)}, got {self.sparsity}")
        if self.coeff_bins is not None and self.coeff_bins < 2:
            raise ValueError(f"coeff_bins must be None or >= 2, got {self.coeff_bins}")
        if self.fid_images == 1:
            raise ValueError("fid_images must be 0 (off) or >= 2")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """A configuration from a dict (a --config file, a checkpoint); see _config_from_dict."""
        return _config_from_dict(cls, values)


# ----------------------------------------------------------------------------------------------------------- pieces
def _dataset(cfg: TrainConfig, split: str):
    """The "train" or "test" split of the run's data (``train_length`` applies to training crops only)."""
    return build_dataset(cfg.data, split, root=cfg.data_root, size=cfg.image_size, gray=cfg.gray,
                         length=cfg.train_length if split == "train" else None, seed=cfg.seed)


def build_model(cfg: TrainConfig, in_channels: int) -> Autoencoder:
    """The autoencoder of ``cfg`` (weights drawn from the current torch RNG)."""
    return build_autoencoder(cfg.kind, in_channels=in_channels, hidden=cfg.hidden, res_hidden=cfg.res_hidden,
                             n_res_blocks=cfg.n_res_blocks, n_e=cfg.n_e, e_dim=cfg.e_dim, sparsity=cfg.sparsity,
                             beta=cfg.beta, patch_size=cfg.patch_size, backend=cfg.backend,
                             ema_decay=cfg.ema_decay, dictionary_update=cfg.dictionary_update,
                             coeff_bins=cfg.coeff_bins if cfg.kind == "dl" else None, coeff_quant=cfg.coeff_quant,
                             legacy=cfg.legacy_weighting)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Writes ``path`` through a temporary file in the same folder and a rename, so readers (and a resume after a
    crash) see either the old or the new file, never a partial one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


CHECKPOINT_FIELDS = ("config", "model", "opt", "step")


def read_checkpoint(path: Path, device: torch.device | str) -> dict:
    """The state saved by :func:`save_checkpoint` at ``path``. A file that cannot be read as one (empty, truncated,
    not a checkpoint) raises ValueError naming it; nothing is changed on disk."""
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as err:  # torch.load raises EOFError, UnpicklingError, RuntimeError, OSError, ... by cause
        raise ValueError(f"{path} is not a readable checkpoint ({type(err).__name__}: {err}). It is damaged or was "
                         "not written by the lasers training tool; nothing was changed. Move it away (or restore it "
                         "from a backup) to train this run directory afresh.") from err
    missing = [f for f in CHECKPOINT_FIELDS if not isinstance(state, dict) or f not in state]
    if missing:
        raise ValueError(f"{path} is not a lasers checkpoint (missing {', '.join(missing)}); nothing was changed. "
                         "Move it away to train this run directory afresh.")
    return state


def save_checkpoint(path: Path, state: dict) -> None:
    _atomic_write(path, lambda tmp: torch.save(state, tmp))


def _saved_config(saved: dict) -> TrainConfig:
    """The configuration stored in a checkpoint; those written before legacy_weighting existed trained with taming's
    weighting."""
    return TrainConfig.from_dict({"legacy_weighting": True, **saved["config"]})


@dataclasses.dataclass
class TrainState:
    """What a checkpoint holds, in one definition for saving, resuming and loading a run: the configuration, the
    image channels, the autoencoder and its optimiser, the GAN loss (discriminator) and its optimiser for GAN models,
    the step, and (in the file) the RNG states."""

    cfg: TrainConfig
    channels: int
    model: Autoencoder
    opt: torch.optim.Optimizer | None = None
    gan: GANLoss | None = None
    opt_d: torch.optim.Optimizer | None = None
    step: int = 0

    @classmethod
    def build(cls, cfg: TrainConfig, channels: int, device: torch.device) -> TrainState:
        """A fresh state for training: weights drawn from the current torch RNG, step 0."""
        model = build_model(cfg, channels).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        gan = opt_d = None
        if cfg.gan:
            gan = GANLoss(PatchDiscriminator(channels, cfg.ndf, cfg.disc_layers), cfg.disc_start,
                          cfg.disc_weight).to(device)
            opt_d = torch.optim.Adam(gan.parameters(), lr=cfg.disc_lr or cfg.lr, betas=(0.5, 0.9))
        return cls(cfg, channels, model, opt, gan, opt_d)

    def save(self, path: Path, world_size: int) -> None:
        """Writes the checkpoint atomically (see save_checkpoint)."""
        gan_state = None
        if self.gan is not None:  # the discriminator's keys without DDP's "module." level
            gan_state = {k.replace("discriminator.module.", "discriminator."): v
                         for k, v in self.gan.state_dict().items()}
        save_checkpoint(path, {
            "config": self.cfg.to_dict(), "channels": self.channels, "step": self.step,
            "model": self.model.state_dict(), "opt": self.opt.state_dict(),
            "gan": gan_state, "opt_d": self.opt_d.state_dict() if self.opt_d is not None else None,
            "rng": _rng_state(), "world_size": world_size})

    def resume(self, path: Path, device: torch.device) -> None:
        """Loads the checkpoint at ``path`` into this state (models, optimisers, step, RNG states); ValueError if it
        was trained with another architecture or number of image channels."""
        saved = read_checkpoint(path, device)
        old = _saved_config(saved)
        changed = [f for f in _ARCHITECTURE if getattr(old, f) != getattr(self.cfg, f)]
        if saved.get("channels", self.channels) != self.channels:
            changed.append(f"image channels ({saved['channels']}, now {self.channels}: see --gray and --data)")
        if changed:
            raise ValueError(f"{path} was trained with other {', '.join(changed)}; use another --out or the same "
                             "settings to resume")
        self.model.load_state_dict(saved["model"])
        self.opt.load_state_dict(saved["opt"])
        if self.gan is not None:
            self.gan.load_state_dict(saved["gan"])
            self.opt_d.load_state_dict(saved["opt_d"])
        self.step = saved["step"]
        _set_rng_state(saved["rng"])

    @classmethod
    def load(cls, path: Path, device: torch.device | str, fallback_channels: int | None = None) -> TrainState:
        """The model of the checkpoint at ``path`` with its configuration and step, for evaluation (no optimisers).
        ``fallback_channels`` serves checkpoints written before the channels were stored in them."""
        saved = read_checkpoint(path, device)
        cfg = _saved_config(saved)
        channels = saved.get("channels", fallback_channels)
        if channels is None:
            raise ValueError(f"{path} does not say how many image channels its model takes")
        model = build_model(cfg, channels).to(device)
        model.load_state_dict(saved["model"])
        return cls(cfg, channels, model.eval(), step=saved["step"])


def _write_json(path: Path, obj) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def _read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a crash: everything after it is lost anyway
    return records


def _truncate_records(path: Path, step: int) -> None:
    """Drops records logged after ``step`` (the steps a crash lost), so a resumed run logs each step once."""
    kept = [r for r in _read_records(path) if r["step"] <= step]
    _atomic_write(path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in kept)))


def _append_record(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def _to_model(x: Tensor) -> Tensor:
    """Images in [0, 1] -> the model's [-1, 1]."""
    return x * 2 - 1


def _to_image(x: Tensor) -> Tensor:
    """Model outputs -> images in [0, 1] (clamped)."""
    return ((x.float() + 1) / 2).clamp(0, 1)


# ------------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: Autoencoder, dataset, *, device: torch.device | str = "cpu", max_images: int = 0,
             fid_images: int = 0, batch_size: int = 64, lpips: nn.Module | None = None,
             progress: bool = False, task: str = "reconstruction") -> dict:
    """Reconstruction quality of ``model`` on the first ``max_images`` images of ``dataset`` (0: all), given each
    image degraded for ``task`` (see :mod:`lasers_ext.tasks`) and measured against the original.

    Returns a dict: ``psnr`` (dB), ``ssim`` (mean, skimage-compatible Gaussian SSIM), ``flip`` (mean LDR-FLIP),
    ``lpips`` (None when LPIPS is unavailable), ``latent_error`` (the latent reconstruction error ||z - z_q||^2 of
    section 5.1, mean over latent entries), ``perplexity`` and ``active_atoms`` of the code usage over all
    evaluated images, ``images``; with ``fid_images`` >= 2 also ``fid``, ``fid_images`` and ``fid_network``.
    """
    was_training = model.training
    model.eval()
    n = len(dataset) if max_images == 0 else min(max_images, len(dataset))
    loader = DataLoader(Subset(dataset, range(n)), batch_size=batch_size, shuffle=False)
    n_e = model.bottleneck.n_e
    counts = torch.zeros(n_e, dtype=torch.long)
    sums = {"psnr": 0.0, "ssim": 0.0, "flip": 0.0, "lpips": 0.0, "latent_error": 0.0}
    fid = metrics.FID(device) if fid_images >= 2 else None
    fid_seen = 0
    for x in tqdm(loader, desc="evaluate", disable=not progress, leave=False):
        x = x.to(device)
        _, y, latents, info = _outputs(model, x, task)
        sums["latent_error"] += ((latents["z"] - latents["z_q"]) ** 2).flatten(1).mean(1).sum().item()
        sums["psnr"] += metrics.psnr(x, y).clamp(max=100.0).sum().item()  # identical images: cap inf at 100 dB
        sums["ssim"] += metrics.ssim(x, y).sum().item()
        sums["flip"] += metrics.flip(x, y)[0].sum().item()
        if lpips is not None:
            sums["lpips"] += lpips(x, y).sum().item()
        counts += metrics.code_counts(info.atom_indices.cpu(), n_e)
        if fid is not None and fid_seen < fid_images:
            take = min(fid_images - fid_seen, len(x))
            fid.update(x[:take], real=True)
            fid.update(y[:take], real=False)
            fid_seen += take
    model.train(was_training)
    result = {k: v / n for k, v in sums.items()}
    if lpips is None:
        result["lpips"] = None
    result.update(perplexity=metrics.perplexity(counts), active_atoms=int((counts > 0).sum()), images=n)
    if fid is not None:
        if fid_seen < 2:
            raise ValueError(f"FID needs at least 2 test images, the test split has {fid_seen}")
        computed = fid.compute()
        result.update(fid=computed["fid"], fid_images=fid_seen, fid_network=computed["network"])
    result["counts"] = counts
    return result


def _public(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "counts"}


# --------------------------------------------------------------------------------------------------------- training
def _perceptual(cfg: TrainConfig, device: torch.device) -> tuple[nn.Module | None, str]:
    if not cfg.perceptual:
        return None, "L2 only (perceptual loss switched off by the configuration)"
    net = metrics.lpips_network(device)
    if net is None:
        return None, f"L2 only: {metrics.lpips_status()}"
    return net, f"eta*L2 + (1-eta)*LPIPS with eta={cfg.eta}"


def train(cfg: TrainConfig, *, callback: Callable[[int, dict], None] | None = None) -> dict:
    """Trains (or resumes, or just re-evaluates a finished run in) ``cfg.out``; returns the final evaluation.

    ``callback(step, record)`` runs after every optimiser step on every rank (record: that step's local metrics as
    floats); an exception raised there stops training like a crash would (the last checkpoint stays).
    """
    cfg.validate()
    # Rank 0 evaluates alone (FID on a CPU can take long) while the others wait in a collective: allow an hour.
    ctx = distributed.setup(cfg.device, timeout_s=3600.0)
    try:
        return _train(cfg, ctx, callback)
    finally:
        distributed.teardown()


def _train(cfg: TrainConfig, ctx: distributed.Context, callback) -> dict:
    if cfg.batch_size % ctx.world_size:
        raise ValueError(f"batch_size ({cfg.batch_size}) is the global batch size and must be a multiple of the "
                         f"number of processes ({ctx.world_size})")
    local_batch = cfg.batch_size // ctx.world_size
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a run directory (new or existing)")
    pictures = out / "pictures"
    if ctx.is_main:
        pictures.mkdir(parents=True, exist_ok=True)
    distributed.barrier(ctx)

    _seed_everything(cfg.seed)
    train_set, test_set = _dataset(cfg, "train"), _dataset(cfg, "test")
    state = TrainState.build(cfg, train_set.channels, ctx.device)
    model, gan = state.model, state.gan
    perceptual, loss_note = _perceptual(cfg, ctx.device)
    rec_loss_fn = ReconstructionLoss(cfg.eta, perceptual)
    ckpt_path = out / CHECKPOINT
    if ckpt_path.exists():
        state.resume(ckpt_path, ctx.device)
    step = state.step
    if ctx.is_main:
        if step:
            _truncate_records(out / "metrics.jsonl", step)
        notes = {"reconstruction_loss": loss_note, "world_size": ctx.world_size, "local_batch_size": local_batch,
                 "device": str(ctx.device), "torch": torch.__version__, "resumed_from_step": step,
                 "channels": train_set.channels, "image_size": list(train_set.image_size)}
        _write_json(out / "config.json", {"config": cfg.to_dict(), "notes": notes})
        print(f"[{cfg.model}] {out}: reconstruction loss {loss_note}", file=sys.stderr)

    net: nn.Module = model
    if ctx.distributed:
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=ids)
        if gan is not None:
            sync_bn = nn.SyncBatchNorm.convert_sync_batchnorm(gan.discriminator)
            gan.discriminator = DistributedDataParallel(sync_bn, device_ids=ids)

    sampler = distributed.ResumableSampler(train_set, ctx.world_size, ctx.rank, cfg.seed)
    # the loader's own generator: drawing worker seeds must not move the global RNG (resume restores that exactly)
    loader = DataLoader(train_set, batch_size=local_batch, sampler=sampler, num_workers=cfg.workers,
                        drop_last=True, pin_memory=ctx.device.type == "cuda",
                        generator=torch.Generator().manual_seed(cfg.seed))
    batches_per_epoch = sampler.num_samples // local_batch
    if batches_per_epoch == 0:
        raise ValueError(f"the training split has {len(train_set)} images, fewer than one batch of {cfg.batch_size}")
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.amp and ctx.device.type == "cuda"
                else nullcontext())
    metrics_path = out / "metrics.jsonl"

    def checkpoint() -> None:
        if ctx.is_main:
            state.step = step
            state.save(ckpt_path, ctx.world_size)
        distributed.barrier(ctx)

    def run_eval(fid_images: int = 0, progress: bool = False) -> dict:
        """Rank 0 only: evaluates on the test split and logs the record."""
        result = evaluate(model, test_set, device=ctx.device, max_images=cfg.eval_images, lpips=perceptual,
                          fid_images=fid_images, progress=progress, task=cfg.task)
        _append_record(metrics_path, {"kind": "eval", "step": step, **_public(result)})
        return result

    bar = tqdm(total=cfg.steps, initial=step, desc=cfg.model, disable=not (ctx.is_main and cfg.progress),
               dynamic_ncols=True, file=sys.stderr)
    window: dict[str, list[Tensor]] = {}
    usage = torch.zeros(cfg.n_e, dtype=torch.float64, device=ctx.device)  # code histogram of the logging window
    start = time.perf_counter()
    epoch, offset = divmod(step, batches_per_epoch)
    while step < cfg.steps:
        sampler.set_epoch(epoch, skip=offset * local_batch)
        train_set.set_epoch(epoch)
        for x in loader:
            x = x.to(ctx.device, non_blocking=True)
            stats, codes = _train_step(state, net, _to_model(degrade(x, cfg.task)), step, rec_loss_fn, autocast,
                                       target=_to_model(x))
            usage.index_add_(0, codes.clamp(min=0), (codes >= 0).to(usage.dtype))  # no host sync
            step += 1
            for k, v in stats.items():
                window.setdefault(k, []).append(v.detach().float())
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                means = _log_window(ctx, window, usage, metrics_path,
                                    {"kind": "train", "step": step, "epoch": epoch,
                                     "elapsed_s": time.perf_counter() - start})
                bar.set_postfix(loss=f"{means['loss']:.4f}", psnr=f"{means['psnr']:.2f}",
                                ppl=f"{means['perplexity']:.1f}")
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps and ctx.is_main:
                run_eval()
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                checkpoint()
            if callback is not None:
                callback(step, {k: float(v) for k, v in stats.items()})
            if step >= cfg.steps:
                break
        epoch, offset = epoch + 1, 0
    bar.close()

    final: dict = {}
    if ctx.is_main:
        result = run_eval(cfg.fid_images, cfg.progress)
        final = _save_evaluation(out, cfg.model, step, result)
        _run_pictures(model, test_set, out, ctx.device, result["counts"], cfg.task)
    distributed.barrier(ctx)
    return final


def _train_step(state: TrainState, net: nn.Module, x: Tensor, step: int, rec_loss_fn: ReconstructionLoss,
                autocast, target: Tensor | None = None) -> tuple[dict[str, Tensor], Tensor]:
    """One optimiser step of the autoencoder on the batch x (B, C, H, W) in [-1, 1] towards ``target`` (default x;
    the original images for a downstream task), and of the discriminator for GAN models once it is active (real
    images: the target); ``net`` is the model or its DDP wrapper. Returns the step's statistics (0-dim tensors, no
    host sync) and its codes (flattened indices, -1 for unused slots)."""
    inputs, x = x, (x if target is None else target)
    with autocast:
        x_rec, q_loss, info = net(inputs)
    x_rec = x_rec.float()
    rec = rec_loss_fn(x, x_rec)
    loss = rec + q_loss.float()
    stats = {"loss": loss.detach(), "rec_loss": rec.detach(), "q_loss": q_loss.detach().float(),
             "psnr": metrics.psnr(_to_image(x), _to_image(x_rec.detach())).clamp(max=100).mean()}
    gan = state.gan
    if gan is not None:
        g_term, g_stats = gan.generator_loss(rec, x_rec, state.model.last_layer, step)
        loss = loss + g_term
        stats.update(g_stats)
    state.opt.zero_grad(set_to_none=True)
    loss.backward()
    state.opt.step()
    if gan is not None and gan.active(step):
        state.opt_d.zero_grad(set_to_none=True)
        d_loss, d_stats = gan.discriminator_loss(x, x_rec, step)
        d_loss.backward()
        state.opt_d.step()
        stats.update(d_stats)
    return stats, info.atom_indices.detach().reshape(-1)


def _log_window(ctx: distributed.Context, window: dict[str, list[Tensor]], usage: Tensor, path: Path,
                record: dict) -> dict[str, float]:
    """Closes a logging window: the means of its step statistics over all steps and ranks, and the perplexity of all
    codes used in it (the ranks' histograms summed); rank 0 appends them to ``record`` in the metrics file. Empties
    ``window`` and ``usage``; returns the means."""
    means = distributed.all_reduce_mean(ctx, {k: torch.stack(v).mean() for k, v in window.items()})
    means["perplexity"] = metrics.perplexity(distributed.all_reduce_sum(ctx, usage).cpu())
    window.clear()
    usage.zero_()
    if ctx.is_main:
        _append_record(path, {**record, **means})
    return means


def _picture_batch(test_set, count: int = 8) -> Tensor:
    """``count`` test images spread evenly over the test split (B, C, H, W)."""
    picks = torch.linspace(0, len(test_set) - 1, min(count, len(test_set))).round().long().unique()
    return torch.stack([test_set[int(i)] for i in picks])


def _outputs(model: Autoencoder, x: Tensor, task: str) -> tuple[Tensor, Tensor, dict[str, Tensor], QuantizerInfo]:
    """(task input, output image, {"z": encoder output, "z_q": its quantisation}, the bottleneck's info) of ``model``
    (eval mode, no grad) for images x in [0, 1]."""
    was = model.training
    model.eval()
    with torch.no_grad():
        inputs = degrade(x, task)
        z = model.encoder(_to_model(inputs))
        z_q, _, info = model.bottleneck(z)
        y = _to_image(model.decode(z_q))
    model.train(was)
    return inputs, y, {"z": z, "z_q": z_q}, info


def _run_pictures(model: Autoencoder, test_set, out: Path, device: torch.device, counts: Tensor,
                  task: str = "reconstruction") -> None:
    pictures = out / "pictures"
    x = _picture_batch(test_set).to(device)
    inputs, y, latents, _ = _outputs(model, x, task)
    rows = {"reconstruction": y.cpu()} if task == "reconstruction" else {"input": inputs.cpu(), "output": y.cpu()}
    plots.save_reconstruction_grid(x.cpu(), rows, pictures / "reconstructions.png")
    plots.save_latent_components({f"{k} ({model.kind.upper()})": v.cpu() for k, v in latents.items()},
                                 pictures / "latent_top_component.png")
    plots.save_flip_heatmaps(metrics.flip(x, y)[1].cpu(), pictures / "flip.png")
    records = [r for r in _read_records(out / "metrics.jsonl") if r["kind"] == "train"]
    if records:
        plots.plot_training_curves({out.name: records}, pictures / "curves.png")
    atoms = model.bottleneck.embedding.weight.detach().float().cpu()
    plots.save_atom_images(atoms, pictures / "atoms.png")
    plots.plot_atom_embedding(atoms, pictures / "atoms_embedding.png", usage=counts.float(),
                              title=f"{model.kind.upper()} atoms, coloured by test usage")


# ------------------------------------------------------------------------------------------------ runs and tables
def load_run(run: str | Path, device: torch.device | str = "cpu") -> tuple[TrainConfig, Autoencoder, int]:
    """The configuration, model (eval mode) and step of the checkpoint in run directory ``run``."""
    ckpt = Path(run) / CHECKPOINT
    if not ckpt.exists():
        raise FileNotFoundError(f"no checkpoint at {ckpt}: train a model into {run} first (lasers train --out {run})")
    config_json = Path(run) / "config.json"  # only for checkpoints that predate the stored channels
    fallback = json.loads(config_json.read_text())["notes"]["channels"] if config_json.exists() else None
    state = TrainState.load(ckpt, device, fallback)
    return state.cfg, state.model, state.step


def evaluate_run(run: str | Path, *, device: str = "auto", max_images: int | None = None,
                 fid_images: int | None = None, progress: bool = True) -> dict:
    """Evaluates the checkpoint of ``run`` on its test split; writes eval.json and eval.md there and returns them."""
    dev = resolve_device(device)
    cfg, model, step = load_run(run, dev)
    test_set = _dataset(cfg, "test")
    perceptual, _ = _perceptual(cfg, dev)
    result = evaluate(model, test_set, device=dev, max_images=cfg.eval_images if max_images is None else max_images,
                      fid_images=cfg.fid_images if fid_images is None else fid_images, lpips=perceptual,
                      progress=progress, task=cfg.task)
    return _save_evaluation(Path(run), cfg.model, step, result)


def _save_evaluation(run: Path, model_name: str, step: int, result: dict) -> dict:
    """Writes the evaluation ``result`` of ``run`` at ``step`` as eval.json and eval.md; returns what was written."""
    final = {"model": model_name, "step": step, **_public(result)}
    _write_json(run / "eval.json", final)
    (run / "eval.md").write_text(format_results_table({model_name: final}) + "\n")
    return final


def format_results_table(results: dict[str, dict]) -> str:
    """A markdown table with the paper's columns (PSNR as Table 1, plus SSIM, FLIP, LPIPS, perplexity, FID) and the
    latent reconstruction error ||z - z_q||^2 (section 5.1; "-" for evaluations that predate it)."""
    head = ("| model | steps | PSNR (dB) | SSIM | FLIP | LPIPS | perplexity | active atoms | FID (images) | "
            "latent error |\n|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name, r in results.items():
        lpips = "n/a" if r.get("lpips") is None else f"{r['lpips']:.4f}"
        fid = f"{r['fid']:.2f} ({r['fid_images']})" if r.get("fid") is not None else "-"
        latent = f"{r['latent_error']:.5f}" if r.get("latent_error") is not None else "-"
        rows.append(f"| {name} | {r['step']} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['flip']:.4f} | {lpips} | "
                    f"{r['perplexity']:.1f} | {r['active_atoms']} | {fid} | {latent} |")
    return "\n".join([head, *rows])


def compare(cfg: TrainConfig, *, gan: bool = False, models: list[str] | None = None) -> dict[str, dict]:
    """Trains (or resumes, or loads when finished) a VQ and a DL model with identical encoder/decoder, data, seed
    and budget into ``cfg.out``/vq-vae and ``cfg.out``/dl-vae (``-gan`` with ``gan``; or each of ``models``, e.g.
    all four of MODELS as the paper's Figure 11), prints and writes the side-by-side table (compare.md,
    compare.json) and comparison pictures; returns {model name: evaluation}."""
    suffix = "gan" if gan else "vae"
    names = list(models) if models is not None else [f"vq-{suffix}", f"dl-{suffix}"]
    if models is not None and gan:
        raise ValueError("give either --gan or --models, not both")
    if not names or len(set(names)) != len(names) or not set(names) <= set(MODELS):
        raise ValueError(f"models must be distinct names from {', '.join(MODELS)}, got {names}")
    base = Path(cfg.out)
    configs = {name: dataclasses.replace(cfg, model=name, out=str(base / name)).validate() for name in names}
    results: dict[str, dict] = {}
    for name, run_cfg in configs.items():
        results[name] = train(run_cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return results
    table = format_results_table(results)
    (base / "compare.md").write_text(table + "\n")
    _write_json(base / "compare.json", results)
    _compare_pictures(base, list(results), cfg)
    print(table)
    print(f"\npictures: {base / 'pictures'} (and each run's pictures/ folder); table: {base / 'compare.md'}")
    return results


def _compare_pictures(base: Path, names: list[str], cfg: TrainConfig) -> None:
    runs = {name: [r for r in _read_records(base / name / "metrics.jsonl") if r["kind"] == "train"]
            for name in names}
    plots.plot_training_curves(runs, base / "pictures" / "curves.png")
    x = _picture_batch(_dataset(cfg, "test"))
    recs = {} if cfg.task == "reconstruction" else {"input": degrade(x, cfg.task)}
    maps, latents = {}, {}
    for name in names:
        _, model, _ = load_run(base / name)
        _, y, pair, _ = _outputs(model, x, cfg.task)
        latents.update({f"{k} ({name})": v for k, v in pair.items()})
        recs[name] = y
        maps[name] = metrics.flip(x, y)[1]
    plots.save_reconstruction_grid(x, recs, base / "pictures" / "reconstructions.png")
    plots.save_flip_heatmaps(maps, base / "pictures" / "flip.png")
    plots.save_latent_components(latents, base / "pictures" / "latent_top_component.png")
