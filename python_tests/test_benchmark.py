"""The benchmark runs end to end on a tiny problem, and its eager anchor computes real OMP (timings not asserted)."""

import json

import torch
from conftest import random_problem

from lasers_ext import benchmark
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
