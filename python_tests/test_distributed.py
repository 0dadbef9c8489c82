"""``lasers train`` under torchrun, 2 CPU processes (gloo), against the oracle: one process on the same GLOBAL batch.

``--batch-size 8`` is 8 images per step in total (4 per rank under 2 processes), so DDP's averaged gradients, the
all-reduced EMA codebook statistics and the all-reduced logged means must reproduce the 1-process run within float
tolerance. The oracle runs call ``lasers_ext.training.cli.main`` in this process (the code of
``python -m lasers_ext.training.cli``,
without paying another interpreter start); each torchrun launch costs seconds, so there are four.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from lasers_ext.training import cli
from lasers_ext.training.runs import read_records

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")

REPO = Path(__file__).resolve().parents[1]
TINY = ["--hidden", "16", "--res-hidden", "8", "--n-e", "32", "--e-dim", "4", "--sparsity", "2", "--image-size", "16",
        "--train-length", "64", "--eval-images", "16", "--log-every", "2", "--checkpoint-every", "2",
        "--eval-every", "0", "--no-progress", "--device", "cpu", "--seed", "0"]
TOL = {"atol": 1e-5, "rtol": 1e-4}
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
               "TORCHELASTIC_RUN_ID")
LOGGED = ("loss", "rec_loss", "q_loss", "psnr", "perplexity")  # means of the ranks; perplexity from summed histograms


def _flags(model: str, steps: int, batch_size: int = 8) -> list[str]:
    return ["--model", model, "--steps", str(steps), "--batch-size", str(batch_size), *TINY]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _torchrun_cmd(out: Path, flags: list[str], nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
            "-m", "lasers_ext.training.cli", "train", "--out", str(out), *flags]


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _torchrun(out: Path, flags: list[str], timeout: float = 300) -> tuple[int, str]:
    """Exit code and output (stdout + stderr) of a 2-process torchrun training; the whole group dies on timeout."""
    proc = subprocess.Popen(_torchrun_cmd(out, flags), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        pytest.fail(f"torchrun did not finish within {timeout} s: {' '.join(proc.args)}")
    return proc.returncode, output


def _one_process(out: Path, flags: list[str]) -> None:
    """The oracle: ``lasers train`` in this process (1 thread like the workers; RNG states and threads restored)."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state(), torch.get_num_threads()
    try:
        with pytest.MonkeyPatch.context() as mp:
            for name in LAUNCH_VARS:
                mp.delenv(name, raising=False)
            torch.set_num_threads(1)
            assert cli.main(["train", "--out", str(out), *flags]) == 0
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        torch.set_num_threads(states[3])


def _checkpoint(run: Path) -> dict:
    return torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)


def _assert_same_state(run: Path, oracle: Path, step: int) -> None:
    got, want = _checkpoint(run), _checkpoint(oracle)
    assert got["step"] == want["step"] == step
    assert got["model"].keys() == want["model"].keys()
    torch.testing.assert_close(got["model"], want["model"], **TOL)
    torch.testing.assert_close(got["opt"]["state"], want["opt"]["state"], **TOL)  # Adam moments too


def _train_records(run: Path) -> list[dict]:
    return [r for r in read_records(run / "metrics.jsonl") if r["kind"] == "train"]


def _assert_same_logs(run: Path, oracle: Path) -> None:
    got, want = _train_records(run), _train_records(oracle)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        for name in LOGGED:
            assert g[name] == pytest.approx(w[name], rel=TOL["rtol"], abs=TOL["atol"]), (g["step"], name)


# ------------------------------------------------------------------------------------------------------- the runs
@pytest.fixture(scope="module")
def oracle(tmp_path_factory) -> dict[str, Path]:
    """1-process runs: DL-VAE 4 steps, VQ-VAE 2 and 4 steps."""
    base = tmp_path_factory.mktemp("one_process")
    runs = {"dl-vae": ("dl-vae", 4), "vq-vae-2": ("vq-vae", 2), "vq-vae": ("vq-vae", 4)}
    for name, (model, steps) in runs.items():
        _one_process(base / name, _flags(model, steps))
    return {name: base / name for name in runs}


@pytest.fixture(scope="module")
def dl_two(tmp_path_factory) -> tuple[Path, str]:
    """2-process DL-VAE, 4 steps of global batch 8."""
    out = tmp_path_factory.mktemp("two_processes") / "dl-vae"
    rc, output = _torchrun(out, _flags("dl-vae", 4))
    assert rc == 0, output
    return out, output


@pytest.fixture(scope="module")
def vq_two(tmp_path_factory) -> tuple[Path, str]:
    """2-process VQ-VAE, 2 steps of global batch 8 (then resumed by test_resume_with_another_number_of_processes)."""
    out = tmp_path_factory.mktemp("two_processes") / "vq-vae"
    rc, output = _torchrun(out, _flags("vq-vae", 2))
    assert rc == 0, output
    return out, output


# ------------------------------------------------------------------------------------------------------ the tests
def test_dl_vae_parameters_match_one_process(dl_two, oracle):
    _assert_same_state(dl_two[0], oracle["dl-vae"], 4)


def test_vq_vae_parameters_and_ema_buffers_match_one_process(vq_two, oracle):
    state = _checkpoint(vq_two[0])["model"]
    assert {"bottleneck.cluster_size", "bottleneck.embed_avg"} <= state.keys()
    _assert_same_state(vq_two[0], oracle["vq-vae-2"], 2)


