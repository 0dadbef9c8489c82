"""Grids of short trainings, resumable cell by cell, and the rate-distortion comparison of the bottlenecks.

``lasers rate-distortion --out runs/rd`` trains every family -- DL-VAE with quantised coefficients, the paper's
EMA VQ-VAE and the strong peers of vector-quantize-pytorch (VectorQuantize, ResidualVQ, FSQ, LFQ; see
:mod:`.peers`) -- at matched rates (about 10, 13, 16, 24-26, 40 and 64 bits per latent site) on the same data and
budget, over one or more seeds, then tabulates and draws reconstruction PSNR against bits per site: log2 C(K, S) +
S log2 B for DL (the support as a set; in order with per-slot ranges), log2 K for VQ, Q log2 K for RVQ, sum
log2 L_i for FSQ, the bits of LFQ.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..tokens import TokenCodec
from . import plots
from .config import TrainConfig
from .loop import train
from .peers import parse_levels, peer_bits
from .runs import read_records, writable_dir, write_json, write_text

__all__ = ["run_grid", "rate_distortion", "rate_matched", "default_cells", "ablation", "FAMILIES", "RD_BUDGETS",
           "ABLATION_DEFAULTS"]

# the families of the rate-distortion comparison (model kinds) and their names in tables and plots
FAMILIES = {"dl": "DL (Batch-OMP)", "vq": "VQ (EMA, the paper's baseline)", "vqp": "VectorQuantize (k-means, restarts)",
            "rvq": "ResidualVQ", "fsq": "FSQ", "lfq": "LFQ"}
# the matched rates (bits per latent site) of the default grid: the equal-rate table's budgets
RD_BUDGETS = (10.0, 13.0, 16.0, 26.0, 40.0, 64.0)
# The default grid: one cell per family at (or just below) each budget (DL: 10, 13, 16, 25, 39.4 and 63.1 bits with
# the support counted as a set). VQ and VectorQuantize stop at 13 bits
# (K = 8192): a single codebook of 2^16 or more codewords costs a (sites x K) distance matrix per step.
_DEFAULT_GRID = {
    "dl": [{"n_e": 256, "sparsity": 1, "coeff_bins": 4}, {"n_e": 512, "sparsity": 1, "coeff_bins": 16},
           {"n_e": 512, "sparsity": 1, "coeff_bins": 128}, {"n_e": 512, "sparsity": 2, "coeff_bins": 16},
           {"n_e": 512, "sparsity": 3, "coeff_bins": 32}, {"n_e": 512, "sparsity": 5, "coeff_bins": 32}],
    "vq": [{"n_e": 1024}, {"n_e": 8192}],
    "vqp": [{"n_e": 1024}, {"n_e": 8192}],
    "rvq": [{"n_e": 32, "rvq_quantizers": 2}, {"n_e": 90, "rvq_quantizers": 2}, {"n_e": 256, "rvq_quantizers": 2},
            {"n_e": 256, "rvq_quantizers": 3}, {"n_e": 1024, "rvq_quantizers": 4}, {"n_e": 256, "rvq_quantizers": 8}],
    "fsq": [{"fsq_levels": "8,5,5,5"}, {"fsq_levels": "8,8,5,5,5"}, {"fsq_levels": "8,8,8,5,5,5"},
            {"fsq_levels": ",".join(["8"] * 8)}, {"fsq_levels": ",".join(["8"] * 13)},
            {"fsq_levels": ",".join(["16"] * 16)}],
    # LFQ's entropy loss scores every site against all 2^bits codes of a group: groups of at most 10 bits (13 bits
    # in one group cost 3 s per step on a 2-core CPU)
    "lfq": [{"lfq_bits": 10, "lfq_groups": 1}, {"lfq_bits": 12, "lfq_groups": 2}, {"lfq_bits": 16, "lfq_groups": 2},
            {"lfq_bits": 24, "lfq_groups": 3}, {"lfq_bits": 40, "lfq_groups": 5}, {"lfq_bits": 64, "lfq_groups": 8}],
}
_SLACK = 2.5  # a cell matches a budget b when its rate lies in [b - _SLACK, b]
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
    same = all(saved.get(k, TrainConfig.__dataclass_fields__[k].default) == v for k, v in wanted.items())
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


def _bits(kind: str, cfg: TrainConfig) -> float:
    """Bits per latent site of a cell's bottleneck."""
    if kind == "dl":
        return TokenCodec(cfg.n_e, cfg.coeff_bins, cfg.sparsity, ordered=cfg.coeff_per_slot).bits_per_site
    if kind == "vq":
        return math.log2(cfg.n_e)
    return peer_bits(kind, n_e=cfg.n_e, rvq_quantizers=cfg.rvq_quantizers, fsq_levels=cfg.fsq_levels,
                     lfq_bits=cfg.lfq_bits)


