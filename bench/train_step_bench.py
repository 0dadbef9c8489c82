"""Training-step time of the DL autoencoders against the VQ ones, interleaved in one process: what the bottleneck costs.

    python bench/train_step_bench.py --device cuda --json step.json                 # the GPU check's settings
    python bench/train_step_bench.py --device cpu --settings 32x32/b32 --steps 20   # the README's CPU comparison

For each setting (image size / batch), pair (``vae``: DL-VAE against VQ-VAE; ``gan``: DL-GAN against VQ-GAN, the
discriminator active from the first step) and mode (``eager``; ``compiled``: ``torch.compile(model, fullgraph=True)``),
it times whole training steps (forward, backward, optimiser, and the discriminator's step for GANs) of the two models
alternately on the same batch, the order swapped every step, and takes the median after warm-up. Then the profiler
reads the time of ``lasers_ext::batch_omp`` in a few DL steps (device time on a GPU, CPU time on the CPU), so the
bottleneck's share of the step is known. The DL bottleneck has the paper's settings (``PAPER_LEVERS``: dead-atom
restarts, the training tool's default, are a host-side step outside any compiled graph, which ``fullgraph=True``
refuses). Models are the paper's (hidden 128, K = 512, e_dim 16, S = 5) unless
``--hidden`` etc. say otherwise; bfloat16 autocast on CUDA as the training tool (``--no-amp`` to switch it off).

Each row of the JSON has "setting", "pair", "compiled", "vq_step_ms", "dl_step_ms", "dl_over_vq", "omp_ms",
"omp_share_of_dl_step", "steps"; a setting that fails (e.g. a graph break under fullgraph) has "error" instead.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from contextlib import nullcontext

import torch

from lasers_ext.models import ReconstructionLoss
from lasers_ext.training import TrainConfig, TrainState
from lasers_ext.training.config import PAPER_LEVERS
from lasers_ext.training.loop import _train_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _setting(text: str) -> tuple[int, int]:
    """'32x32/b32' -> (32, 32): square images of that size, batch 32."""
    try:
        size, batch = text.split("/b")
        h, w = (int(v) for v in size.split("x"))
        if h != w or h < 8 or int(batch) < 1:
            raise ValueError
        return h, int(batch)
    except ValueError:
        raise argparse.ArgumentTypeError(f"settings look like 32x32/b32 (square, >= 8), got {text!r}") from None


class _Runner:
    """One model's training state and a step function (eager or compiled forward)."""

    def __init__(self, model_name: str, size: int, batch: int, args, device: torch.device) -> None:
        cfg = TrainConfig(model=model_name, image_size=size, batch_size=batch, hidden=args.hidden,
                          res_hidden=args.res_hidden, n_e=args.n_e, e_dim=args.e_dim, sparsity=args.sparsity,
                          disc_start=0, ndf=args.ndf, disc_layers=args.disc_layers, perceptual=False,
                          device=device.type, amp=args.amp, progress=False, **PAPER_LEVERS)
        torch.manual_seed(0)
        self.state = TrainState.build(cfg.validate(), 3, device)
        self.net = self.state.model
        self.rec = ReconstructionLoss(cfg.eta, None)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if args.amp and device.type == "cuda"
                         else nullcontext())
        self.step_no = 0

    def compile(self) -> None:
        if self.state.gan is not None:
            # the adaptive GAN weight differentiates the same graph twice (retain_graph=True), which AOTAutograd's
            # donated buffers forbid
            torch._functorch.config.donated_buffer = False
        self.net = torch.compile(self.state.model, fullgraph=True)

    def step(self, x: torch.Tensor) -> None:
        _train_step(self.state, self.net, x, self.step_no, self.rec, self.autocast)
        self.step_no += 1