def test_dl_levers_match_one_process(tmp_path):
    """Issue 26's levers under DDP: k-means initialisation and restarts at every step (window 1) from the global
    batch, per-slot Lloyd-Max levels, the rotation trick: 2 processes against one."""
    flags = _flags("dl-vae", 4) + ["--dict-init", "kmeans", "--restart-window", "1", "--coeff-bins", "8",
                                   "--coeff-per-slot", "--coeff-quant", "lloyd", "--gradient", "rotation",
                                   "--n-e", "256"]  # more atoms than 128 sites use: restarts at every step
    _one_process(tmp_path / "one", flags)
    rc, output = _torchrun(tmp_path / "two", flags)
    assert rc == 0, output
    got, want = _checkpoint(tmp_path / "two"), _checkpoint(tmp_path / "one")
    assert int(want["model"]["bottleneck.restarts"]) > 0 and got["step"] == want["step"] == 4
    assert torch.equal(got["model"]["bottleneck.restarts"], want["model"]["bottleneck.restarts"])
    # a Lloyd level is the mean of the coefficients nearest to it: a coefficient a rounding away from a cell border
    # (the ranks' convolutions on half batches differ in the last bits) moves it by more than the rounding
    table = "bottleneck.coeff_quantizer.table"
    torch.testing.assert_close(got["model"].pop(table), want["model"].pop(table), atol=1e-3, rtol=0)
    torch.testing.assert_close(got["model"], want["model"], **TOL)
    torch.testing.assert_close(got["opt"]["state"], want["opt"]["state"], **TOL)


def test_logged_metrics_are_all_reduced_means(dl_two, vq_two, oracle):
    _assert_same_logs(dl_two[0], oracle["dl-vae"])
    _assert_same_logs(vq_two[0], oracle["vq-vae-2"])


@pytest.mark.parametrize("model", ["dl-vae", "vq-vae"])
def test_only_rank_zero_writes(model, dl_two, vq_two, oracle):
    out, output = dl_two if model == "dl-vae" else vq_two
    one = oracle["dl-vae" if model == "dl-vae" else "vq-vae-2"]
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert files == sorted(str(p.relative_to(one)) for p in one.rglob("*"))  # same files, no stray temporaries
    assert not [f for f in files if ".tmp" in f]
    steps = 4 if model == "dl-vae" else 2
    records = read_records(out / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in records] == [("train", s) for s in range(2, steps + 1, 2)] + [
        ("eval", steps)]
    assert _checkpoint(out)["world_size"] == 2
    notes = json.loads((out / "config.json").read_text())["notes"]
    assert (notes["world_size"], notes["local_batch_size"]) == (2, 4)
    assert output.count("reconstruction loss") == 1  # rank 0 prints
    assert output.count(f"| {model} | {steps} |") == 1  # only rank 0 has the final evaluation


def test_resume_with_another_number_of_processes(vq_two, oracle, tmp_path):
    """2 steps with 2 processes, then the same run directory resumed by 1 process to 4 steps."""
    out = tmp_path / "vq-vae"
    shutil.copytree(vq_two[0], out)
    _one_process(out, _flags("vq-vae", 4))
    _assert_same_state(out, oracle["vq-vae"], 4)
    _assert_same_logs(out, oracle["vq-vae"])
    assert [(r["kind"], r["step"]) for r in read_records(out / "metrics.jsonl")] == [
        ("train", 2), ("eval", 2), ("train", 4), ("eval", 4)]
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def _children(pid: int) -> list[int]:
    """Child processes of ``pid``, from the parent ids in /proc/*/stat (no CONFIG_PROC_CHILDREN, psutil or pgrep)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                pids.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            pass  # exited meanwhile
    return pids


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the workers through /proc")
def test_a_killed_rank_fails_the_job_instead_of_hanging(tmp_path):
    out = tmp_path / "run"
    flags = _flags("vq-vae", 100_000) + ["--log-every", "1", "--checkpoint-every", "100000"]
    log = open(tmp_path / "torchrun.log", "w+")
    proc = subprocess.Popen(_torchrun_cmd(out, flags), cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not _train_records(out):
            assert proc.poll() is None, f"torchrun exited with {proc.returncode} before training"
            assert time.monotonic() < deadline, "training did not start within 120 s"
            time.sleep(0.1)
        workers = {int(_environ(p).get("RANK", -1)): p for p in _children(proc.pid) if "LOCAL_RANK" in _environ(p)}
        assert sorted(workers) == [0, 1], workers
        os.kill(workers[1], signal.SIGKILL)
        try:
            rc = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("torchrun still runs 120 s after a worker was killed")
        assert rc != 0
        deadline = time.monotonic() + 30
        while _alive(workers[0]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(workers[0]), "rank 0 outlived the job"
    except BaseException:
        log.seek(0)
        print(log.read())
        raise
    finally:
        if proc.poll() is None:
            _kill_group(proc)
        log.close()


def test_global_batch_must_be_a_multiple_of_the_processes(tmp_path):
    rc, output = _torchrun(tmp_path / "run", _flags("vq-vae", 4, batch_size=7))
    assert rc != 0
    assert "must be a multiple of the number of processes (2)" in output, output
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