def _cell_name(kind: str, cfg: TrainConfig) -> tuple[str, str]:
    """(directory name, human-readable configuration) of a cell."""
    if kind == "dl":
        return f"dl-k{cfg.n_e}-s{cfg.sparsity}-b{cfg.coeff_bins}", f"K={cfg.n_e} S={cfg.sparsity} B={cfg.coeff_bins}"
    if kind in ("vq", "vqp"):
        return f"{kind}-k{cfg.n_e}", f"K={cfg.n_e}"
    if kind == "rvq":
        return f"rvq-q{cfg.rvq_quantizers}-k{cfg.n_e}", f"Q={cfg.rvq_quantizers} K={cfg.n_e}"
    if kind == "fsq":
        levels = parse_levels(cfg.fsq_levels)
        text = f"{levels[0]}^{len(levels)}" if len(set(levels)) == 1 else "x".join(map(str, levels))
        return f"fsq-{text.replace('^', 'p')}", f"levels {text}"
    return f"lfq-b{cfg.lfq_bits}-g{cfg.lfq_groups}", f"{cfg.lfq_bits} bits in {cfg.lfq_groups} group(s)"


def default_cells(base: TrainConfig, families: Sequence[str], *, sparsities: Sequence[int] | None = None,
                  bins: Sequence[int] | None = None, codebooks: Sequence[int] | None = None,
                  grid: Mapping[str, Sequence[dict]] | None = None) -> list[dict]:
    """The grid's cells, [{"family", "name", "config", "overrides", "bits_per_site"}], for ``families`` (kinds of
    FAMILIES): the matched-rate default grid, with each family of ``grid`` ({family: [TrainConfig overrides, ...]})
    in place of its default cells, and ``sparsities`` and ``bins`` making DL's cells the product S x B at
    ``base.n_e`` atoms, ``codebooks`` VQ's and VectorQuantize's cells one per K."""
    unknown = [f for f in [*families, *(grid or {})] if f not in FAMILIES]
    if not families or unknown:
        raise ValueError(f"families must be a non-empty list of {', '.join(FAMILIES)}, got {list(families)}")
    grid = {**{k: list(v) for k, v in _DEFAULT_GRID.items()}, **{k: list(v) for k, v in (grid or {}).items()}}
    if sparsities is not None or bins is not None:
        ss = _positive_ints("sparsities", sparsities if sparsities is not None else [1, 2, 3, 5])
        bb = _positive_ints("bins", bins if bins is not None else [8, 16, 32], minimum=2)
        limit = min(base.n_e, base.e_dim * base.patch_size ** 2)
        if max(ss) > limit:
            raise ValueError(f"sparsities must be <= min(n_e, e_dim * patch_size^2) = {limit}, got {max(ss)}")
        grid["dl"] = [{"n_e": base.n_e, "sparsity": s, "coeff_bins": b} for s in ss for b in bb]
    if codebooks is not None:
        grid["vq"] = grid["vqp"] = [{"n_e": k} for k in _positive_ints("codebooks", codebooks, minimum=2)]
    cells = []
    for family in dict.fromkeys(families):
        for overrides in grid[family]:
            overrides = {"model": f"{family}-vae", "coeff_bins": None, **overrides}
            cfg = dataclasses.replace(base, **overrides)
            name, text = _cell_name(family, cfg)
            cells.append({"family": family, "name": name, "config": text, "overrides": overrides,
                          "bits_per_site": _bits(family, cfg)})
    return cells


