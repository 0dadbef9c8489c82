"""Evaluation of a trained autoencoder on its test split: the paper's metrics, the run's pictures and the results
table."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ..models import Autoencoder
from ..quantizer import QuantizerInfo
from . import metrics, plots
from .config import TrainConfig, resolve_device, run_dataset
from .runs import load_run, read_records, writable_dir, write_json, write_text
from .tasks import degrade

__all__ = ["evaluate", "evaluate_run", "format_results_table", "to_model", "to_image", "outputs", "perceptual_loss",
           "picture_batch", "run_pictures", "save_evaluation", "public"]

def to_model(x: Tensor) -> Tensor:
    """Images in [0, 1] -> the model's [-1, 1]."""
    return x * 2 - 1


def to_image(x: Tensor) -> Tensor:
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
        _, y, latents, info = outputs(model, x, task)
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


def public(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "counts"}



# --------------------------------------------------------------------------------------------------------- training
def perceptual_loss(cfg: TrainConfig, device: torch.device) -> tuple[nn.Module | None, str]:
    if not cfg.perceptual:
        return None, "L2 only (perceptual loss switched off by the configuration)"
    net = metrics.lpips_network(device)
    if net is None:
        return None, f"L2 only: {metrics.lpips_status()}"
    return net, f"eta*L2 + (1-eta)*LPIPS with eta={cfg.eta}"



def picture_batch(test_set, count: int = 8) -> Tensor:
    """``count`` test images spread evenly over the test split (B, C, H, W)."""
    picks = torch.linspace(0, len(test_set) - 1, min(count, len(test_set))).round().long().unique()
    return torch.stack([test_set[int(i)] for i in picks])


def outputs(model: Autoencoder, x: Tensor, task: str) -> tuple[Tensor, Tensor, dict[str, Tensor], QuantizerInfo]:
    """(task input, output image, {"z": encoder output, "z_q": its quantisation}, the bottleneck's info) of ``model``
    (eval mode, no grad) for images x in [0, 1]."""
    was = model.training
    model.eval()
    with torch.no_grad():
        inputs = degrade(x, task)
        z = model.encoder(to_model(inputs))
        z_q, _, info = model.bottleneck(z)
        y = to_image(model.decode(z_q))
    model.train(was)
    return inputs, y, {"z": z, "z_q": z_q}, info


def run_pictures(model: Autoencoder, test_set, out: Path, device: torch.device, counts: Tensor,
                  task: str = "reconstruction") -> None:
    pictures = out / "pictures"
    x = picture_batch(test_set).to(device)
    inputs, y, latents, _ = outputs(model, x, task)
    rows = {"reconstruction": y.cpu()} if task == "reconstruction" else {"input": inputs.cpu(), "output": y.cpu()}
    plots.save_reconstruction_grid(x.cpu(), rows, pictures / "reconstructions.png")
    plots.save_latent_components({f"{k} ({model.kind.upper()})": v.cpu() for k, v in latents.items()},
                                 pictures / "latent_top_component.png")
    plots.save_flip_heatmaps(metrics.flip(x, y)[1].cpu(), pictures / "flip.png")
    records = [r for r in read_records(out / "metrics.jsonl") if r["kind"] == "train"]
    if records:
        plots.plot_training_curves({out.name: records}, pictures / "curves.png")
    # a peer's explicit codewords (vqp, rvq), none for an implicit codebook (fsq, lfq)
    embedding = getattr(model.bottleneck, "embedding", None)
    atoms = embedding.weight.detach() if embedding is not None else model.bottleneck.codewords()
    if atoms is None:
        return
    atoms = atoms.float().cpu()
    plots.save_atom_images(atoms, pictures / "atoms.png")
    plots.plot_atom_embedding(atoms, pictures / "atoms_embedding.png", usage=counts.float(),
                              title=f"{model.kind.upper()} atoms, coloured by test usage")



def evaluate_run(run: str | Path, *, device: str = "auto", max_images: int | None = None,
                 fid_images: int | None = None, progress: bool = True) -> dict:
    """Evaluates the checkpoint of ``run`` on its test split; writes eval.json and eval.md there and returns them."""
    dev = resolve_device(device)
    cfg, model, step = load_run(run, dev)
    counts = {k: v for k, v in (("eval_images", max_images), ("fid_images", fid_images)) if v is not None}
    cfg = dataclasses.replace(cfg, **counts).validate()  # ValueError for counts < 0 before eval.json is touched
    writable_dir(run)
    test_set = run_dataset(cfg, "test")
    lpips_net, _ = perceptual_loss(cfg, dev)
    result = evaluate(model, test_set, device=dev, max_images=cfg.eval_images, fid_images=cfg.fid_images,
                      lpips=lpips_net, progress=progress, task=cfg.task)
    return save_evaluation(Path(run), cfg.model, step, result)


def save_evaluation(run: Path, model_name: str, step: int, result: dict) -> dict:
    """Writes the evaluation ``result`` of ``run`` at ``step`` as eval.json and eval.md; returns what was written."""
    final = {"model": model_name, "step": step, **public(result)}
    write_json(run / "eval.json", final)
    write_text(run / "eval.md", format_results_table({model_name: final}) + "\n")
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

