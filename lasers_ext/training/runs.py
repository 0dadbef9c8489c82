"""A run directory and its checkpoint: atomic writes, the metrics records, RNG states, and TrainState (what a
checkpoint holds, for saving, resuming and loading).

A run lives in one directory (``TrainConfig.out``)::

    config.json        the full configuration, plus notes (perceptual loss used or not and why, world size, versions)
    metrics.jsonl      one JSON record per logged training step ({"kind": "train", ...}) and per evaluation
    checkpoint.pt      the latest checkpoint (written to a temporary file, then renamed: never half-written)
    eval.json/eval.md  the final evaluation
    pictures/          reconstructions, FLIP heatmaps, training curves, atom images, 2-D atom embedding
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..models import Autoencoder, GANLoss, PatchDiscriminator
from .config import ARCHITECTURE, PAPER_LEVERS, RESUMABLE, TrainConfig, build_model

__all__ = ["CHECKPOINT", "TrainState", "atomic_write", "write_json", "write_text", "writable_dir", "writable_file",
           "read_records", "truncate_records", "append_record", "replace_eval_record", "read_checkpoint",
           "save_checkpoint", "seed_everything", "rng_state", "set_rng_state", "load_run", "model_fingerprint"]

CHECKPOINT = "checkpoint.pt"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
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


def write_text(path: Path, text: str) -> None:
    """Writes the text file ``path`` atomically (see atomic_write)."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def _probe_write(directory: Path) -> None:
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".lasers-write-test-"):
        pass


def writable_dir(path: str | Path) -> Path:
    """``path`` as a directory that exists and takes new files (created with its parents if needed), checked before
    any work that would write there; ValueError naming it otherwise (a file, a read-only place, no space)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file: give a directory (new or existing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        _probe_write(path)
    except OSError as err:
        raise ValueError(f"cannot write to {path}: {err.strerror or err}") from None
    return path


def writable_file(path: str | Path, suffixes: set[str] | None = None) -> Path:
    """``path`` as a file that can be written (its folder is checked with writable_dir); with ``suffixes``, its
    extension must be one of them (lower case, with the dot). ValueError naming the problem otherwise."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory: give the file to write")
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise ValueError(f"{path} needs a file extension that says the format, one of "
                         f"{', '.join(sorted(suffixes)[:8])}, ...")
    writable_dir(path.parent)
    return path


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
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def saved_config(saved: dict) -> TrainConfig:
    """The configuration stored in a checkpoint; those written before legacy_weighting existed trained with taming's
    weighting, those written before the DL levers existed with the paper's (PAPER_LEVERS)."""
    return TrainConfig.from_dict({"legacy_weighting": True, **PAPER_LEVERS, **saved["config"]})


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
    resumes: list[dict] = dataclasses.field(default_factory=list)  # [{"step", "changed": {name: [old, new]}}]

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
            "rng": rng_state(), "world_size": world_size, "resumes": self.resumes})

    def resume(self, path: Path, device: torch.device) -> dict[str, list]:
        """Loads the checkpoint at ``path`` into this state (models, optimisers, step, RNG states) and returns the
        options this configuration changes, {name: [old, new]}. Only the RESUMABLE options may change (a new learning
        rate is set in the restored optimisers); any other change raises ValueError naming it, as the run would no
        longer be what its records say."""
        saved = read_checkpoint(path, device)
        old = saved_config(saved)
        changed = {f.name: [getattr(old, f.name), getattr(self.cfg, f.name)] for f in dataclasses.fields(TrainConfig)
                   if getattr(old, f.name) != getattr(self.cfg, f.name)}
        refused = [f"{name}={a!r} (now {b!r})" for name, (a, b) in changed.items() if name not in RESUMABLE]
        if saved.get("channels", self.channels) != self.channels:
            refused.append(f"image channels {saved['channels']} (now {self.channels}: see --gray and --data)")
        if refused:
            kind = "architecture" if any(r.split("=")[0] in ARCHITECTURE for r in refused) else "training"
            raise ValueError(f"{path} was trained with {', '.join(refused)}; this {kind} setting cannot change in a "
                             f"run. Resume with the run's own settings (--config {path.parent / 'config.json'} "
                             "repeats them), or give another --out for a new run")
        self.model.load_state_dict(saved["model"])
        self.opt.load_state_dict(saved["opt"])
        _set_lr(self.opt, self.cfg.lr)
        if self.gan is not None:
            self.gan.load_state_dict(saved["gan"])
            self.opt_d.load_state_dict(saved["opt_d"])
            _set_lr(self.opt_d, self.cfg.disc_lr or self.cfg.lr)
        self.step = saved["step"]
        self.resumes = saved.get("resumes", [])
        set_rng_state(saved["rng"])
        changed.pop("out", None)
        if changed:
            self.resumes = [*self.resumes, {"step": self.step, "changed": changed}]
        return changed

    @classmethod
    def load(cls, path: Path, device: torch.device | str, fallback_channels: int | None = None) -> TrainState:
        """The model of the checkpoint at ``path`` with its configuration and step, for evaluation (no optimisers).
        ``fallback_channels`` serves checkpoints written before the channels were stored in them."""
        saved = read_checkpoint(path, device)
        cfg = saved_config(saved)
        channels = saved.get("channels", fallback_channels)
        if channels is None:
            raise ValueError(f"{path} does not say how many image channels its model takes")
        model = build_model(cfg, channels).to(device)
        model.load_state_dict(saved["model"])
        return cls(cfg, channels, model.eval(), step=saved["step"])


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def model_fingerprint(model: torch.nn.Module) -> str:
    """A content hash of ``model``'s state (names, dtypes, shapes and bytes of every tensor): files derived from a
    model (token caches, priors) are keyed on it, so a retrained model never meets another's files."""
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        t = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{t.dtype}:{tuple(value.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a crash: everything after it is lost anyway
    return records


def truncate_records(path: Path, step: int) -> None:
    """Drops records logged after ``step`` (the steps a crash lost), so a resumed run logs each step once."""
    kept = [r for r in read_records(path) if r["step"] <= step]
    write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def append_record(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def replace_eval_record(path: Path, record: dict) -> None:
    """Appends the evaluation ``record`` in place of any earlier evaluation at its step (a finished run evaluated
    again keeps one record per step)."""
    kept = [r for r in read_records(path) if not (r["kind"] == "eval" and r["step"] == record["step"])]
    write_text(path, "".join(json.dumps(r) + "\n" for r in [*kept, record]))


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


