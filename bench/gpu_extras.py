"""Two checks of bench/gpu_train_check.sh that are not training steps:

1. ``triton``: the Triton backend with autotuning on, at the paper's shape: its best configuration (rows per program,
   warps) and vectors/second beside the CUDA kernel's, same data, same run; codes compared with the CUDA kernel's.
2. ``fid``: FID of a trained run's reconstructions against its test images, computed on the GPU and on the CPU with
   the same images, and their difference.

    python bench/gpu_extras.py triton --device cuda --n 1048576 --json triton.json
    python bench/gpu_extras.py fid RUN_DIR --images 256 --json fid.json

With ``--device cpu`` the Triton check runs under the interpreter (TRITON_INTERPRET=1, set before Triton loads) on a
small N: a rehearsal of the code path, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _time(fn, repeats: int, sync) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - tic)
    return best


def triton_check(args) -> dict:
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    import lasers_ext
    from lasers_ext import triton_omp

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    d = torch.randn(512, 16, generator=g)
    d = (d / d.norm(dim=1, keepdim=True)).to(device)
    x = torch.randn(args.n, 16, generator=g).to(device)
    result = {"device": args.device, "N": args.n, "K": 512, "M": 16, "S": 5}
    other = "cuda" if device.type == "cuda" else "cpu"
    t_triton = _time(lambda: lasers_ext.batch_omp(x, d, 5, backend="triton"), args.repeats, sync)
    t_other = _time(lambda: lasers_ext.batch_omp(x, d, 5, backend=other), args.repeats, sync)
    best = getattr(triton_omp._autotuned_kernel, "best_config", None)
    a = lasers_ext.batch_omp(x, d, 5, backend="triton")
    b = lasers_ext.batch_omp(x, d, 5, backend=other)
    result.update(triton_vectors_per_s=args.n / t_triton, **{f"{other}_vectors_per_s": args.n / t_other},
                  triton_over_compiled=t_other / t_triton,
                  best_config=None if best is None else {**best.kwargs, "num_warps": best.num_warps},
                  autotune=os.environ.get("LASERS_TRITON_AUTOTUNE", "1") != "0" and device.type == "cuda",
                  same_supports_fraction=float((a.indices == b.indices).all(1).float().mean()))
    return result


def fid_check(args) -> dict:
    import torch

    from lasers_ext.training import load_run, metrics
    from lasers_ext.training.config import run_dataset
    from lasers_ext.training.evaluation import to_image, to_model

    cfg, model, step = load_run(args.run)
    test = run_dataset(cfg, "test")
    n = min(args.images, len(test))
    x = torch.stack([test[i] for i in range(n)])
    with torch.no_grad():
        y = torch.cat([to_image(model(to_model(x[i:i + 64]))[0]) for i in range(0, n, 64)])
    out = {"run": str(args.run), "model": cfg.model, "step": step, "images": n}
    for device in ("cuda", "cpu") if torch.cuda.is_available() else ("cpu",):
        tic = time.perf_counter()
        out[f"fid_{device}"] = metrics.fid_between(x, y, device)["fid"]
        out[f"seconds_{device}"] = time.perf_counter() - tic
    if "fid_cuda" in out:
        out["abs_difference"] = abs(out["fid_cuda"] - out["fid_cpu"])
        out["relative_difference"] = out["abs_difference"] / max(abs(out["fid_cpu"]), 1e-12)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="check", required=True)
    t = sub.add_parser("triton")
    t.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    t.add_argument("--n", type=int, default=1 << 20)
    t.add_argument("--repeats", type=int, default=5)
    t.add_argument("--json", default=None)
    f = sub.add_parser("fid")
    f.add_argument("run", help="run directory of a trained model")
    f.add_argument("--images", type=int, default=256)
    f.add_argument("--json", default=None)
    args = p.parse_args(argv)
    result = triton_check(args) if args.check == "triton" else fid_check(args)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
