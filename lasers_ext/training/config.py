"""The training tool's options: the model table, TrainConfig (every field a flag of ``lasers train``), and the
model and data a configuration describes."""

from __future__ import annotations

import dataclasses
import math
import typing

import torch

from ..models import Autoencoder, build_autoencoder
from .data import build_dataset
from .peers import PEER_KINDS, build_peer, lfq_codebook_size, parse_levels
from .tasks import TASKS

__all__ = ["MODELS", "ARCHITECTURE", "RESUMABLE", "PAPER_LEVERS", "TrainConfig", "option", "check_choices",
           "config_from_dict", "resolve_device", "build_model", "run_dataset"]

# DL, the paper's VQ baseline, and the strong peers of vector-quantize-pytorch (see .peers)
MODELS = ("dl-vae", "dl-gan", "vq-vae", "vq-gan", *(f"{k}-{v}" for k in PEER_KINDS for v in ("vae", "gan")))
# Fields that fix the saved tensors or the objective: a checkpoint resumes only under the same values.
ARCHITECTURE = ("model", "hidden", "res_hidden", "n_res_blocks", "n_e", "e_dim", "sparsity",
                 "patch_size", "ndf", "disc_layers", "coeff_bins", "coeff_quant", "legacy_weighting", "coeff_per_slot",
                 "rvq_quantizers", "fsq_levels", "lfq_bits", "lfq_groups")
# Fields a resumed run may change (honoured from the resumed step on, recorded in config.json): the budget, the
# learning rates, where the data lies, and bookkeeping. Every other field fixes what is trained.
RESUMABLE = ("out", "steps", "lr", "disc_lr", "data_root", "workers", "device", "amp", "backend", "log_every",
             "eval_every", "eval_images", "fid_images", "checkpoint_every", "progress")
MIN_IMAGE_SIZE = 11  # SSIM's 11 x 11 window
# The paper's settings of the dictionary bottleneck's levers (issue 26): what `lasers train --paper-defaults` sets, and
# what a checkpoint written before the levers existed was trained with.
PAPER_LEVERS = {"dict_init": "random", "restart_window": None, "coeff_per_slot": False, "gradient": "straight_through"}



def option(default, help: str, **kw):
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def check_choices(cfg) -> None:
    """ValueError naming the first field of the dataclass ``cfg`` whose value is not among its metadata choices."""
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, f.name) not in choices:
            raise ValueError(f"{f.name} must be one of {', '.join(choices)}, got {getattr(cfg, f.name)!r}")


