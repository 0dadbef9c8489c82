"""Grids of short trainings, resumable cell by cell, and the rate-distortion comparison of the two bottlenecks.

``lasers rate-distortion --out runs/rd`` trains DL-VAEs with quantised coefficients (sparsity S x coefficient bins B)
and VQ-VAEs (codebook size K) on the same data and budget, then draws reconstruction PSNR against bits per latent
site: the DL codec's count (``TokenCodec.bits_per_site``: log2 C(K, S) + S log2 B, the support as a set; in order
with per-slot ranges), log2 K for VQ.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ..tokens import TokenCodec
from . import plots
from .config import TrainConfig
from .loop import train
from .runs import writable_dir, write_json, write_text

__all__ = ["run_grid", "rate_distortion", "rate_matched", "ablation", "RD_DEFAULTS", "ABLATION_DEFAULTS"]

# the rate-distortion grid: DL sparsity x bins at the run's K, VQ codebook sizes
RD_DEFAULTS = {"sparsities": (1, 2, 3, 5), "bins": (8, 16, 32), "codebooks": (64, 256, 1024, 4096)}
# the paper's ablations: Table 4 (dictionary size K at S = 4, VQ at the same K), Table 5 (sparsity S at K = 512)
ABLATION_DEFAULTS = {"sizes": (64, 256, 512), "size_sparsity": 4, "sparsities": (2, 4, 5, 8, 10), "sparsity_size": 512}
# what a table row keeps of a cell's evaluation
_ROW_METRICS = ("psnr", "ssim", "perplexity", "active_atoms", "step")
# options that do not change what a finished cell computed
_NOT_RESULTS = ("out", "progress", "device", "workers")


def _finished(cfg: TrainConfig) -> dict | None:
    """The evaluation of a cell already trained to ``cfg.steps`` with the same settings, else None."""
    out = Path(cfg.out)
    try:
        result = json.loads((out / "eval.json").read_text())
        saved = json.loads((out / "config.json").read_text())["config"]
    except (OSError, ValueError, KeyError):
        return None
    wanted = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_RESULTS}
    same = all(saved.get(k) == v for k, v in wanted.items())
    return result if same and result.get("step") == cfg.steps else None


def run_grid(base: TrainConfig, cells: Sequence[tuple[str, dict]]) -> dict[str, dict]:
    """Trains each cell (name, TrainConfig overrides) into ``base.out``/name and returns {name: evaluation}.
    Cells finished with the same settings are read back, not retrained; an interrupted cell resumes from its
    checkpoint. Every cell is validated before the first one trains."""
    names = [name for name, _ in cells]
    if len(set(names)) != len(names):
        raise ValueError(f"cell names must be unique, got {names}")
    configs = [dataclasses.replace(base, out=str(Path(base.out) / name), **overrides).validate()
               for name, overrides in cells]
    writable_dir(base.out)
    results: dict[str, dict] = {}
    for i, (name, cfg) in enumerate(zip(names, configs), 1):
        done = _finished(cfg)
        print(f"[{i}/{len(cells)}] {name}: {'finished, read back' if done else 'training'}", file=sys.stderr)
        results[name] = done if done is not None else train(cfg)
    return results


def _positive_ints(name: str, values: Sequence[int], minimum: int = 1) -> tuple[int, ...]:
    values = tuple(values)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in values):
        raise ValueError(f"{name} must be a non-empty list of ints >= {minimum}, got {list(values)}")
    return tuple(sorted(set(values)))


def rate_matched(rows: Sequence[dict], key: str = "psnr") -> list[dict]:
    """Equal-rate comparison: at every rate of the grid where both bottlenecks have a point at or below it, the
    best ``key`` each reaches within that many bits per site (the upper envelope of its curve)."""
    def envelope(kind: str, rate: float) -> dict | None:
        within = [r for r in rows if r["bottleneck"] == kind and r["bits_per_site"] <= rate + 1e-9]
        return max(within, key=lambda r: r[key]) if within else None

    out = []
    for rate in sorted({r["bits_per_site"] for r in rows}):
        dl, vq = envelope("DL", rate), envelope("VQ", rate)
        if dl is not None and vq is not None:
            out.append({"bits_per_site": rate, "dl": dl["cell"], "dl_" + key: dl[key], "vq": vq["cell"],
                        "vq_" + key: vq[key], "difference": dl[key] - vq[key]})
    return out


def _table(rows: list[dict], matched: list[dict]) -> str:
    lines = ["| bottleneck | K | S | B | bits / site | PSNR (dB) | SSIM | perplexity | active atoms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["bottleneck"], r["bits_per_site"])):
        lines.append(f"| {r['bottleneck']} | {r['K']} | {r['S']} | {r['B'] or '-'} | {r['bits_per_site']:.1f} | "
                     f"{r['psnr']:.2f} | {r['ssim']:.4f} | {r['perplexity']:.1f} | {r['active_atoms']} |")
    lines += ["", "Equal rate: the best PSNR each bottleneck reaches within a budget of bits per site.", "",
              "| budget (bits / site) | DL cell | DL PSNR | VQ cell | VQ PSNR | DL - VQ (dB) |",
              "|---|---|---|---|---|---|"]
    for m in matched:
        lines.append(f"| {m['bits_per_site']:.1f} | {m['dl']} | {m['dl_psnr']:.2f} | {m['vq']} | "
                     f"{m['vq_psnr']:.2f} | {m['difference']:+.2f} |")
    if not matched:
        lines.append("| - | no budget holds a point of both | | | | |")
    return "\n".join(lines)


def rate_distortion(base: TrainConfig, *, sparsities: Sequence[int] = RD_DEFAULTS["sparsities"],
                    bins: Sequence[int] = RD_DEFAULTS["bins"],
                    codebooks: Sequence[int] = RD_DEFAULTS["codebooks"]) -> dict:
    """Trains the grid (DL-VAE at ``base.n_e`` atoms for every sparsity x bins; VQ-VAE for every codebook size)
    into ``base.out``, writes rate_distortion.md/.json and pictures/rate_distortion.png there, prints the table and
    returns {"rows": [...], "equal_rate": [...]}. ``base.model`` is ignored (both autoencoders are trained)."""
    sparsities = _positive_ints("sparsities", sparsities)
    bins = _positive_ints("bins", bins, minimum=2)
    codebooks = _positive_ints("codebooks", codebooks)
    limit = min(base.n_e, base.e_dim * base.patch_size ** 2)
    if max(sparsities) > limit:
        raise ValueError(f"sparsities must be <= min(n_e, e_dim * patch_size^2) = {limit}, got {max(sparsities)}")
    cells: list[tuple[str, dict]] = []
    meta: dict[str, dict] = {}
    for s in sparsities:
        for b in bins:
            name = f"dl-s{s}-b{b}"
            cells.append((name, {"model": "dl-vae", "sparsity": s, "coeff_bins": b}))
            meta[name] = {"bottleneck": "DL", "K": base.n_e, "S": s, "B": b,
                          "bits_per_site": TokenCodec(base.n_e, b, s, ordered=base.coeff_per_slot).bits_per_site}
    for k in codebooks:
        name = f"vq-k{k}"
        cells.append((name, {"model": "vq-vae", "n_e": k, "coeff_bins": None}))
        meta[name] = {"bottleneck": "VQ", "K": k, "S": 1, "B": None, "bits_per_site": math.log2(k)}
    results = run_grid(base, cells)
    if int(os.environ.get("RANK", "0")) != 0:
        return {}
    rows = [{"cell": name, **meta[name], **{k: r[k] for k in _ROW_METRICS}} for name, r in results.items()]
    matched = rate_matched(rows)
    out = Path(base.out)
    table = _table(rows, matched)
    write_text(out / "rate_distortion.md", table + "\n")
    write_json(out / "rate_distortion.json", {"rows": rows, "equal_rate": matched})
    curves = {f"DL-VAE (K={base.n_e})": [(r["bits_per_site"], r["psnr"], f"S={r['S']} B={r['B']}")
                                         for r in rows if r["bottleneck"] == "DL"],
              "VQ-VAE": [(r["bits_per_site"], r["psnr"], f"K={r['K']}") for r in rows if r["bottleneck"] == "VQ"]}
    plots.plot_rate_distortion(curves, out / "pictures" / "rate_distortion.png")
    print(table)
    print(f"\ntable: {out / 'rate_distortion.md'}; plot: {out / 'pictures' / 'rate_distortion.png'}")
    return {"rows": rows, "equal_rate": matched}


def ablation(base: TrainConfig, *, sizes: Sequence[int] = ABLATION_DEFAULTS["sizes"],
             size_sparsity: int = ABLATION_DEFAULTS["size_sparsity"],
             sparsities: Sequence[int] = ABLATION_DEFAULTS["sparsities"],
             sparsity_size: int = ABLATION_DEFAULTS["sparsity_size"]) -> dict:
    """The paper's ablation sweeps (Tables 4 and 5): DL-VAE for every dictionary size in ``sizes`` at S =
    ``size_sparsity`` and VQ-VAE at the same sizes; DL-VAE for every sparsity in ``sparsities`` at K =
    ``sparsity_size``. Trains the grid into ``base.out`` (resumable, finished cells read back), writes sweep.md/.json
    and pictures/sweep_K.png, pictures/sweep_S.png (PSNR and perplexity against K and against S), prints the table and
    returns {"rows": [...]}. ``base.model``, ``base.n_e`` and ``base.sparsity`` are replaced per cell."""
    sizes = _positive_ints("sizes", sizes)
    sparsities = _positive_ints("sparsities", sparsities)
    size_sparsity = _positive_ints("size_sparsity", [size_sparsity])[0]
    sparsity_size = _positive_ints("sparsity_size", [sparsity_size])[0]
    atom_dim = base.e_dim * base.patch_size ** 2
    if size_sparsity > min(min(sizes), atom_dim):
        raise ValueError(f"size_sparsity {size_sparsity} exceeds min(smallest K, atom dim) = "
                         f"{min(min(sizes), atom_dim)}")
    if max(sparsities) > min(sparsity_size, atom_dim):
        raise ValueError(f"sparsities must be <= min(K, e_dim * patch_size^2) = {min(sparsity_size, atom_dim)}, got "
                         f"{max(sparsities)}")
    dl = {(k, size_sparsity) for k in sizes} | {(sparsity_size, s) for s in sparsities}
    cells = [(f"dl-k{k}-s{s}", {"model": "dl-vae", "n_e": k, "sparsity": s}) for k, s in sorted(dl)]
    cells += [(f"vq-k{k}", {"model": "vq-vae", "n_e": k}) for k in sizes]
    results = run_grid(base, cells)
    if int(os.environ.get("RANK", "0")) != 0:
        return {}
    rows = []
    for name, overrides in cells:
        r = results[name]
        rows.append({"cell": name, "bottleneck": "DL" if overrides["model"] == "dl-vae" else "VQ",
                     "K": overrides["n_e"], "S": overrides.get("sparsity", 1), **{k: r[k] for k in _ROW_METRICS}})
    lines = ["| bottleneck | K | S | PSNR (dB) | SSIM | perplexity | active atoms |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["bottleneck"], r["K"], r["S"])):
        lines.append(f"| {r['bottleneck']} | {r['K']} | {r['S']} | {r['psnr']:.2f} | {r['ssim']:.4f} | "
                     f"{r['perplexity']:.1f} | {r['active_atoms']} |")
    table = "\n".join(lines)
    out = Path(base.out)
    write_text(out / "sweep.md", table + "\n")
    write_json(out / "sweep.json", {"rows": rows})
    by_k = {f"DL-VAE (S={size_sparsity})": [r for r in rows if r["bottleneck"] == "DL" and r["S"] == size_sparsity
                                             and r["K"] in sizes],
            "VQ-VAE": [r for r in rows if r["bottleneck"] == "VQ"]}
    by_s = {f"DL-VAE (K={sparsity_size})": [r for r in rows if r["bottleneck"] == "DL" and r["K"] == sparsity_size
                                            and r["S"] in sparsities]}
    for name, groups, axis in (("sweep_K.png", by_k, "K"), ("sweep_S.png", by_s, "S")):
        panels = {metric: {label: [(r[axis], r[key]) for r in group] for label, group in groups.items()}
                  for metric, key in (("PSNR (dB)", "psnr"), ("perplexity", "perplexity"))}
        plots.plot_sweep(panels, out / "pictures" / name,
                         "dictionary / codebook size K" if axis == "K" else "sparsity S", log_x=axis == "K")
    print(table)
    print(f"\ntable: {out / 'sweep.md'}; plots: {out / 'pictures'}/sweep_K.png, sweep_S.png")
    return {"rows": rows}
