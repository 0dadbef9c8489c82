"""Ablation of the dictionary bottleneck's levers (issue 26) against vector-quantize-pytorch's VectorQuantize.

    OMP_NUM_THREADS=1 nice -n 5 python bench/dl_levers.py --out runs/levers --steps 300 --seeds 0 --sparsities 1,2
    python bench/dl_levers.py --out runs/levers --table        # the table of what is measured so far

Every arm trains the package's autoencoder (the rate-distortion grid's settings: the bundled photos, 32 x 32 crops,
batch 32, Adam 1e-4, L2 loss, K = 512 atoms, e_dim 16, B = 16 coefficient bins) with the training tool's own step
(``lasers_ext.training.loop._train_step``) in this process, and evaluates on the first 256 test crops
(``lasers_ext.training.evaluation.evaluate``). Arms: ``base`` (the paper's settings) and each lever alone
(``init``: k-means initialisation, ``restart``: dead-atom restarts, ``slot``: per-slot ranges, ``rotation`` and
``exact``: the encoder's gradient), ``all`` (every lever but exact) and ``vqtorch``: the same autoencoder with
vector-quantize-pytorch's ``VectorQuantize(dim=16, codebook_size=1024, kmeans_init=True, threshold_ema_dead_code=2,
commitment_weight=0.25)`` (its defaults otherwise) in place of the bottleneck, 10 bits per site.

Each finished (arm, S, seed) is a line of OUT/results.jsonl (psnr, ssim, active atoms, perplexity, bits per site,
seconds per training step); cells already there are skipped, so the run can be extended or resumed.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lasers_ext.models import ReconstructionLoss
from lasers_ext.quantizer import QuantizerInfo
from lasers_ext.training import TrainConfig, TrainState
from lasers_ext.training.config import run_dataset
from lasers_ext.training.evaluation import evaluate
from lasers_ext.training.loop import _train_step
from lasers_ext.training.runs import seed_everything

ARMS = {
    "base": {},
    "init": {"dict_init": "kmeans"},
    "restart": {"restart_window": 20},
    "restart5": {"restart_window": 5},
    "slot": {"coeff_per_slot": True},
    "rotation": {"gradient": "rotation"},
    "exact": {"gradient": "exact"},
    "all": {"dict_init": "kmeans", "restart_window": 20, "coeff_per_slot": True, "gradient": "rotation"},
    "lloyd": {"coeff_quant": "lloyd"},
    "mulaw": {"coeff_quant": "mulaw"},
    "restart5+lloyd": {"restart_window": 5, "coeff_quant": "lloyd"},
    "restart5+lloyd+slot": {"restart_window": 5, "coeff_quant": "lloyd", "coeff_per_slot": True},
    "restart5+lloyd+slot+init": {"restart_window": 5, "coeff_quant": "lloyd", "coeff_per_slot": True,
                                 "dict_init": "kmeans"},
    "real": {"coeff_bins": None},  # a diagnostic: real coefficients, no tokens (no rate)
    "vqtorch": None,
}


class VQPytorchBottleneck(nn.Module):
    """vector-quantize-pytorch's VectorQuantize with the package's bottleneck interface: (z_q, loss, info)."""

    def __init__(self, dim: int, codebook_size: int) -> None:
        super().__init__()
        from vector_quantize_pytorch import VectorQuantize

        self.vq = VectorQuantize(dim=dim, codebook_size=codebook_size, kmeans_init=True, threshold_ema_dead_code=2,
                                 commitment_weight=0.25, accept_image_fmap=True)
        self.n_e, self.e_dim = codebook_size, dim
        self.bits_per_site = math.log2(codebook_size)

    def forward(self, z: Tensor):
        z_q, indices, loss = self.vq(z)
        flat = indices.reshape(-1)
        return z_q, loss.reshape(()), QuantizerInfo(torch.zeros(()), None, flat, atom_indices=flat)


def build(arm: str, sparsity: int, seed: int, args) -> tuple[TrainState, TrainConfig]:
    levers = ARMS[arm] or {}
    vq = ARMS[arm] is None
    options = dict(model="vq-vae" if vq else "dl-vae", n_e=args.n_e, sparsity=sparsity,
                   coeff_bins=None if vq else args.bins, steps=args.steps, seed=seed, perceptual=False, device="cpu",
                   progress=False)
    cfg = TrainConfig(**{**options, **levers}).validate()
    seed_everything(seed)
    state = TrainState.build(cfg, 3, torch.device("cpu"))
    if vq:
        state.model.bottleneck = VQPytorchBottleneck(cfg.e_dim, args.vq_codebook)
        state.opt = torch.optim.Adam(state.model.parameters(), lr=cfg.lr)
    return state, cfg


def run_cell(arm: str, sparsity: int, seed: int, args) -> dict:
    state, cfg = build(arm, sparsity, seed, args)
    train_set, test_set = run_dataset(cfg, "train"), run_dataset(cfg, "test")
    rec = ReconstructionLoss(cfg.eta, None)
    step, epoch, busy = 0, 0, 0.0
    while step < cfg.steps:
        train_set.set_epoch(epoch)
        loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        for x in loader:
            t0 = time.perf_counter()
            _train_step(state, state.model, x * 2 - 1, step, rec, nullcontext())
            busy += time.perf_counter() - t0
            step += 1
            if step >= cfg.steps:
                break
        epoch += 1
    result = evaluate(state.model, test_set, max_images=256)
    b = state.model.bottleneck
    return {"arm": arm, "S": sparsity if ARMS[arm] is not None else 1, "seed": seed, "steps": cfg.steps,
            "psnr": result["psnr"], "ssim": result["ssim"], "active_atoms": result["active_atoms"],
            "perplexity": result["perplexity"], "K": b.n_e, "bits_per_site": b.bits_per_site or math.inf,
            "s_per_step": busy / cfg.steps, "restarts": int(getattr(b, "restarts", torch.zeros(()))),
            "levers": {"vector_quantize_pytorch": True} if ARMS[arm] is None else ARMS[arm]}


def timing(arms: list[str], sparsity: int, steps: int, args) -> dict[str, float]:
    """Median seconds per training step of each arm, measured side by side: the arms take turns on the same batch
    (the order rotated every step), after 5 warm-up steps each."""
    states = {arm: build(arm, sparsity, 0, args)[0] for arm in arms}
    rec = ReconstructionLoss(0.5, None)
    train_set = run_dataset(build(arms[0], sparsity, 0, args)[1], "train")
    loader = iter(DataLoader(train_set, batch_size=32, shuffle=True, drop_last=True,
                             generator=torch.Generator().manual_seed(0)))
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    for i in range(steps + 5):
        x = next(loader) * 2 - 1
        for arm in arms[i % len(arms):] + arms[:i % len(arms)]:
            t0 = time.perf_counter()
            _train_step(states[arm], states[arm].model, x, i, rec, nullcontext())
            if i >= 5:
                times[arm].append(time.perf_counter() - t0)
    return {arm: statistics.median(t) for arm, t in times.items()}


def table(rows: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["arm"], r["S"], r["steps"]), []).append(r)

    def stat(values: list[float], fmt: str) -> str:
        if len(values) == 1:
            return format(values[0], fmt)
        return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"

    lines = ["| lever | S | steps | seeds | PSNR (dB) | atoms used | bits / site | s / step | restarts |",
             "|---|---|---|---|---|---|---|---|---|"]
    order = list(ARMS)
    for (arm, s, steps), rs in sorted(groups.items(), key=lambda kv: (kv[0][2], kv[0][1], order.index(kv[0][0])
                                                                      if kv[0][0] in order else len(order))):
        lines.append(f"| {arm} | {s} | {steps} | {len(rs)} | {stat([r['psnr'] for r in rs], '.2f')} | "
                     f"{stat([r['active_atoms'] for r in rs], '.0f')} / {rs[0]['K']} | {rs[0]['bits_per_site']:.1f} | "
                     f"{stat([r['s_per_step'] for r in rs], '.3f')} | {stat([r['restarts'] for r in rs], '.0f')} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/levers"))
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--sparsities", default="1,2")
    p.add_argument("--seeds", default="0")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--n-e", type=int, default=512)
    p.add_argument("--bins", type=int, default=16)
    p.add_argument("--vq-codebook", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--table", action="store_true", help="only print the table of OUT/results.jsonl")
    p.add_argument("--timing", type=int, default=0, metavar="STEPS",
                   help="only time the arms side by side for STEPS steps each (at the first of --sparsities)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.timing:
        s = int(args.sparsities.split(",")[0])
        medians = timing(args.arms.split(","), s, args.timing, args)
        record = {"S": s, "steps": args.timing, "threads": args.threads, "median_s_per_step": medians}
        with (args.out / "timing.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record))
        return
    path = args.out / "results.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    if not args.table:
        done = {(r["arm"], r["S"], r["seed"], r["steps"]) for r in rows}
        for seed in [int(v) for v in args.seeds.split(",")]:
            for s in [int(v) for v in args.sparsities.split(",")]:
                for arm in args.arms.split(","):
                    if arm not in ARMS:
                        raise SystemExit(f"unknown arm {arm!r}; arms: {', '.join(ARMS)}")
                    key = (arm, 1 if ARMS[arm] is None else s, seed, args.steps)
                    if key in done:
                        continue
                    row = run_cell(arm, s, seed, args)
                    rows.append(row)
                    done.add(key)
                    with path.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(json.dumps(row), flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
