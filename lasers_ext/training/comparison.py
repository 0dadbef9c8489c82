"""Side-by-side comparison of models trained with identical encoder/decoder, data, seed and budget."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from . import metrics, plots
from .config import MODELS, TrainConfig, run_dataset
from .evaluation import format_results_table, outputs, picture_batch
from .loop import train
from .runs import load_run, read_records, writable_dir, write_json, write_text
from .tasks import degrade

__all__ = ["compare"]

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
    base = writable_dir(cfg.out)
    configs = {name: dataclasses.replace(cfg, model=name, out=str(base / name)).validate() for name in names}
    results: dict[str, dict] = {}
    for name, run_cfg in configs.items():
        results[name] = train(run_cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return results
    table = format_results_table(results)
    write_text(base / "compare.md", table + "\n")
    write_json(base / "compare.json", results)
    _compare_pictures(base, list(results), cfg)
    print(table)
    print(f"\npictures: {base / 'pictures'} (and each run's pictures/ folder); table: {base / 'compare.md'}")
    return results


def _compare_pictures(base: Path, names: list[str], cfg: TrainConfig) -> None:
    runs = {name: [r for r in read_records(base / name / "metrics.jsonl") if r["kind"] == "train"]
            for name in names}
    plots.plot_training_curves(runs, base / "pictures" / "curves.png")
    x = picture_batch(run_dataset(cfg, "test"))
    recs = {} if cfg.task == "reconstruction" else {"input": degrade(x, cfg.task)}
    maps, latents = {}, {}
    for name in names:
        _, model, _ = load_run(base / name)
        _, y, pair, _ = outputs(model, x, cfg.task)
        latents.update({f"{k} ({name})": v for k, v in pair.items()})
        recs[name] = y
        maps[name] = metrics.flip(x, y)[1]
    plots.save_reconstruction_grid(x, recs, base / "pictures" / "reconstructions.png")
    plots.save_flip_heatmaps(maps, base / "pictures" / "flip.png")
    plots.save_latent_components(latents, base / "pictures" / "latent_top_component.png")
