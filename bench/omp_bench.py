"""Batch-OMP throughput: every available backend against outside anchors, side by side in one run.

Run ``lasers-omp-bench``, ``python bench/omp_bench.py`` or ``python -m lasers_bench.omp_bench``. Defaults are the
paper's shape (K=512 atoms, M=16, S=5) over several N. Anchors:

* ``sklearn``: scikit-learn's ``orthogonal_mp_gram`` (Rubinstein's Batch-OMP with a Python loop over signals),
  given the Gram matrix and D^T x precomputed (their cost is not timed).
* ``naive-torch``: an eager batched-PyTorch Batch-OMP, the style of the paper authors' code ((N, K) correlations,
  one batched solve per step).
* ``omp-gpu``: the published batched-PyTorch OMP package ``orthogonal-matching-pursuit-gpu`` (Lubonja et al. 2024,
  ``run_omp(alg="v0")``), when it is installed.
* ``spams-ormp``: SPAMS's ``spams.omp`` (``spams-bin``, C++ with BLAS), which computes ORMP, a different greedy rule;
  CPU only, when installed, timed in processes of its own (bench/spams_anchor.py), best of several, and only
  when its codes are full (N * S non-zeros). Its float32 path returns all-zero codes on some CPUs (AMD Zen 5):
  there a float32 run is anchored on SPAMS float64, and the row records ``"dtype": "float64"``.

On a GPU the CUDA op's other kernels are timed beside its default: ``cuda-general`` (the warp-per-vector kernel that
takes every shape) and ``cuda-fast-v1`` (the fast path with one vector per warp; the paper's shape only).

On the CPU, the slow implementations (anchors and the float64 reference) are timed on the first ``--slow-max-n``
vectors only: their per-vector cost does not fall with N, so vectors/second stays comparable. On a GPU only sklearn
(a CPU loop) is capped; the batched-PyTorch anchors get the full N, halved until it fits in GPU memory. Ratios are
against sklearn, against SPAMS on the CPU and, on a GPU, against the best batched-PyTorch anchor.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from lasers_bench import spams_anchor

from lasers_ext import available_backends, batch_omp

SLOW_CPU = {"sklearn", "naive-torch", "omp-gpu", "reference"}
SLOW_GPU = {"sklearn"}
TORCH_ANCHORS = ("naive-torch", "omp-gpu")


def naive_torch_omp(x: torch.Tensor, unit: torch.Tensor, sparsity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager batched Batch-OMP over unit-norm atoms: (N, S) indices and coefficients. An anchor, not an oracle."""
    gram = unit @ unit.T
    alpha0 = x @ unit.T  # (N, K)
    alpha = alpha0
    rows = torch.arange(x.shape[0], device=x.device)[:, None]
    support = torch.empty((x.shape[0], 0), dtype=torch.long, device=x.device)
    gamma = None
    for _ in range(sparsity):
        j = alpha.abs().argmax(dim=1, keepdim=True)
        support = torch.cat([support, j], dim=1)
        g_tt = gram[support[:, :, None], support[:, None, :]]
        gamma = torch.linalg.solve(g_tt, alpha0[rows, support])
        alpha = alpha0 - (gamma.unsqueeze(1) @ gram[support]).squeeze(1)
    return support, gamma


# The CUDA op's kernels besides its default (LASERS_CUDA_KERNEL=auto: the fast path where it applies).
CUDA_VARIANTS = {
    "cuda-general": {"LASERS_CUDA_KERNEL": "general"},  # the warp-per-vector kernel that takes every shape
    "cuda-fast-v1": {"LASERS_CUDA_KERNEL": "fast", "LASERS_CUDA_FAST_V": "1"},  # fast path, one vector per warp
}


def _with_env(env: dict[str, str], fn: Callable[[], object]) -> Callable[[], object]:
    """A thunk that runs ``fn`` with the environment variables ``env`` set (read by the CUDA op at each call)."""

    def run():
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            return fn()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    return run


