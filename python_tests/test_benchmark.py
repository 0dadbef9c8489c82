"""The benchmark runs end to end on a tiny problem, and its eager anchor computes real OMP (timings not asserted)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_problem
from lasers_bench import omp_bench as benchmark

from lasers_ext.reference import batch_omp_reference


def test_naive_anchor_is_real_omp(gen):
    x, d = random_problem(gen, 200, 16, 64, torch.float64)
    idx, coef = benchmark.naive_torch_omp(x, d, 5)
    ref_idx, ref_coef = batch_omp_reference(x, d, 5)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(coef, ref_coef)


def test_benchmark_cli_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert benchmark.main(["--K", "32", "--M", "8", "--S", "3", "--N", "64,128", "--repeats", "1",
                           "--slow-max-n", "32", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    impls = {r["impl"] for r in result["rows"]}
    assert {"cpu", "reference", "naive-torch", "sklearn"} <= impls
    for r in result["rows"]:
        capped = r["impl"] in benchmark.SLOW_CPU
        assert r["vectors_per_s"] > 0 and r["timed_N"] == (min(r["N"], 32) if capped else r["N"])
        assert r["impl"] in table
    assert all(r["x_sklearn"] == 1.0 for r in result["rows"] if r["impl"] == "sklearn")


def test_gpu_train_check_rehearses_end_to_end_on_cpu(tmp_path):
    """bench/gpu_train_check.sh --device cpu --tiny: every step of the GPU script (compare, torchrun compare, step
    times eager and compiled, Triton beside the compiled kernel, FID) on tiny models; the figures are not asserted."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHON": sys.executable, "RESULTS_DIR": str(tmp_path / "results"),
           "RUNS_DIR": str(tmp_path / "runs")}
    proc = subprocess.run(["bash", "bench/gpu_train_check.sh", "--device", "cpu", "--tiny"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    results = tmp_path / "results"
    steps = json.loads(next(results.glob("*-train-tiny-steps.json")).read_text())
    assert {(r["pair"], r["compiled"]) for r in steps["rows"]} == {(p, c) for p in ("vae", "gan") for c in (0, 1)}
    for row in steps["rows"]:
        assert "error" not in row, row
        assert row["dl_over_vq"] == pytest.approx(row["dl_step_ms"] / row["vq_step_ms"])
        assert row["omp_ms"] > 0 and 0 < row["omp_share_of_dl_step"] < 1
    triton = json.loads(next(results.glob("*-triton.json")).read_text())
    assert triton["same_supports_fraction"] >= 0.99 and triton["triton_vectors_per_s"] > 0
    fid = json.loads(next(results.glob("*-fid.json")).read_text())
    assert math.isfinite(fid["fid_cpu"]) and fid["images"] == 8
    for run in ("compare", "compare-ddp"):
        assert (tmp_path / "runs" / run / "compare.md").read_text().count("| dl-vae |") == 1
