"""The training loop of the paper's four models: ``train(cfg)`` trains, resumes or re-evaluates one run.

Running ``train`` again on the same directory resumes from ``checkpoint.pt``: model, optimisers, EMA codebook
buffers, RNG states and step, with the data stream positioned where the checkpoint left it, so a killed run loses at
most the steps since its last checkpoint and ends with the same parameters as an uninterrupted one (on CPU, bit for
bit). Under ``torchrun`` every process runs the same loop with DistributedDataParallel; see :mod:`.distributed`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..models import ReconstructionLoss
from . import distributed, metrics
from .config import TrainConfig, run_dataset
from .evaluation import evaluate, perceptual_loss, public, run_pictures, save_evaluation, to_image, to_model
from .runs import (
    CHECKPOINT,
    TrainState,
    append_record,
    replace_eval_record,
    seed_everything,
    truncate_records,
    writable_dir,
    write_json,
)
from .tasks import degrade

__all__ = ["train"]

def train(cfg: TrainConfig, *, callback: Callable[[int, dict], None] | None = None) -> dict:
    """Trains (or resumes, or just re-evaluates a finished run in) ``cfg.out``; returns the final evaluation.

    ``callback(step, record)`` runs after every optimiser step on every rank (record: that step's local metrics as
    floats); an exception raised there stops training like a crash would (the last checkpoint stays).
    """
    cfg.validate()
    writable_dir(cfg.out)  # before any work: a file, a read-only place or a full disk is a clear error now
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
    pictures = out / "pictures"
    if ctx.is_main:
        pictures.mkdir(parents=True, exist_ok=True)
    distributed.barrier(ctx)

    seed_everything(cfg.seed)
    train_set, test_set = run_dataset(cfg, "train"), run_dataset(cfg, "test")
    state = TrainState.build(cfg, train_set.channels, ctx.device)
    model, gan = state.model, state.gan
    perceptual, loss_note = perceptual_loss(cfg, ctx.device)
    rec_loss_fn = ReconstructionLoss(cfg.eta, perceptual)
    ckpt_path = out / CHECKPOINT
    if ckpt_path.exists():
        changed = state.resume(ckpt_path, ctx.device)
        if changed and ctx.is_main:
            print(f"[{cfg.model}] {out}: resumed at step {state.step} with " +
                  ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()), file=sys.stderr)
    step = state.step
    if ctx.is_main:
        if step:
            truncate_records(out / "metrics.jsonl", step)
        notes = {"reconstruction_loss": loss_note, "world_size": ctx.world_size, "local_batch_size": local_batch,
                 "device": str(ctx.device), "torch": torch.__version__, "resumed_from_step": step,
                 "resumes": state.resumes, "channels": train_set.channels, "image_size": list(train_set.image_size)}
        write_json(out / "config.json", {"config": cfg.to_dict(), "notes": notes})
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

    def run_eval(fid_images: int = 0, progress: bool = False, final: bool = False) -> dict:
        """Rank 0 only: evaluates on the test split and logs the record (the final one replaces an earlier
        evaluation of the same step, as when a finished run is run again)."""
        result = evaluate(model, test_set, device=ctx.device, max_images=cfg.eval_images, lpips=perceptual,
                          fid_images=fid_images, progress=progress, task=cfg.task)
        (replace_eval_record if final else append_record)(metrics_path, {"kind": "eval", "step": step,
                                                                         **public(result)})
        return result

    bar = tqdm(total=cfg.steps, initial=step, desc=cfg.model, disable=not (ctx.is_main and cfg.progress),
               dynamic_ncols=True, file=sys.stderr)
    window: dict[str, list[Tensor]] = {}
    # code histogram of the logging window, over the ids info.atom_indices takes (a peer's whole token vocabulary)
    usage = torch.zeros(model.bottleneck.n_e, dtype=torch.float64, device=ctx.device)
    start = time.perf_counter()
    epoch, offset = divmod(step, batches_per_epoch)
    while step < cfg.steps:
        sampler.set_epoch(epoch, skip=offset * local_batch)
        train_set.set_epoch(epoch)
        for x in loader:
            x = x.to(ctx.device, non_blocking=True)
            stats, codes = _train_step(state, net, to_model(degrade(x, cfg.task)), step, rec_loss_fn, autocast,
                                       target=to_model(x))
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
        result = run_eval(cfg.fid_images, cfg.progress, final=True)
        final = save_evaluation(out, cfg.model, step, result)
        run_pictures(model, test_set, out, ctx.device, result["counts"], cfg.task)
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
             "psnr": metrics.psnr(to_image(x), to_image(x_rec.detach())).clamp(max=100).mean()}
    if hasattr(info, "restarts"):  # dead-atom restarts so far (DL with --restart-window)
        stats["restarts"] = info.restarts.float()
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
        append_record(path, {**record, **means})
    return means