def config_from_dict(cls, values: dict):
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

    model: str = option("dl-vae", "dl-vae, dl-gan (dictionary learning, Batch-OMP), vq-vae, vq-gan (EMA vector "
                      "quantiser, the paper's baseline), and vector-quantize-pytorch's quantizers: vqp-vae/-gan "
                      "(VectorQuantize, k-means init, dead-code restarts), rvq-vae/-gan (ResidualVQ), fsq-vae/-gan "
                      "(FSQ), lfq-vae/-gan (LFQ)", choices=MODELS)
    out: str = option("runs/dl-vae", "run directory (config, metrics, checkpoint, pictures); an existing checkpoint "
                    "there is resumed")
    # data
    data: str = option("photos", "photos (bundled with scikit-image, the default), fashion-mnist, mnist, cifar10 or "
                     "folder", choices=("photos", "fashion-mnist", "mnist", "cifar10", "folder"))
    data_root: str | None = option(None, "folder with the data set's files (mnist: IDX files, cifar10: python batches, "
                                 "folder: images; fashion-mnist defaults to /usr/share/datasets/fashion-mnist)")
    image_size: int | None = option(None, "crop size for photos (default 32) and folder (default 256)")
    gray: bool = option(False, "convert colour images to one channel")
    train_length: int | None = option(None, "photos only: random crops per epoch (default 4096)")
    workers: int = option(0, "DataLoader worker processes per training process")
    task: str = option("reconstruction", "what the model learns: reconstruction, or the paper's downstream tasks "
                     "(supplementary 12) super-resolution (bicubic x4 down and up) and inpainting (a centred square "
                     "of 0.25 of the side set to 0): degraded input, the original as target", choices=TASKS)
    # model (paper section 5)
    hidden: int = option(128, "hidden channels of encoder and decoder")
    res_hidden: int = option(32, "hidden channels inside a residual block")
    n_res_blocks: int = option(2, "residual blocks in encoder and in decoder")
    n_e: int = option(512, "atoms in the dictionary / codewords in the codebook (K)")
    e_dim: int = option(16, "latent channels = atom / codeword dimension")
    sparsity: int = option(5, "DL only: atoms per latent vector (S)")
    beta: float = option(0.25, "commitment weight of the bottleneck loss")
    legacy_weighting: bool = option(False, "taming's weighting (legacy=True: beta on the codebook/dictionary term) "
                                  "instead of the paper's equation 13 (beta on the commitment term)")
    patch_size: int = option(1, "DL only: code non-overlapping patch_size x patch_size latent patches as one vector")
    coeff_bins: int | None = option(None, "DL only: quantise coefficients to this many bins, making the codes stage-2 "
                                  "tokens (default: real coefficients)")
    coeff_quant: str = option("uniform", "DL only: coefficient levels with --coeff-bins: uniform, mulaw or lloyd "
                            "(Lloyd-Max levels placed by the data)", choices=("uniform", "mulaw", "lloyd"))
    coeff_per_slot: bool = option(False, "DL only: one coefficient range per slot (selection depth) with --coeff-bins; "
                                "the slot order then counts in the bits per site")
    gradient: str = option("straight_through", "DL only: the encoder's gradient: straight_through, exact (least "
                         "squares on the chosen atoms) or rotation (the rotation trick)",
                         choices=("straight_through", "exact", "rotation"))
    dict_init: str = option("random", "DL only: the dictionary's start: random (Gaussian, the paper's), sample (latent "
                          "vectors of the first training batch) or kmeans (k-means++ and spherical k-means on them)",
                          choices=("random", "sample", "kmeans"))
    restart_window: int | None = option(5, "DL only: replace an atom unused for this many training steps by the "
                                      "batch's worst-coded latent vector (0 or --paper-defaults: no restarts, the "
                                      "paper's; docs/dl-levers.md measures it)")
    ema_decay: float = option(0.99, "VQ only: EMA decay of the codebook")
    # the strong peers (vector-quantize-pytorch); vqp and rvq take K from --n-e and their codeword width from --e-dim
    rvq_quantizers: int = option(3, "rvq only: residual stages Q (Q log2 K bits per site)")
    fsq_levels: str = option("8,5,5,5", "fsq only: levels per latent channel, comma-separated ints >= 3 (the latent "
                           "has one channel per level; sum of log2 levels bits per site)")
    lfq_bits: int = option(10, "lfq only: bits per site = latent channels (each coded by its sign)")
    lfq_groups: int = option(1, "lfq only: groups the bits are split into (LFQ's codebooks, at most 16 bits each)")
    peer_decay: float = option(0.8, "vqp/rvq only: EMA decay of vector-quantize-pytorch's codebooks (its default)")
    peer_kmeans: bool = option(True, "vqp/rvq only: k-means initialisation of the codebook on the first batch")
    peer_dead_code: float = option(2.0, "vqp/rvq only: restart codewords whose EMA usage falls below this (0: off)")
    backend: str = option("auto", "DL only: Batch-OMP backend (auto, cpu, cuda, triton, reference)")
    dictionary_update: str = option("gradient", "DL only: 'gradient' (the optimiser learns the dictionary, codes held "
                                  "fixed) or 'online' (the paper's learning-rate-free update, supplementary section "
                                  "8; all-reduced under torchrun)", choices=("gradient", "online"))
    # optimisation
    steps: int = option(2000, "total training steps (optimiser updates)")
    batch_size: int = option(32, "GLOBAL batch size: the sum over all processes (each takes batch_size / world size)")
    lr: float = option(1e-4, "Adam learning rate of the autoencoder (paper: 1e-4)")
    eta: float = option(0.5, "weight of L2 in the reconstruction loss eta*L2 + (1-eta)*LPIPS (L2 alone when LPIPS "
                      "weights are not on disk)")
    perceptual: bool = option(True, "use LPIPS in the loss when its pretrained weights are already on disk")
    # GAN variants
    disc_start: int = option(1000, "GAN only: step at which the discriminator is switched on")
    disc_weight: float = option(1.0, "GAN only: factor on the adaptive GAN weight")
    disc_lr: float | None = option(None, "GAN only: discriminator learning rate (default: lr)")
    ndf: int = option(64, "GAN only: discriminator base channels")
    disc_layers: int = option(3, "GAN only: PatchGAN downsampling layers")
    # bookkeeping
    seed: int = option(0, "seed of weights, data order and crops")
    device: str = option("auto", "auto, cpu or cuda", choices=("auto", "cpu", "cuda"))
    amp: bool = option(True, "bfloat16 autocast on CUDA (the Batch-OMP coding itself stays float32)")
    log_every: int = option(10, "steps between training-metric records")
    eval_every: int = option(500, "steps between evaluations on the test split (0: only at the end)")
    eval_images: int = option(256, "test images per evaluation (0: the whole test split)")
    fid_images: int = option(0, "images for FID in the final evaluation (0: no FID; ~0.4 s per image on 2 CPU cores)")
    checkpoint_every: int = option(250, "steps between checkpoints")
    progress: bool = option(True, "show a progress bar")

    @property
    def kind(self) -> str:
        """'dl', 'vq' or a peer's kind ('vqp', 'rvq', 'fsq', 'lfq')."""
        return self.model.split("-")[0]

    @property
    def gan(self) -> bool:
        return self.model.endswith("-gan")

    def validate(self) -> TrainConfig:
        """Raises ValueError naming the first bad field; returns self."""
        check_choices(self)
        positive = ("steps", "batch_size", "hidden", "res_hidden", "n_e", "e_dim", "sparsity", "patch_size", "ndf",
                    "disc_layers", "log_every", "checkpoint_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "eval_images", "fid_images", "workers", "n_res_blocks", "disc_start", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "disc_lr"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        for name in ("beta", "ema_decay", "disc_weight"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if self.image_size is not None and self.image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE} (the SSIM window of the evaluation), got "
                             f"{self.image_size}")
        if not 0 <= self.eta <= 1:
            raise ValueError(f"eta must be in [0, 1], got {self.eta}")
        if self.kind == "dl" and self.sparsity > min(self.n_e, self.e_dim * self.patch_size ** 2):
            raise ValueError(f"sparsity must be <= min(n_e, e_dim * patch_size^2) = "
                             f"{min(self.n_e, self.e_dim * self.patch_size ** 2)}, got {self.sparsity}")
        if self.restart_window is not None and self.restart_window < 0:
            raise ValueError(f"restart_window must be >= 0 (0: no restarts), got {self.restart_window}")
        if self.restart_window == 0:
            self.restart_window = None  # one spelling of "no restarts" in the records
        if self.kind == "dl" and self.gradient == "exact" and self.dictionary_update == "online":
            raise ValueError("gradient exact trains the dictionary by gradients; it does not combine with "
                             "dictionary_update online")
        if self.coeff_bins is not None and self.coeff_bins < 2:
            raise ValueError(f"coeff_bins must be None or >= 2, got {self.coeff_bins}")
        if self.fid_images == 1:
            raise ValueError("fid_images must be 0 (off) or >= 2")
        self._validate_peer()
        return self

    def _validate_peer(self) -> None:
        """The peers' options (all of them, whatever the model, so a configuration file is checked whole)."""
        parse_levels(self.fsq_levels)
        lfq_codebook_size(self.lfq_bits, self.lfq_groups)
        if self.rvq_quantizers < 1:
            raise ValueError(f"rvq_quantizers must be >= 1, got {self.rvq_quantizers}")
        if not (0 <= self.peer_decay < 1):
            raise ValueError(f"peer_decay must be in [0, 1), got {self.peer_decay}")
        if not (self.peer_dead_code >= 0 and math.isfinite(self.peer_dead_code)):
            raise ValueError(f"peer_dead_code must be a finite number >= 0, got {self.peer_dead_code}")
        if self.kind in ("vqp", "rvq") and self.n_e < 2:
            raise ValueError(f"n_e (the codebook size K of {self.kind}) must be >= 2, got {self.n_e}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """A configuration from a dict (a --config file, a checkpoint); see config_from_dict."""
        return config_from_dict(cls, values)


# ----------------------------------------------------------------------------------------------------------- pieces
def run_dataset(cfg: TrainConfig, split: str):
    """The "train" or "test" split of the run's data (``train_length`` applies to training crops only)."""
    return build_dataset(cfg.data, split, root=cfg.data_root, size=cfg.image_size, gray=cfg.gray,
                         length=cfg.train_length if split == "train" else None, seed=cfg.seed)


def build_model(cfg: TrainConfig, in_channels: int) -> Autoencoder:
    """The autoencoder of ``cfg`` (weights drawn from the current torch RNG)."""
    if cfg.kind in PEER_KINDS:
        peer = build_peer(cfg.kind, e_dim=cfg.e_dim, n_e=cfg.n_e, beta=cfg.beta, decay=cfg.peer_decay,
                          kmeans_init=cfg.peer_kmeans, threshold_ema_dead_code=cfg.peer_dead_code,
                          rvq_quantizers=cfg.rvq_quantizers, fsq_levels=cfg.fsq_levels, lfq_bits=cfg.lfq_bits,
                          lfq_groups=cfg.lfq_groups)
        return Autoencoder(peer, in_channels, cfg.hidden, cfg.res_hidden, cfg.n_res_blocks)
    return build_autoencoder(cfg.kind, in_channels=in_channels, hidden=cfg.hidden, res_hidden=cfg.res_hidden,
                             n_res_blocks=cfg.n_res_blocks, n_e=cfg.n_e, e_dim=cfg.e_dim, sparsity=cfg.sparsity,
                             beta=cfg.beta, patch_size=cfg.patch_size, backend=cfg.backend,
                             ema_decay=cfg.ema_decay, dictionary_update=cfg.dictionary_update,
                             coeff_bins=cfg.coeff_bins if cfg.kind == "dl" else None, coeff_quant=cfg.coeff_quant,
                             legacy=cfg.legacy_weighting, **_dl_options(cfg))


def _dl_options(cfg: TrainConfig) -> dict:
    """The bottleneck levers of a DL configuration (none for VQ)."""
    if cfg.kind != "dl":
        return {}
    return {"gradient": cfg.gradient, "init": cfg.dict_init, "restart_window": cfg.restart_window,
            "coeff_per_slot": cfg.coeff_per_slot}

