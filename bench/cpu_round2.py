"""CPU kernel round 2 (issue 25): this checkout's C++ kernel against a baseline build of the kernel and SPAMS.

Run from the repository root::

    python bench/cpu_round2.py --baseline /tmp/old-lasers --rounds 4 --json out.json

``--baseline`` is another checkout with its extension built in place (e.g. ``git archive main | tar -x -C DIR``,
then ``python setup.py build_ext --inplace`` there). Both extensions register the same operators, so each timing runs
in a fresh process of its own (``--worker``), and the implementations are interleaved (baseline, new, new without the
dictionary cache, SPAMS; then again) so that a noisy machine penalises all of them alike; the best of the rounds is
kept. Each process: one warm-up call, then the best of ``--repeats`` calls on the same dictionary.

* ``new``: this checkout, dictionary cache on (its default): repeated calls code against the cached prepared
  dictionary, as evaluation and inference do.
* ``new-uncached``: the same with the cache off (budget 0): every call prepares the dictionary again.
* ``baseline``: the other checkout (it has no cache: every call prepares the dictionary).
* ``spams-ormp``: SPAMS's ``spams.omp`` (ORMP), via bench/spams_anchor.py (own process, ``setarch -R``), only when its
  codes are full. SPAMS float32 returns all-zero codes on some CPUs (AMD Zen 5): then the float32 rows are compared
  against SPAMS float64, and the table says so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SHAPES = ((512, 16, 5, 65536), (256, 64, 8, 16384), (1024, 64, 16, 16384), (8192, 16, 5, 16384))


def _problem(K: int, M: int, N: int, dtype: str, seed: int = 0):
    """omp_bench's problem: Gaussian unit-norm atoms (K, M) and Gaussian signals (N, M), float64 drawn then cast."""
    import torch

    g = torch.Generator().manual_seed(seed)
    d = torch.randn(K, M, generator=g, dtype=torch.float64)
    d = d / d.norm(dim=1, keepdim=True)
    x = torch.randn(N, M, generator=g, dtype=torch.float64)
    return x.to(getattr(torch, dtype)), d.to(getattr(torch, dtype))


def _worker(root: str, K: int, M: int, S: int, N: int, dtype: str, cache: bool, repeats: int, threads: int) -> None:
    sys.path.insert(0, root)
    import torch

    import lasers_ext

    assert os.path.dirname(os.path.abspath(lasers_ext.__file__)) == os.path.join(os.path.abspath(root), "lasers_ext")
    torch.set_num_threads(threads)
    x, d = _problem(K, M, N, dtype)
    ops = torch.ops.lasers_ext
    if hasattr(ops, "_cpu_dictionary_cache_budget") and not cache:
        ops._cpu_dictionary_cache_budget(0)
    ops.batch_omp(x, d, S)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        ops.batch_omp(x, d, S)
        best = min(best, time.perf_counter() - t0)
    print(json.dumps({"vectors_per_s": N / best}))


def _run_worker(root: str, K: int, M: int, S: int, N: int, dtype: str, cache: bool, repeats: int,
                threads: int) -> float:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", root, str(K), str(M), str(S), str(N), dtype,
           str(int(cache)), str(repeats), str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd="/")
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["vectors_per_s"]


def _spams(K: int, M: int, S: int, N: int, dtype: str, threads: int, repeats: int) -> dict:
    sys.path.insert(0, HERE)
    import spams_anchor

    x, d = _problem(K, M, N, dtype)
    return spams_anchor.time_spams(x.numpy(), d.numpy(), S, threads, repeats, processes=1)


def run(baseline: str, rounds: int, repeats: int, threads: int, configs) -> list[dict]:
    rows = []
    for K, M, S, N, dtype in configs:
        best: dict[str, float] = {}
        spams_dtype = dtype
        for r in range(rounds):
            for impl, root, cache in (("baseline", baseline, True), ("new", ROOT, True),
                                      ("new-uncached", ROOT, False)):
                v = _run_worker(root, K, M, S, N, dtype, cache, repeats, threads)
                best[impl] = max(best.get(impl, 0.0), v)
            s = _spams(K, M, S, N, spams_dtype, threads, repeats)
            if not s["full"] and spams_dtype == "float32":  # all-zero float32 codes: the float64 anchor instead
                spams_dtype = "float64"
                s = _spams(K, M, S, N, spams_dtype, threads, repeats)
            if s["full"]:
                best["spams"] = max(best.get("spams", 0.0), s["vectors_per_s"])
            print(f"K={K} M={M} S={S} N={N} {dtype} round {r + 1}: "
                  + ", ".join(f"{k} {v / 1e6:.3f}M/s" for k, v in best.items()), file=sys.stderr, flush=True)
        row = {"K": K, "M": M, "S": S, "N": N, "dtype": dtype, "spams_dtype": spams_dtype if "spams" in best else None,
               **{f"{k}_vectors_per_s": v for k, v in best.items()}}
        row["new_over_baseline"] = best["new"] / best["baseline"]
        row["uncached_over_baseline"] = best["new-uncached"] / best["baseline"]
        if "spams" in best:
            row["new_over_spams"] = best["new"] / best["spams"]
            row["uncached_over_spams"] = best["new-uncached"] / best["spams"]
            row["baseline_over_spams"] = best["baseline"] / best["spams"]
        rows.append(row)
    return rows


def main(argv=None) -> None:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "--worker":
        a = argv[1:]
        _worker(a[0], int(a[1]), int(a[2]), int(a[3]), int(a[4]), a[5], bool(int(a[6])), int(a[7]), int(a[8]))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", required=True, help="checkout with the baseline extension built in place")
    p.add_argument("--rounds", type=int, default=3, help="interleaved processes per implementation (best kept)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per process (best kept)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shapes", default="all", help="'all', or indices into SHAPES, e.g. 0,1")
    p.add_argument("--float64", action="store_true", help="also the paper's shape in float64")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    picked = SHAPES if args.shapes == "all" else [SHAPES[int(i)] for i in args.shapes.split(",")]
    configs = [(*shape, "float32") for shape in picked]
    if args.float64:
        configs.append((*SHAPES[0], "float64"))
    rows = run(os.path.abspath(args.baseline), args.rounds, args.repeats, args.threads, configs)
    out = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.processor() or
           platform.machine(), "cpus": os.cpu_count(), "threads": args.threads, "rounds": args.rounds,
           "repeats": args.repeats, "rows": rows}
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