def _seconds_per_step(run: Path) -> float | None:
    """The median seconds per training step over a run's logging windows, from its metrics.jsonl (``elapsed_s``
    counts from the start of the process's training loop: the first record's window starts at step 0, a resume
    restarts the clock and the window that straddles it is left out); None without a record."""
    records = [r for r in read_records(run / "metrics.jsonl") if r.get("kind") == "train" and "elapsed_s" in r]
    rates = [r["elapsed_s"] / r["step"] for r in records[:1] if r["step"] > 0]
    rates += [(b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"]) for a, b in zip(records, records[1:])
              if b["step"] > a["step"] and b["elapsed_s"] > a["elapsed_s"]]
    return statistics.median(rates) if rates else None


def _spread(values: list[float]) -> float:
    """The sample standard deviation (0 for one value)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def rate_matched(rows: Sequence[dict], budgets: Sequence[float] = RD_BUDGETS, key: str = "psnr") -> list[dict]:
    """Equal-rate comparison: at every budget (bits per site), the best mean ``key`` each family reaches with a cell
    at or below it (the upper envelope of its curve), as [{"budget", "best": {family: {"cell", key, key + "_std"}},
    "winner"}] (a family without a cell within a budget is absent there)."""
    out = []
    for budget in sorted(budgets):
        best = {}
        for family in dict.fromkeys(r["family"] for r in rows):
            within = [r for r in rows if r["family"] == family and r["bits_per_site"] <= budget + 1e-9]
            if within:
                top = max(within, key=lambda r: r[key])
                best[family] = {"cell": top["cell"], key: top[key], f"{key}_std": top.get(f"{key}_std", 0.0),
                                "bits_per_site": top["bits_per_site"]}
        if best:
            out.append({"budget": budget, "best": best, "winner": max(best, key=lambda f: best[f][key])})
    return out


def _value(r: dict, key: str, fmt: str) -> str:
    text = format(r[key], fmt)
    return text + (" ± " + format(r[f"{key}_std"], fmt) if r.get("seeds", 1) > 1 else "")


def _table(rows: list[dict], matched: list[dict]) -> str:
    seeds = max(r["seeds"] for r in rows)
    spread = f" (mean ± standard deviation over {seeds} seeds)" if seeds > 1 else ""
    lines = [f"PSNR, SSIM and code usage on the test images{spread}; seconds per training step on this machine.", "",
             "| family | configuration | bits / site | PSNR (dB) | SSIM | perplexity | active codes | s / step |",
             "|---|---|---|---|---|---|---|---|"]
    order = list(FAMILIES)
    for r in sorted(rows, key=lambda r: (order.index(r["family"]), r["bits_per_site"])):
        sec = "-" if r["seconds_per_step"] is None else f"{r['seconds_per_step']:.3f}"
        lines.append(f"| {FAMILIES[r['family']]} | {r['config']} | {r['bits_per_site']:.2f} | "
                     f"{_value(r, 'psnr', '.2f')} | {_value(r, 'ssim', '.4f')} | {r['perplexity']:.1f} | "
                     f"{r['active_atoms']:.0f} | {sec} |")
    families = [f for f in order if any(r["family"] == f for r in rows)]
    lines += ["", "Equal rate: the best PSNR (dB) each family reaches within a budget of bits per site (its cell's "
              "configuration in brackets); the best at each budget in bold.", "",
              "| budget (bits / site) | " + " | ".join(FAMILIES[f] for f in families) + " |",
              "|---|" + "---|" * len(families)]
    for m in matched:
        cells = []
        for f in families:
            best = m["best"].get(f)
            if best is None:
                cells.append("-")
                continue
            row = next(r for r in rows if r["cell"] == best["cell"])
            text = f"{_value(row, 'psnr', '.2f')} ({row['config']})"
            cells.append(f"**{text}**" if f == m["winner"] else text)
        lines.append(f"| {m['budget']:g} | " + " | ".join(cells) + " |")
    if not matched:
        lines.append("| - | no budget holds a cell |" + " |" * (len(families) - 1))
    return "\n".join(lines)


def rate_distortion(base: TrainConfig, *, families: Sequence[str] = tuple(FAMILIES), seeds: Sequence[int] | None = None,
                    budgets: Sequence[float] | None = None, sparsities: Sequence[int] | None = None,
                    bins: Sequence[int] | None = None, codebooks: Sequence[int] | None = None,
                    grid: Mapping[str, Sequence[dict]] | None = None) -> dict:
    """Trains the grid of :func:`default_cells` for every seed in ``seeds`` (default: ``base.seed``) into
    ``base.out``/CELL/seedN, writes rate_distortion.md/.json and
    pictures/rate_distortion.png there (each family's frontier, error bars of the spread over seeds), prints the table
    and returns {"rows": [...], "equal_rate": [...]}: per cell the mean and standard deviation over seeds of PSNR and
    SSIM, the mean code usage and the median seconds per training step. ``budgets`` (bits per site) keep only the
    cells within 2.5 bits below one of them and are the equal-rate table's budgets (default: RD_BUDGETS, every
    cell). ``base.model`` is ignored."""
    seeds = _positive_ints("seeds", [base.seed] if seeds is None else seeds, minimum=0)
    if budgets is not None and (not budgets or any(
            isinstance(b, bool) or not isinstance(b, (int, float)) or not (b > 0 and math.isfinite(b))
            for b in budgets)):
        raise ValueError(f"budgets must be a non-empty list of positive bits per site, got {list(budgets)}")
    cells = default_cells(base, families, sparsities=sparsities, bins=bins, codebooks=codebooks, grid=grid)
    if budgets is not None:
        cells = [c for c in cells if any(b - _SLACK <= c["bits_per_site"] <= b + 1e-9 for b in budgets)]
        if not cells:
            raise ValueError(f"no cell of the grid lies within {_SLACK} bits below a budget of {list(budgets)}")
    budgets = RD_BUDGETS if budgets is None else tuple(budgets)
    names = {c["name"] for c in cells}
    if len(names) != len(cells):
        raise ValueError("two cells of the grid have the same configuration")

    def run_name(cell: dict, seed: int) -> str:
        return f"{cell['name']}/seed{seed}"

    # seed by seed: every family has its first seed before any has its second
    results = run_grid(base, [(run_name(c, s), {**c["overrides"], "seed": s}) for s in seeds for c in cells])
    if int(os.environ.get("RANK", "0")) != 0:
        return {}
    out = Path(base.out)
    rows = []
    for c in cells:
        runs = [results[run_name(c, s)] for s in seeds]
        times = [t for t in (_seconds_per_step(out / run_name(c, s)) for s in seeds) if t is not None]
        row = {"cell": c["name"], "family": c["family"], "config": c["config"], "bits_per_site": c["bits_per_site"],
               "seeds": len(seeds), "step": runs[0]["step"],
               "seconds_per_step": statistics.mean(times) if times else None}
        for key in ("psnr", "ssim"):
            values = [r[key] for r in runs]
            row.update({key: statistics.mean(values), f"{key}_std": _spread(values), f"{key}_values": values})
        row.update({key: statistics.mean(r[key] for r in runs) for key in ("perplexity", "active_atoms")})
        rows.append(row)
    matched = rate_matched(rows, budgets)
    table = _table(rows, matched)
    write_text(out / "rate_distortion.md", table + "\n")
    write_json(out / "rate_distortion.json", {"rows": rows, "equal_rate": matched, "seeds": list(seeds),
                                              "steps": base.steps})
    curves = {FAMILIES[f]: [(r["bits_per_site"], r["psnr"], r["config"], r["psnr_std"]) for r in rows
                            if r["family"] == f] for f in FAMILIES if any(r["family"] == f for r in rows)}
    plots.plot_rate_distortion(curves, out / "pictures" / "rate_distortion.png", annotate=len(curves) <= 2)
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
