"""lasers_ext.training (loop, runs, evaluate, compare, cli, distributed):
the training tool end to end on tiny CPU budgets.

Oracles: an uninterrupted run (a crashed and resumed run must end bit for bit equal to it: model, optimiser, EMA
buffers, discriminator and its optimiser, RNG state, logged metrics); skimage.metrics (PSNR, Gaussian SSIM) and numpy
(code usage, perplexity = exp(entropy)) recomputed on the same reconstructions;
lasers_ext.training.metrics.psnr on the same
centre crop for ``reconstruct``; index arithmetic for ResumableSampler (rank r of W takes positions r, r + W, ... of
one permutation); the files every command promises, read back with json, torch.load and PIL.
"""

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from lasers_ext import sparse_decode
from lasers_ext.training import TrainConfig, compare, evaluate, load_run, metrics, train
from lasers_ext.training import comparison as compare_mod
from lasers_ext.training import loop as loop_mod
from lasers_ext.training import runs as runs_mod
from lasers_ext.training.cli import main
from lasers_ext.training.config import build_model
from lasers_ext.training.data import build_dataset
from lasers_ext.training.distributed import ResumableSampler
from lasers_ext.training.runs import CHECKPOINT, save_checkpoint

# Tiny model, tiny crops, a few steps: every run here takes seconds on 2 CPU cores.
TINY = dict(hidden=16, res_hidden=8, n_e=32, e_dim=4, sparsity=2, image_size=16, train_length=64, batch_size=8,
            eval_images=16, steps=6, log_every=2, checkpoint_every=2, eval_every=0, progress=False, device="cpu")
PICTURES = ("reconstructions", "flip", "curves", "atoms", "atoms_embedding", "latent_top_component")
EVAL_KEYS = {"model", "step", "psnr", "ssim", "flip", "lpips", "perplexity", "active_atoms", "images", "latent_error"}
LPIPS_MISSING = metrics.lpips_status().startswith("LPIPS unavailable")


def _flags(**values) -> list[str]:
    """TrainConfig values -> command-line flags (``--batch-size 8``, ``--no-progress``)."""
    out = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        else:
            out += [flag, str(value)]
    return out


def _records(run, kind=None) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return [r for r in records if kind is None or r["kind"] == kind]