def _omp_time_ms(runner: _Runner, x: torch.Tensor, device: torch.device, steps: int = 3) -> float:
    """Mean time per step of lasers_ext::batch_omp inside ``steps`` training steps, from the profiler."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            runner.step(x)
        _sync(device)
    total_us = 0.0
    for event in prof.key_averages():
        if event.key == "lasers_ext::batch_omp":
            total_us += event.device_time_total if device.type == "cuda" else event.cpu_time_total
    return total_us / 1000 / steps


def measure(size: int, batch: int, pair: str, compiled: bool, args, device: torch.device) -> dict:
    suffix = "gan" if pair == "gan" else "vae"
    row = {"setting": f"{size}x{size}/b{batch}", "pair": pair, "compiled": compiled, "steps": args.steps}
    try:
        runners = {kind: _Runner(f"{kind}-{suffix}", size, batch, args, device) for kind in ("vq", "dl")}
        if compiled:
            for r in runners.values():
                r.compile()
        gen = torch.Generator().manual_seed(0)
        x = (torch.rand(batch, 3, size, size, generator=gen) * 2 - 1).to(device)
        times: dict[str, list[float]] = {"vq": [], "dl": []}
        for i in range(args.warmup + args.steps):
            order = ("vq", "dl") if i % 2 == 0 else ("dl", "vq")
            for kind in order:
                _sync(device)
                tic = time.perf_counter()
                runners[kind].step(x)
                _sync(device)
                if i >= args.warmup:
                    times[kind].append((time.perf_counter() - tic) * 1000)
        vq, dl = statistics.median(times["vq"]), statistics.median(times["dl"])
        omp = _omp_time_ms(runners["dl"], x, device)
        row.update(vq_step_ms=vq, dl_step_ms=dl, dl_over_vq=dl / vq, omp_ms=omp, omp_share_of_dl_step=omp / dl)
    except Exception as err:  # reported in the table and the JSON; the other settings still run
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--settings", type=lambda s: [_setting(v) for v in s.split(",")],
                   default=[(32, 32), (256, 8)], help="image size and batch, e.g. 32x32/b32,256x256/b8")
    p.add_argument("--pairs", default="vae,gan", help="vae, gan or both (comma-separated)")
    p.add_argument("--modes", default="eager,compiled", help="eager, compiled or both (comma-separated)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per model (median)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--res-hidden", type=int, default=32)
    p.add_argument("--n-e", type=int, default=512)
    p.add_argument("--e-dim", type=int, default=16)
    p.add_argument("--sparsity", type=int, default=5)
    p.add_argument("--ndf", type=int, default=64)
    p.add_argument("--disc-layers", type=int, default=3)
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--json", default=None, help="write the rows and the machine description here")
    args = p.parse_args(argv)
    pairs = [v for v in args.pairs.split(",") if v]
    modes = [v for v in args.modes.split(",") if v]
    if not set(pairs) <= {"vae", "gan"} or not set(modes) <= {"eager", "compiled"} or args.steps < 1:
        p.error("pairs must be vae/gan, modes eager/compiled, steps >= 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA GPU is available")
    rows = []
    print("| setting | pair | mode | VQ step (ms) | DL step (ms) | DL / VQ | batch_omp (ms) | share of DL step |")
    print("|---|---|---|---|---|---|---|---|")
    for size, batch in args.settings:
        for pair in pairs:
            for mode in modes:
                row = measure(size, batch, pair, mode == "compiled", args, device)
                rows.append(row)
                if "error" in row:
                    print(f"| {row['setting']} | {pair} | {mode} | error: {row['error']} |||||")
                else:
                    print(f"| {row['setting']} | {pair} | {mode} | {row['vq_step_ms']:.1f} | {row['dl_step_ms']:.1f} | "
                          f"{row['dl_over_vq']:.3f} | {row['omp_ms']:.2f} | {row['omp_share_of_dl_step']:.1%} |",
                          flush=True)
    machine = {"date": datetime.date.today().isoformat(), "device": args.device, "torch": torch.__version__,
               "cuda": torch.version.cuda, "threads": torch.get_num_threads(), "cpu": platform.processor(),
               "card": torch.cuda.get_device_name() if device.type == "cuda" else None, "amp": args.amp,
               "model": {k: getattr(args, k) for k in ("hidden", "res_hidden", "n_e", "e_dim", "sparsity", "ndf",
                                                     "disc_layers")}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "rows": rows}, f, indent=2)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