def _time(fn: Callable[[], object], repeats: int) -> float:
    """Best wall time of ``repeats`` runs after one warm-up (seconds)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def _implementations(dictionary: torch.Tensor, sparsity: int, device: torch.device, names: set[str] | None):
    """Yields (name, prepare) pairs; ``prepare(xs)`` does untimed set-up and returns the thunk to time."""
    unit = dictionary / dictionary.norm(dim=1, keepdim=True)
    wanted = lambda name: names is None or name in names  # noqa: E731
    for backend in available_backends(device):
        if wanted(backend):
            yield backend, lambda xs, b=backend: lambda: batch_omp(xs, dictionary, sparsity, backend=b)
    if "cuda" in available_backends(device):
        # the CUDA op's other builds, side by side with its default (see csrc/cuda/omp_cuda.cu)
        k, m = dictionary.shape
        paper_build = 256 < k <= 512 and m <= 32 and sparsity == 5 and dictionary.dtype == torch.float32
        for name, env in CUDA_VARIANTS.items():
            if wanted(name) and (name != "cuda-fast-v1" or paper_build):
                yield name, lambda xs, env=env: _with_env(env, lambda: batch_omp(xs, dictionary, sparsity,
                                                                                   backend="cuda"))
    if wanted("naive-torch"):
        yield "naive-torch", lambda xs: lambda: naive_torch_omp(xs, unit, sparsity)
    if wanted("omp-gpu"):
        try:
            from orthogonal_matching_pursuit_gpu import run_omp
        except ImportError:
            print("orthogonal-matching-pursuit-gpu is not installed: skipping the omp-gpu anchor", file=sys.stderr)
        else:
            atoms_as_columns = unit.T.contiguous()  # their X is (features, atoms)
            yield "omp-gpu", lambda xs: lambda: run_omp(atoms_as_columns, xs, sparsity, precompute=True,
                                                        normalize=False, fit_intercept=False, alg="v0")
    if wanted("sklearn"):
        try:
            from sklearn.linear_model import orthogonal_mp_gram
        except ImportError:
            print("scikit-learn is not installed: skipping the sklearn anchor", file=sys.stderr)
            return
        gram = (unit @ unit.T).cpu().numpy()

        def prepare_sklearn(xs: torch.Tensor) -> Callable[[], object]:
            xy = np.ascontiguousarray((xs @ unit.T).cpu().numpy().T)  # (K, n)
            return lambda: orthogonal_mp_gram(gram, xy, n_nonzero_coefs=sparsity, copy_Gram=True, copy_Xy=False)

        yield "sklearn", prepare_sklearn


def run(
    K: int = 512, M: int = 16, S: int = 5, Ns=(1024, 16384, 65536), dtype: str = "float32", device: str = "cpu",
    repeats: int = 3, slow_max_n: int = 4096, names=None, seed: int = 0, spams_processes: int = 3,
) -> dict:
    """Times every implementation; returns a JSON-ready dict with one row per (implementation, N)."""
    dev = torch.device(device)
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(K, M, generator=g, dtype=torch.float64)
    dictionary = (dictionary / dictionary.norm(dim=1, keepdim=True)).to(dev, dt)
    x_all = torch.randn(max(Ns), M, generator=g, dtype=torch.float64).to(dev, dt)
    slow = SLOW_CPU if dev.type == "cpu" else SLOW_GPU
    rows = []
    for n in Ns:
        x = x_all[:n]
        for name, prepare in _implementations(dictionary, S, dev, names):
            n_used = min(n, slow_max_n) if name in slow else n
            while True:
                try:
                    seconds = _time(prepare(x[:n_used]), repeats)
                    break
                except torch.OutOfMemoryError:
                    if n_used <= 1024:
                        raise
                    n_used //= 2
                    torch.cuda.empty_cache()
            rows.append({"impl": name, "N": n, "timed_N": n_used, "seconds": seconds,
                         "vectors_per_s": n_used / seconds})
            print(f"  {name:<14} N={n:<9} timed N={n_used:<9} {n_used / seconds:>14,.0f} vectors/s", file=sys.stderr,
                  flush=True)
        if dev.type == "cpu" and (names is None or spams_anchor.LABEL in names) and spams_processes > 0:
            if not spams_anchor.available():
                print("spams-bin is not installed: skipping the spams-ormp anchor", file=sys.stderr)
                spams_processes = 0
                continue
            unit = (dictionary.double() / dictionary.double().norm(dim=1, keepdim=True)).to(dt)
            r = spams_anchor.time_spams(x.numpy(), unit.numpy(), S, torch.get_num_threads(), repeats, spams_processes)
            anchor_dtype = dtype
            if not r["full"] and dt == torch.float32:
                # SPAMS float32 returns all-zero codes on some CPUs (AMD Zen 5): anchor on its float64 path instead
                print(f"  {spams_anchor.LABEL}: {r['nonzeros']} non-zeros of {n * S} (float32 codes not full), "
                      "timing its float64 path instead", file=sys.stderr, flush=True)
                anchor_dtype = "float64"
                r = spams_anchor.time_spams(x.double().numpy(), unit.double().numpy(), S, torch.get_num_threads(),
                                            repeats, spams_processes)
            if not r["full"]:
                print(f"  {spams_anchor.LABEL}: {r['nonzeros']} non-zeros of {n * S} ({anchor_dtype} codes not full), "
                      "not used as an anchor", file=sys.stderr, flush=True)
                continue
            rows.append({"impl": spams_anchor.LABEL, "N": n, "timed_N": n, "seconds": n / r["vectors_per_s"],
                         "vectors_per_s": r["vectors_per_s"], "dtype": anchor_dtype})
            print(f"  {spams_anchor.LABEL:<14} N={n:<9} timed N={n:<9} {r['vectors_per_s']:>14,.0f} vectors/s "
                  f"(best of {spams_processes} processes, {anchor_dtype})", file=sys.stderr, flush=True)
    for n in Ns:
        here = [r for r in rows if r["N"] == n]
        base = next((r["vectors_per_s"] for r in here if r["impl"] == "sklearn"), None)
        anchor = max((r["vectors_per_s"] for r in here if r["impl"] in TORCH_ANCHORS), default=None)
        spams = next((r["vectors_per_s"] for r in here if r["impl"] == spams_anchor.LABEL), None)
        for r in here:
            r["x_sklearn"] = r["vectors_per_s"] / base if base else None
            r["x_spams"] = r["vectors_per_s"] / spams if spams else None
            r["x_torch_anchor"] = r["vectors_per_s"] / anchor if anchor and dev.type != "cpu" else None
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "problem": {"K": K, "M": M, "S": S, "dtype": dtype, "device": str(dev), "atoms": "random unit-norm",
                    "signals": "standard normal"},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "numpy": np.__version__,
                    "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None},
        "rows": rows,
    }


def format_table(result: dict) -> str:
    p = result["problem"]
    lines = [f"Batch-OMP  K={p['K']} M={p['M']} S={p['S']} {p['dtype']} on {p['device']} "
             f"(torch {result['machine']['torch']}, {result['machine']['torch_threads']} threads)",
             f"{'implementation':<14} {'N':>8} {'timed N':>8} {'vectors/s':>14} {'x sklearn':>10} "
             f"{'x SPAMS (ORMP)':>14} {'x best torch anchor':>19}"]
    for r in result["rows"]:
        ratio = f"{r['x_sklearn']:.1f}" if r["x_sklearn"] else "-"
        spams = f"{r['x_spams']:.2f}" if r.get("x_spams") else "-"
        anchor = f"{r['x_torch_anchor']:.1f}" if r.get("x_torch_anchor") else "-"
        lines.append(f"{r['impl']:<14} {r['N']:>8} {r['timed_N']:>8} {r['vectors_per_s']:>14,.0f} {ratio:>10} "
                     f"{spams:>14} {anchor:>19}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--K", type=int, default=512, help="atoms in the dictionary")
    ap.add_argument("--M", type=int, default=16, help="dimension of a vector")
    ap.add_argument("--S", type=int, default=5, help="sparsity")
    ap.add_argument("--N", type=lambda s: [int(v) for v in s.split(",")], default=[1024, 16384, 65536],
                    help="comma-separated numbers of vectors")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per row (best is kept), after a warm-up")
    ap.add_argument("--slow-max-n", type=int, default=4096, help="vectors given to the anchors and the reference")
    ap.add_argument("--only", default=None, help="comma-separated implementations to time (default: all)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--spams-processes", type=int, default=3,
                    help="fresh processes timing the SPAMS anchor, best kept (0: skip it)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = set(args.only.split(",")) if args.only else None
    result = run(args.K, args.M, args.S, args.N, args.dtype, args.device, args.repeats, args.slow_max_n, names,
                 spams_processes=args.spams_processes)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