def _read_png(path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
    assert image.format == "PNG" and image.width > 0 and image.height > 0, path
    return image


def _reconstruct(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [0, 1] -> (reconstructions in [0, 1], code indices), independently of train._to_model/_to_image."""
    with torch.no_grad():
        x_rec, _, info = model(x * 2 - 1)
    return ((x_rec.float() + 1) / 2).clamp(0, 1), info.indices


def _assert_same(a, b, where="state") -> None:
    """Exact equality of nested checkpoint structures (tensors with torch.equal and the same dtype)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _copy_run(cli_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(cli_run[0], run)
    return run


def _saved_config(run) -> TrainConfig:
    return TrainConfig.from_dict({**json.loads((run / "config.json").read_text())["config"], "out": str(run)})


@pytest.fixture(scope="module", autouse=True)
def _cli_process(tmp_path_factory):
    """Starts one tiny DL-VAE training by the real command line in a subprocess as soon as the module's first test
    runs (it overlaps the in-process tests before the ones that need it): (run directory, Popen)."""
    run = tmp_path_factory.mktemp("cli") / "run"
    proc = subprocess.Popen([sys.executable, "-m", "lasers_ext.training.cli", "train", *_flags(**TINY),
                             "--out", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield run, proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def cli_run(_cli_process):
    """The finished subprocess run: (run directory, CompletedProcess)."""
    run, proc = _cli_process
    stdout, stderr = proc.communicate(timeout=600)
    return run, subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture
def no_pictures(monkeypatch):
    """Skip the per-run pictures (matplotlib, seconds each) in tests that check something else."""
    monkeypatch.setattr(loop_mod, "run_pictures", lambda *args, **kwargs: None)


class _Crash(RuntimeError):
    """Raised from the training callback: the process 'dies' after this step."""


# ----------------------------------------------------------------------------------------------------- config, sampler
def test_config_dict_round_trip_and_unknown_keys():
    cfg = TrainConfig(**TINY, model="vq-gan")
    assert cfg.validate() is cfg and TrainConfig().validate() == TrainConfig()
    assert cfg.kind == "vq" and cfg.gan and TrainConfig().kind == "dl" and not TrainConfig().gan
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown configuration keys: bogus, n_atoms"):
        TrainConfig.from_dict({**cfg.to_dict(), "n_atoms": 3, "bogus": 1})
    assert TrainConfig(sparsity=5, e_dim=4, model="vq-vae").validate()  # sparsity is a DL-only constraint


@pytest.mark.parametrize(("field", "value", "match"), [
    ("model", "dl-vqe", "model must be one of"),
    ("device", "tpu", "device must be one of"),
    ("eta", 1.5, "eta must be in"),
    ("eta", -0.1, "eta must be in"),
    ("batch_size", 0, "batch_size must be >= 1"),
    ("steps", 0, "steps must be >= 1"),
    ("eval_every", -1, "eval_every must be >= 0"),
    ("lr", 0.0, "lr must be a finite number > 0"),
    ("lr", float("inf"), "lr must be a finite number > 0"),
    ("image_size", 8, "image_size must be >= 11"),
    ("sparsity", 5, "sparsity must be <="),
    ("fid_images", 1, "fid_images"),
])
def test_validate_rejects_bad_values(tmp_path, field, value, match):
    cfg = TrainConfig(**{**TINY, field: value}, out=str(tmp_path / "run"))
    with pytest.raises(ValueError, match=match):
        cfg.validate()
    with pytest.raises(ValueError, match=match):
        train(cfg)
    assert not (tmp_path / "run").exists()  # rejected before anything is written


@pytest.mark.parametrize("n", [50, 51])
def test_resumable_sampler_global_batches_do_not_depend_on_world_size(n):
    data, seed, batch = list(range(n)), 3, 6
    orders = {}
    for epoch in (0, 1):
        single = ResumableSampler(data, 1, 0, seed)
        single.set_epoch(epoch)
        order = list(single)
        assert sorted(order) == data and len(single) == n
        ranks = [ResumableSampler(data, 2, r, seed) for r in range(2)]
        for sampler in ranks:
            sampler.set_epoch(epoch)
        per_rank = [list(sampler) for sampler in ranks]
        total = n // 2 * 2
        for r in range(2):
            assert per_rank[r] == order[r:total:2]  # rank r takes positions r, r + W, ...
        half = batch // 2
        for t in range(n // batch):
            union = per_rank[0][t * half:(t + 1) * half] + per_rank[1][t * half:(t + 1) * half]
            assert sorted(union) == sorted(order[t * batch:(t + 1) * batch])
        # Resuming after 2 global batches: skip 2 local batches, whatever the world size.
        single.set_epoch(epoch, skip=2 * batch)
        assert list(single) == order[2 * batch:] and len(single) == n - 2 * batch
        for r, sampler in enumerate(ranks):
            sampler.set_epoch(epoch, skip=2 * half)
            assert list(sampler) == per_rank[r][2 * half:] and len(sampler) == n // 2 - 2 * half
            resumed_first = list(sampler)[:half]
            assert set(resumed_first) <= set(order[2 * batch:3 * batch])
        orders[epoch] = order
    assert orders[0] != orders[1]  # a new permutation each epoch
    other_seed = ResumableSampler(data, 1, 0, seed + 1)
    other_seed.set_epoch(0)
    assert list(other_seed) != orders[0]


# ---------------------------------------------------------------------------------------- command-line errors and help
def _run_main(argv, capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("command", ["train", "compare", "eval", "reconstruct", "rate-distortion", None])
def test_cli_help_mentions_every_option(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"] if command else ["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    if command in ("train", "compare"):
        for f in dataclasses.fields(TrainConfig):
            flag = "--" + f.name.replace("_", "-")
            assert flag in text, flag
            if f.type in (bool, "bool"):
                assert "--no-" + flag[2:] in text
        assert "--config" in text and "GLOBAL batch size" in text and "--disc-start" in text
        assert "--fid-images" in text and "--batch-size" in text
        assert ("--gan" in text) == (command == "compare")
    elif command == "eval":
        for flag in ("run", "--eval-images", "--fid-images", "--device"):
            assert flag in text
    elif command == "reconstruct":
        for flag in ("run", "images", "--count", "--out"):
            assert flag in text
    elif command == "rate-distortion":
        for flag in ("--sparsities", "--bins", "--codebooks", "--coeff-quant", "--steps", "(default: 600)"):
            assert flag in text
    else:
        for sub in ("train", "compare", "eval", "reconstruct", "rate-distortion"):
            assert sub in text


@pytest.mark.parametrize(("flags", "expected"), [
    (["--sparsity", "50", "--e-dim", "4"], ["sparsity must be <="]),
    (["--batch-size", "0"], ["batch_size must be >= 1"]),
    (["--eta", "1.5"], ["eta must be in [0, 1]"]),
    (["--fid-images", "1"], ["fid_images"]),
    (["--data", "mnist"], ["--data-root", "train-images-idx3-ubyte", "t10k-images-idx3-ubyte"]),
    (["--data", "cifar10"], ["--data-root", "cifar-10-batches-py"]),
    (["--data", "photos", "--data-root", "/nonexistent"], ["takes no data folder"]),
])
def test_cli_bad_option_values_exit_2(tmp_path, capsys, flags, expected):
    tiny = {k: v for k, v in TINY.items() if not ("--data" in flags and k in ("image_size", "train_length"))}
    argv = ["train", *_flags(**{**tiny, "steps": 1}), "--out", str(tmp_path / "bad"), *flags]
    code, out, err = _run_main(argv, capsys)
    assert code == 2 and out == ""
    assert err.startswith("lasers train: error: ")
    for text in expected:
        assert text in err
    assert not (tmp_path / "bad" / CHECKPOINT).exists()


def test_cli_bad_config_file_exits_2(tmp_path, capsys):
    missing = tmp_path / "missing.json"
    code, _, err = _run_main(["train", "--config", str(missing), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and str(missing) in err
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"steps": 2, "bogus_key": 1}))
    code, _, err = _run_main(["train", "--config", str(unknown), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "bogus_key" in err


def test_cli_rejects_unknown_choices(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model", "dl-vqe", "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_cuda_without_gpu_exits_2(tmp_path, capsys):
    code, _, err = _run_main(["train", *_flags(**{**TINY, "device": "cuda"}), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "CUDA" in err


# --------------------------------------------------------------------------------------------------- resume, atomicity
@pytest.mark.parametrize("model", ["dl-vae", "vq-vae", "dl-gan", "dl-vae-online", "dl-vae-tokens", "dl-vae-levers"])
def test_crash_and_resume_equals_uninterrupted_run(tmp_path, no_pictures, model):
    # 48 crops / batch 8 = 6 batches per epoch: the checkpoint at step 4 is mid-epoch and step 7 starts epoch 1.
    extra = dict(disc_start=2, ndf=8, disc_layers=2) if model == "dl-gan" else {}
    if model == "dl-vae-online":  # the paper's online dictionary update (its statistics must resume too)
        model, extra = "dl-vae", dict(dictionary_update="online")
    if model == "dl-vae-tokens":  # quantised coefficients: the tracked range must resume too
        model, extra = "dl-vae", dict(coeff_bins=8, coeff_quant="mulaw")
    if model == "dl-vae-levers":  # issue 26: initialisation, restarts (every step), per-slot ranges, rotation
        model, extra = "dl-vae", dict(dict_init="kmeans", restart_window=1, coeff_bins=8, coeff_per_slot=True,
                                      gradient="rotation")
    cfg_a = TrainConfig(**{**TINY, "train_length": 48, "steps": 8, "checkpoint_every": 4, "eval_images": 4},
                        model=model, out=str(tmp_path / "a"), **extra)
    cfg_b = dataclasses.replace(cfg_a, out=str(tmp_path / "b"))
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    result_a = train(cfg_a)

    seen = []

    def crash_at_6(step, record):
        seen.append(step)
        assert math.isfinite(record["loss"])
        if step == 6:
            raise _Crash("killed")

    with pytest.raises(_Crash):
        train(cfg_b, callback=crash_at_6)
    assert seen == [1, 2, 3, 4, 5, 6]
    assert torch.load(run_b / CHECKPOINT, weights_only=False)["step"] == 4  # steps 5 and 6 are lost
    assert [r["step"] for r in _records(run_b)] == [2, 4, 6] and not (run_b / "eval.json").exists()
    with open(run_b / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 7, "lo')  # a line cut by the crash

    resumed = []
    result_b = train(cfg_b, callback=lambda step, record: resumed.append(step))
    assert resumed == [5, 6, 7, 8]
    assert json.loads((run_b / "config.json").read_text())["notes"]["resumed_from_step"] == 4

    ckpt_a = torch.load(run_a / CHECKPOINT, weights_only=False)
    ckpt_b = torch.load(run_b / CHECKPOINT, weights_only=False)
    assert ckpt_a["step"] == ckpt_b["step"] == 8
    for key in ("model", "opt", "gan", "opt_d"):
        _assert_same(ckpt_a[key], ckpt_b[key], key)
    if model == "vq-vae":
        assert any("ema" in name or "cluster" in name for name in ckpt_a["model"]), list(ckpt_a["model"])
    if model == "dl-gan":
        assert ckpt_a["gan"] is not None and ckpt_a["opt_d"]["state"]  # the discriminator was trained
    if extra.get("coeff_bins"):
        assert bool(ckpt_a["model"]["bottleneck.coeff_quantizer.fitted"].all())
    if extra.get("restart_window"):
        assert int(ckpt_a["model"]["bottleneck.restarts"]) > 0
        assert _records(run_b, "train")[-1]["restarts"] > 0  # logged
    _assert_same(load_run(run_a)[1].state_dict(), load_run(run_b)[1].state_dict(), "load_run")
    assert result_a == result_b

    train_a, train_b = _records(run_a, "train"), _records(run_b, "train")
    assert [r["step"] for r in train_b] == [2, 4, 6, 8]  # each step logged once, the cut line is gone
    assert [r["epoch"] for r in train_b] == [0, 0, 0, 1]
    for ra, rb in zip(train_a, train_b):
        assert {k: v for k, v in ra.items() if k != "elapsed_s"} == {k: v for k, v in rb.items() if k != "elapsed_s"}
    if model == "dl-gan":
        assert "d_loss" in train_b[-1] and "g_loss" in train_b[-1]
    assert [r["step"] for r in _records(run_b, "eval")] == [8]


def test_resume_restores_rng_state_exactly(tmp_path, no_pictures):
    # Checkpoint at step 4 of a 6-batch epoch (mid-epoch); at an epoch boundary the states agree.
    cfg_a = TrainConfig(**{**TINY, "train_length": 48, "steps": 6, "checkpoint_every": 4, "eval_images": 4},
                        model="vq-vae", out=str(tmp_path / "a"))
    cfg_b = dataclasses.replace(cfg_a, out=str(tmp_path / "b"))
    train(cfg_a)

    def crash_at_5(step, record):
        if step == 5:
            raise _Crash("killed")

    with pytest.raises(_Crash):
        train(cfg_b, callback=crash_at_5)
    train(cfg_b)
    rng_a = torch.load(tmp_path / "a" / CHECKPOINT, weights_only=False)["rng"]
    rng_b = torch.load(tmp_path / "b" / CHECKPOINT, weights_only=False)["rng"]
    _assert_same(rng_a["torch"], rng_b["torch"], "torch RNG")


def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / CHECKPOINT
    save_checkpoint(path, {"step": 3, "w": torch.arange(5.0)})
    save_checkpoint(path, {"step": 4, "w": torch.arange(6.0)})
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT]  # no temporary file left behind
    assert torch.load(path)["step"] == 4

    def dies_midway(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"PK\x03\x04 the first bytes of a zip archive, then the disk is full")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runs_mod.torch, "save", dies_midway)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, {"step": 5, "w": torch.arange(7.0)})
    monkeypatch.undo()
    state = torch.load(path)  # the previous checkpoint, intact
    assert state["step"] == 4 and torch.equal(state["w"], torch.arange(6.0))


def test_failed_checkpoint_write_removes_its_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / CHECKPOINT
    save_checkpoint(path, {"step": 4})

    def dies_midway(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runs_mod.torch, "save", dies_midway)
    with pytest.raises(OSError):
        save_checkpoint(path, {"step": 5})
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT]


# ------------------------------------------------------------------------------------------------------------- compare
def test_compare_writes_table_json_and_pictures(tmp_path, no_pictures, capsys):
    base = tmp_path / "cmp"
    cfg = TrainConfig(**{**TINY, "steps": 2, "log_every": 1, "eval_images": 4}, out=str(base))
    results = compare(cfg)
    assert list(results) == ["vq-vae", "dl-vae"]
    stdout = capsys.readouterr().out
    table = (base / "compare.md").read_text().splitlines()
    assert table[0].startswith("| model | steps | PSNR (dB) |") and len(table) == 4
    for row, (name, r) in zip(table[2:], results.items()):
        assert row.startswith(f"| {name} | 2 | {r['psnr']:.2f} | {r['ssim']:.4f} |") and row in stdout
        assert r.keys() == EVAL_KEYS and r["model"] == name and r["images"] == 4
        cfg_run, _, step = load_run(base / name)
        assert cfg_run.model == name and step == 2 and cfg_run.hidden == 16 and cfg_run.seed == cfg.seed
        assert [rec["step"] for rec in _records(base / name, "train")] == [1, 2]
    assert json.loads((base / "compare.json").read_text()) == results
    for name in ("curves", "reconstructions", "flip"):
        _read_png(base / "pictures" / f"{name}.png")


# ------------------------------------------------------------ the command-line run: train, eval, reconstruct, evaluate
def test_cli_train_end_to_end(cli_run):
    run, proc = cli_run
    assert proc.returncode == 0, proc.stderr
    assert "reconstruction loss" in proc.stderr

    saved = json.loads((run / "config.json").read_text())
    assert TrainConfig.from_dict(saved["config"]) == TrainConfig(**TINY, out=str(run))
    notes = saved["notes"]
    if LPIPS_MISSING:
        assert "L2 only" in notes["reconstruction_loss"]
    assert notes["world_size"] == 1 and notes["local_batch_size"] == 8 and notes["resumed_from_step"] == 0
    assert notes["channels"] == 3 and notes["image_size"] == [16, 16] and notes["device"] == "cpu"

    records = _records(run)
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == [2, 4, 6]
    for r in train_records:
        assert {"loss", "rec_loss", "q_loss", "perplexity", "psnr", "epoch", "elapsed_s"} <= r.keys()
        assert r["epoch"] == 0 and math.isfinite(r["loss"]) and r["loss"] > 0
        assert r["loss"] == pytest.approx(r["rec_loss"] + r["q_loss"], rel=1e-5)
    assert [r["kind"] for r in records] == ["train", "train", "train", "eval"]
    final = records[-1]
    assert final["step"] == 6 and final["images"] == 16

    cfg, model, step = load_run(run)
    assert step == 6 and cfg == TrainConfig(**TINY, out=str(run)) and not model.training
    assert torch.load(run / CHECKPOINT, weights_only=False)["step"] == 6

    result = json.loads((run / "eval.json").read_text())
    assert result.keys() == EVAL_KEYS
    assert result == {"model": "dl-vae", **{k: v for k, v in final.items() if k != "kind"}}
    assert result["images"] == 16 and result["step"] == 6 and result["model"] == "dl-vae"
    assert 0 < result["ssim"] <= 1 and 0 <= result["flip"] <= 1 and math.isfinite(result["psnr"])
    assert 1 <= result["perplexity"] <= result["active_atoms"] + 1e-9 and result["active_atoms"] <= 32
    assert (result["lpips"] is None) == LPIPS_MISSING

    table = (run / "eval.md").read_text().splitlines()
    assert table[0].startswith("| model | steps | PSNR (dB) | SSIM | FLIP |") and table[1].startswith("|---|")
    assert table[2].startswith(f"| dl-vae | 6 | {result['psnr']:.2f} | {result['ssim']:.4f} | {result['flip']:.4f} |")
    assert table[2] in proc.stdout  # the table is also printed

    for name in PICTURES:
        _read_png(run / "pictures" / f"{name}.png")
    assert not [p.name for p in run.rglob("*tmp*")]  # atomic writes leave no temporary file


def test_cli_config_file_then_flags(cli_run, tmp_path, no_pictures, capsys):
    run = _copy_run(cli_run, tmp_path)  # finished (6 of 6 steps): train only re-evaluates, writing config.json
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({**TINY, "out": "not/used", "eval_images": 8, "lr": 1e-3}))
    code, out, _ = _run_main(["train", "--config", str(flat), "--out", str(run), "--eval-images", "4"], capsys)
    assert code == 0 and "| dl-vae | 6 |" in out
    saved = json.loads((run / "config.json").read_text())["config"]
    assert saved["out"] == str(run) and saved["eval_images"] == 4  # flags beat the file
    assert saved["lr"] == 1e-3 and saved["hidden"] == 16 and saved["n_e"] == 32  # the file beats the defaults
    assert saved["beta"] == 0.25 and saved["n_res_blocks"] == 2  # defaults fill the rest
    assert json.loads((run / "eval.json").read_text())["images"] == 4

    # A run's own config.json ({"config": ..., "notes": ...}) works as --config too, out included.
    code, _, _ = _run_main(["train", "--config", str(run / "config.json"), "--eval-images", "2"], capsys)
    assert code == 0
    saved = json.loads((run / "config.json").read_text())["config"]
    assert saved["out"] == str(run) and saved["eval_images"] == 2 and saved["lr"] == 1e-3
    assert json.loads((run / "eval.json").read_text())["images"] == 2


def test_finished_run_is_only_reevaluated(cli_run, tmp_path, no_pictures):
    run = _copy_run(cli_run, tmp_path)
    before = (run / CHECKPOINT).read_bytes()
    old = json.loads((run / "eval.json").read_text())
    calls = []
    result = train(_saved_config(run), callback=lambda step, record: calls.append(step))
    assert calls == []  # no optimiser step
    assert (run / CHECKPOINT).read_bytes() == before  # checkpoint not rewritten
    assert result.keys() == EVAL_KEYS and result["step"] == 6
    for key in ("psnr", "ssim", "flip", "perplexity"):
        assert result[key] == pytest.approx(old[key], rel=1e-9, abs=1e-12)
    assert result["active_atoms"] == old["active_atoms"] and result["images"] == old["images"]
    assert [r["step"] for r in _records(run, "train")] == [2, 4, 6]
    assert json.loads((run / "config.json").read_text())["notes"]["resumed_from_step"] == 6


def test_resume_with_other_architecture_is_refused(cli_run, tmp_path, capsys):
    run = _copy_run(cli_run, tmp_path)
    before = (run / CHECKPOINT).read_bytes()
    with pytest.raises(ValueError, match="n_e"):
        train(dataclasses.replace(_saved_config(run), n_e=64))
    with pytest.raises(ValueError, match="hidden"):
        train(dataclasses.replace(_saved_config(run), hidden=8))
    code, _, err = _run_main(["train", *_flags(**{**TINY, "model": "vq-vae"}), "--out", str(run)], capsys)
    assert code == 2 and "model" in err and "--out" in err
    assert (run / CHECKPOINT).read_bytes() == before


def test_resume_with_other_channel_count_is_refused(cli_run, tmp_path):
    run = _copy_run(cli_run, tmp_path)
    with pytest.raises(ValueError, match="gray|channels"):
        train(dataclasses.replace(_saved_config(run), gray=True))


def test_cli_eval_matches_in_process_evaluate(cli_run, tmp_path, capsys):
    run = _copy_run(cli_run, tmp_path)
    (run / "eval.json").unlink()
    (run / "eval.md").unlink()
    code, out, _ = _run_main(["eval", str(run), "--device", "cpu"], capsys)
    assert code == 0
    written = json.loads((run / "eval.json").read_text())
    cfg, model, step = load_run(run)
    reference = evaluate(model, build_dataset("photos", "test", size=16, seed=cfg.seed), max_images=cfg.eval_images)
    assert written.keys() == EVAL_KEYS and written["step"] == step == 6 and written["images"] == 16
    for key in ("psnr", "ssim", "flip", "perplexity"):
        assert written[key] == pytest.approx(reference[key], abs=1e-6)
    assert written["active_atoms"] == reference["active_atoms"]
    row = f"| dl-vae | 6 | {reference['psnr']:.2f} | {reference['ssim']:.4f} |"
    assert row in out and row in (run / "eval.md").read_text()

    code, out, _ = _run_main(["eval", str(run), "--device", "cpu", "--eval-images", "4"], capsys)
    assert code == 0 and json.loads((run / "eval.json").read_text())["images"] == 4

    code, _, err = _run_main(["eval", str(tmp_path / "nothing"), "--device", "cpu"], capsys)
    assert code == 2 and "no checkpoint" in err


def test_evaluate_matches_skimage_and_numpy(cli_run):
    cfg, model, _ = load_run(cli_run[0])
    test_set = build_dataset("photos", "test", size=16, seed=cfg.seed)
    n, batch = 10, 4  # three batches, the last one partial
    result = evaluate(model, test_set, max_images=n, batch_size=batch)
    psnrs, ssims, indices = [], [], []
    for start in range(0, n, batch):  # same batches as evaluate, so the convolutions see the same inputs
        x = torch.stack([test_set[i] for i in range(start, min(start + batch, n))])
        y, idx = _reconstruct(model, x)
        indices.append(idx.numpy().ravel())
        for a, b in zip(x.double().numpy(), y.double().numpy()):
            psnrs.append(peak_signal_noise_ratio(a, b, data_range=1.0))
            ssims.append(structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                               data_range=1.0, channel_axis=0))
    assert result["images"] == n
    assert result["psnr"] == pytest.approx(np.mean(psnrs), rel=1e-9)
    assert result["ssim"] == pytest.approx(np.mean(ssims), rel=1e-9)
    used = np.concatenate(indices)
    used = used[used >= 0]
    counts = np.bincount(used, minlength=cfg.n_e)
    p = counts[counts > 0] / counts.sum()
    np.testing.assert_array_equal(result["counts"].numpy(), counts)
    assert result["active_atoms"] == int((counts > 0).sum())
    assert result["perplexity"] == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-12)


def test_cli_reconstruct_test_images(cli_run, tmp_path, capsys):
    run = cli_run[0]
    out_png = tmp_path / "rec.png"
    code, out, _ = _run_main(["reconstruct", str(run), "--count", "3", "--out", str(out_png)], capsys)
    assert code == 0
    _read_png(out_png)
    cfg, model, step = load_run(run)
    test_set = build_dataset("photos", "test", size=16, seed=cfg.seed)
    x = torch.stack([test_set[i] for i in range(3)])
    expected = metrics.psnr(x, _reconstruct(model, x)[0]).tolist()
    lines = out.splitlines()
    assert lines[:3] == [f"test image {i}: PSNR {value:.2f} dB" for i, value in enumerate(expected)]
    assert lines[3] == f"wrote {out_png} (dl-vae, step 6)" and len(lines) == 4


def test_cli_reconstruct_image_files(cli_run, tmp_path, capsys, gen):
    run = cli_run[0]
    arrays = [torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy() for h, w in [(20, 24),
                                                                                                        (24, 28)]]
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    for array, path in zip(arrays, paths):
        Image.fromarray(array).save(path)
    out_png = tmp_path / "rec.png"
    code, out, _ = _run_main(["reconstruct", str(run), *map(str, paths), "--out", str(out_png)], capsys)
    assert code == 0
    _read_png(out_png)
    # Common size: min(20, 24) // 4 * 4 = 20 rows, min(24, 28) // 4 * 4 = 24 columns, centre-cropped.
    crops = [arrays[0], arrays[1][2:22, 2:26]]
    x = torch.stack([torch.from_numpy(c.copy()).permute(2, 0, 1).float() / 255 for c in crops])
    _, model, _ = load_run(run)
    expected = metrics.psnr(x, _reconstruct(model, x)[0]).tolist()
    lines = out.splitlines()
    assert lines[:2] == [f"{path}: PSNR {value:.2f} dB" for path, value in zip(paths, expected)]
    assert lines[2] == f"wrote {out_png} (dl-vae, step 6)"


# ------------------------------------------------------------------------- damaged files and wrong paths (issue 11)
@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "not-a-checkpoint"])
def test_unreadable_checkpoint_is_a_clear_error_and_stays_untouched(cli_run, tmp_path, capsys, damage):
    """eval, reconstruct and train on a run whose checkpoint.pt is empty, truncated, garbage or some other pickle:
    exit code 2 and a message naming the file and what to do, and the file is left as it was."""
    run = _copy_run(cli_run, tmp_path)
    ckpt = run / CHECKPOINT
    good = ckpt.read_bytes()
    if damage == "not-a-checkpoint":
        torch.save({"weights": torch.zeros(3)}, ckpt)
    else:
        ckpt.write_bytes({"empty": b"", "truncated": good[: len(good) // 2], "garbage": os.urandom(4096)}[damage])
    before = ckpt.read_bytes()
    for argv in (["eval", str(run)], ["reconstruct", str(run)],
                 ["train", "--config", str(run / "config.json"), "--out", str(run)]):
        code, _, err = _run_main(argv, capsys)
        assert code == 2, argv
        assert str(ckpt) in err and ("not a readable checkpoint" in err or "not a lasers checkpoint" in err), err
        assert "Move it away" in err
    assert ckpt.read_bytes() == before


def test_out_and_image_paths_of_the_wrong_kind_are_clear_errors(cli_run, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    code, _, err = _run_main(["train", *_flags(**{**TINY, "steps": 1}), "--out", str(a_file)], capsys)
    assert code == 2 and "is a file" in err and a_file.read_text() == "not a directory"
    run = cli_run[0]
    not_image = tmp_path / "notes.png"
    not_image.write_text("plain text")
    for path, message in ((tmp_path, "is a directory"), (not_image, "not an image")):
        code, _, err = _run_main(["reconstruct", str(run), str(path)], capsys)
        assert code == 2 and message in err and str(path) in err
    code, _, err = _run_main(["reconstruct", str(run), "--out", str(tmp_path)], capsys)
    assert code == 2 and "is a directory" in err


@pytest.mark.parametrize(("values", "key"), [({"steps": "ten"}, "steps"), ({"lr": "fast"}, "lr"),
                                              ({"amp": 1}, "amp"), ({"batch_size": 2.5}, "batch_size"),
                                              ({"disc_lr": [1]}, "disc_lr")])
def test_config_values_of_the_wrong_type_are_clear_errors(tmp_path, capsys, values, key):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(values))
    code, _, err = _run_main(["train", "--config", str(config), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and f"configuration value {key}=" in err
    assert TrainConfig.from_dict({"lr": 1}).lr == 1.0  # an int is a valid float


@pytest.mark.parametrize("legacy", [False, True])
def test_training_tool_loss_weighting_is_equation_13_by_default(gen, legacy):
    """Equation 13: ||sg[z] - z_hat||^2 + beta ||z - sg[z_hat]||^2. The encoder's gradient through the loss is then
    2 beta (z - z_hat) / n and the dictionary's that of the unweighted first term; --legacy-weighting swaps them."""
    cfg = TrainConfig(**{**TINY, "beta": 0.3}, legacy_weighting=legacy)
    assert TrainConfig().legacy_weighting is False
    bottleneck = build_model(cfg, 3).bottleneck
    assert bottleneck.legacy is legacy
    z = torch.randn(2, 4, 3, 3, generator=gen, dtype=torch.float64).float().requires_grad_()
    _, loss, info = bottleneck(z)
    loss.backward()
    sites = z.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    z_hat = sparse_decode(info.atom_indices, info.coeffs, bottleneck.atoms().detach())
    weight = 1.0 if legacy else 0.3
    expected = (2 * weight * (sites - z_hat) / sites.numel()).reshape(2, 3, 3, 4).permute(0, 3, 1, 2)
    torch.testing.assert_close(z.grad, expected, rtol=1e-5, atol=1e-7)
    by_hand = (0.3 if legacy else 1.0) * ((z_hat - sites) ** 2).mean() + weight * ((sites - z_hat) ** 2).mean()
    torch.testing.assert_close(loss, by_hand)


def test_checkpoints_without_the_weighting_field_trained_with_tamings():
    saved = {"config": {k: v for k, v in TrainConfig().to_dict().items() if k != "legacy_weighting"}}
    assert runs_mod.saved_config(saved).legacy_weighting is True
    assert runs_mod.saved_config({"config": TrainConfig().to_dict()}).legacy_weighting is False


def test_compare_all_four_models(tmp_path, no_pictures, monkeypatch):
    monkeypatch.setattr(compare_mod, "_compare_pictures", lambda *a, **k: None)
    cfg = TrainConfig(**{**TINY, "steps": 1, "log_every": 1, "eval_images": 4, "disc_start": 0, "ndf": 8,
                         "disc_layers": 2}, out=str(tmp_path / "all"))
    results = compare(cfg, models=["vq-vae", "dl-vae", "vq-gan", "dl-gan"])
    assert list(results) == ["vq-vae", "dl-vae", "vq-gan", "dl-gan"]
    assert (tmp_path / "all" / "compare.md").read_text().count("\n") == 2 + 4
    with pytest.raises(ValueError, match="distinct names"):
        compare(cfg, models=["vq-vae", "vq-vae"])
    with pytest.raises(ValueError, match="distinct names"):
        compare(cfg, models=["vq-transformer"])
    with pytest.raises(ValueError, match="not both"):
        compare(cfg, gan=True, models=["vq-gan"])
