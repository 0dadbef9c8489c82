"""The training tool and the stage-2 tools under hostile use (issue 21): no stale caches, no silent relabelling, no raw
tracebacks. The oracle is what a user sees: the exit status and message, files left untouched, records that describe
what the checkpoint holds."""

import json
import os
import shutil

import pytest
import torch

from lasers_ext.training import TrainConfig, evaluate_run, load_run, train
from lasers_ext.training import loop as loop_mod
from lasers_ext.training import runs as runs_mod
from lasers_ext.training.cli import main
from lasers_ext.training.evaluation import save_evaluation
from lasers_ext.training.prior import PriorConfig, _encode, load_prior, sample_images, sample_tokens, train_prior
from lasers_ext.training.runs import read_records

STAGE1 = dict(hidden=16, res_hidden=8, n_e=16, e_dim=4, sparsity=2, image_size=16, train_length=32, batch_size=8,
              eval_images=8, steps=4, log_every=2, checkpoint_every=2, eval_every=0, progress=False, device="cpu")
PRIOR = dict(steps=4, batch_size=4, width=32, layers=1, heads=2, train_images=16, eval_images=8, samples=4,
             log_every=2, checkpoint_every=2, progress=False, device="cpu")
FLAGS = ["--hidden", "16", "--res-hidden", "8", "--n-e", "16", "--e-dim", "4", "--sparsity", "2", "--image-size",
         "16", "--train-length", "32", "--batch-size", "8", "--eval-images", "8", "--steps", "2", "--log-every", "1",
         "--eval-every", "0", "--no-progress", "--device", "cpu"]


@pytest.fixture(autouse=True)
def _no_run_pictures(monkeypatch):
    monkeypatch.setattr(loop_mod, "run_pictures", lambda *a, **k: None)


def _unwritable(tmp_path):
    """A directory this process cannot create files in (root ignores permission bits: then a read-only sysfs)."""
    if os.geteuid() == 0:
        return "/sys/fs"
    ro = tmp_path / "read-only"
    ro.mkdir()
    ro.chmod(0o500)
    return str(ro)


def _dl_run(path, **extra):
    train(TrainConfig(**{**STAGE1, "model": "dl-vae", "coeff_bins": 4, **extra}, out=str(path)))
    return path


def _fails(capsys, argv, *words):
    """Runs ``lasers argv``: it must exit 2 with a one-line error naming ``words`` (no traceback)."""
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and all(w in err for w in words), err
    return err


# ------------------------------------------------------------------------------------------ stage-2 caches
def test_prior_files_follow_the_autoencoder_not_its_step(tmp_path):
    run = _dl_run(tmp_path / "run")
    train_prior(run, PriorConfig(**PRIOR))
    old_tokens = torch.load(run / "prior" / "tokens.pt", weights_only=False)["train"]
    # the autoencoder retrained to the same step with another seed
    (run / "checkpoint.pt").unlink()
    _dl_run(run, seed=1)
    _, model, _ = load_run(run)
    from lasers_ext.training.config import run_dataset

    cfg = load_run(run)[0]
    fresh, _ = _encode(model.eval(), run_dataset(cfg, "train"), 16, torch.device("cpu"), False, "")
    with pytest.raises(ValueError, match="another autoencoder"):
        train_prior(run, PriorConfig(**PRIOR))  # the old prior is not silently reused
    (run / "prior" / "checkpoint.pt").unlink(missing_ok=True)
    train_prior(run, PriorConfig(**PRIOR))
    cached = torch.load(run / "prior" / "tokens.pt", weights_only=False)["train"]
    assert torch.equal(cached.long(), fresh.long()) and not torch.equal(cached, old_tokens)


def test_sample_with_another_autoencoder_in_place_is_a_clear_error(tmp_path, capsys):
    run = _dl_run(tmp_path / "run")
    train_prior(run, PriorConfig(**PRIOR))
    vq = tmp_path / "vq"
    train(TrainConfig(**STAGE1, model="vq-vae", out=str(vq)))
    shutil.copyfile(vq / "checkpoint.pt", run / "checkpoint.pt")
    _fails(capsys, ["sample", run, "--n", "2"], "another autoencoder", "prior")
    with pytest.raises(ValueError, match="another autoencoder"):
        load_prior(run)


def test_sampling_needs_only_the_checkpoints(tmp_path):
    run = _dl_run(tmp_path / "run")
    train_prior(run, PriorConfig(**PRIOR))
    (run / "prior" / "config.json").write_text("{damaged")  # a record, not something sampling reads
    assert sample_images(run, 2, progress=False).shape == (2, 3, 16, 16)


def test_bad_config_files_are_clear_errors(tmp_path, capsys):
    for text in ("[1, 2]", "{bad", '{"config": [1]}', '{"stepz": 3}'):
        (tmp_path / "c.json").write_text(text)
        _fails(capsys, ["train", "--config", tmp_path / "c.json", "--out", tmp_path / "run"], "c")
    _fails(capsys, ["train", "--config", tmp_path / "missing.json", "--out", tmp_path / "run"], "missing.json")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


# ------------------------------------------------------------------------------------------ resume honesty
def test_changed_lr_on_resume_is_honoured_and_recorded(tmp_path):
    run = tmp_path / "run"
    train(TrainConfig(**STAGE1, model="dl-vae", out=str(run)))
    train(TrainConfig(**{**STAGE1, "steps": 6, "lr": 1e-3}, model="dl-vae", out=str(run)))
    saved = torch.load(run / "checkpoint.pt", weights_only=False)
    assert [g["lr"] for g in saved["opt"]["param_groups"]] == [1e-3]
    notes = json.loads((run / "config.json").read_text())
    assert notes["config"]["lr"] == 1e-3
    assert notes["notes"]["resumes"] == [{"step": 4, "changed": {"steps": [4, 6], "lr": [1e-4, 1e-3]}}]


def test_changed_prior_lr_on_resume_is_honoured(tmp_path):
    run = _dl_run(tmp_path / "run")
    train_prior(run, PriorConfig(**PRIOR))
    train_prior(run, PriorConfig(**{**PRIOR, "steps": 6, "lr": 1e-3}))
    saved = torch.load(run / "prior" / "checkpoint.pt", weights_only=False)
    assert [g["lr"] for g in saved["opt"]["param_groups"]] == [1e-3]
    assert json.loads((run / "prior" / "config.json").read_text())["prior"]["lr"] == 1e-3


@pytest.mark.parametrize("change", [{"task": "inpainting"}, {"seed": 3}, {"data": "fashion-mnist"}, {"beta": 0.5}])
def test_a_run_refuses_options_that_change_what_was_trained(tmp_path, change):
    run = tmp_path / "run"
    train(TrainConfig(**STAGE1, model="dl-vae", out=str(run)))
    before = {f: (run / f).read_bytes() for f in ("config.json", "eval.json", "checkpoint.pt", "metrics.jsonl")}
    name = next(iter(change))
    with pytest.raises(ValueError, match=name):
        train(TrainConfig(**{**STAGE1, **change}, model="dl-vae", out=str(run)))
    assert {f: (run / f).read_bytes() for f in before} == before


def test_rerunning_a_finished_run_keeps_one_eval_record_per_step(tmp_path):
    run = tmp_path / "run"
    for _ in range(3):
        train(TrainConfig(**STAGE1, model="dl-vae", out=str(run)))
    evals = [r for r in read_records(run / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [4]


# ------------------------------------------------------------------------------------------ prior divergence, sampling
def test_prior_options_reject_non_finite_values():
    for bad in ({"lr": float("inf")}, {"lr": float("nan")}, {"temperature": float("inf")}, {"temperature": -1.0}):
        with pytest.raises(ValueError):
            PriorConfig(**bad).validate()


def test_a_diverging_prior_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    run = _dl_run(tmp_path / "run")
    with pytest.raises(ValueError, match="not finite"):
        train_prior(run, PriorConfig(**{**PRIOR, "steps": 40, "lr": 1e4, "checkpoint_every": 1}))
    saved = torch.load(run / "prior" / "checkpoint.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in saved["model"].values())


def test_sampling_temperatures(tmp_path, capsys):
    run = _dl_run(tmp_path / "run")
    train_prior(run, PriorConfig(**PRIOR))
    _, prior, grammar, _ = load_prior(run)
    for bad in (-1.0, 0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            sample_tokens(prior, grammar, 2, temperature=bad)
        with pytest.raises(ValueError, match="temperature"):
            sample_images(run, 2, temperature=bad)
    # a tiny temperature is greedy decoding, not NaN
    seqs = sample_tokens(prior, grammar, 3, temperature=1e-45)
    grammar.check(seqs)
    assert (seqs == seqs[0]).all()
    assert main(["sample", str(run), "--n", "2", "--temperature", "1e-45", "--out", str(tmp_path / "s.png")]) == 0
    _fails(capsys, ["sample", run, "--temperature", "-1"], "temperature")


# ------------------------------------------------------------------------------------------ output paths
GRIDS = {"rate-distortion": ["rate-distortion", "--sparsities", "1", "--bins", "4", "--codebooks", "8"],
         "sweep": ["sweep", "--sizes", "8", "--sparsities", "1", "--size-sparsity", "1", "--sparsity-size", "8"]}


@pytest.mark.parametrize("command", [GRIDS["rate-distortion"], GRIDS["sweep"], ["compare"], ["compare", "--stage2"]])
def test_out_naming_a_file_is_a_clear_error(tmp_path, capsys, command):
    target = tmp_path / "a-file"
    target.write_text("keep me")
    _fails(capsys, [*command, "--out", target, *FLAGS], str(target))
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("command", ["train", "rate-distortion", "sweep"])
def test_unwritable_out_is_a_clear_error_before_training(tmp_path, capsys, monkeypatch, command):
    started = []
    monkeypatch.setattr(loop_mod, "_train", lambda *a, **k: started.append(1))
    _fails(capsys, [*GRIDS.get(command, [command]), "--out", _unwritable(tmp_path) + "/run", *FLAGS], "cannot write")
    assert not started


def test_unwritable_run_is_a_clear_error_for_eval_prior_and_sample(tmp_path, capsys, monkeypatch):
    run = _dl_run(tmp_path / "run")
    train_prior(run, PriorConfig(**PRIOR))
    real_mkdir = runs_mod.Path.mkdir

    def read_only(path, *a, **k):  # the run directory as if it were on a read-only file system
        if str(path).startswith(str(run)):
            raise PermissionError(13, "Permission denied", str(path))
        return real_mkdir(path, *a, **k)

    monkeypatch.setattr(runs_mod.Path, "mkdir", read_only)
    monkeypatch.setattr(runs_mod, "_probe_write", lambda d: (_ for _ in ()).throw(PermissionError(13, "denied")))
    sampled = []
    monkeypatch.setattr("lasers_ext.training.prior._sample_decoded", lambda *a, **k: sampled.append(1))
    _fails(capsys, ["eval", run], "cannot write")
    _fails(capsys, ["prior", "train", run, "--steps", "8"], "cannot write")
    _fails(capsys, ["sample", run, "--n", "2"], "cannot write")
    assert not sampled


def test_sample_out_is_checked_before_sampling(tmp_path, capsys, monkeypatch):
    run = _dl_run(tmp_path / "run")
    train_prior(run, PriorConfig(**PRIOR))
    sampled = []
    monkeypatch.setattr("lasers_ext.training.prior._sample_decoded", lambda *a, **k: sampled.append(1))
    _fails(capsys, ["sample", run, "--out", tmp_path / "samples"], "extension")
    _fails(capsys, ["sample", run, "--out", tmp_path], "directory")
    assert not sampled


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_sample_on_cuda_without_a_gpu_says_so(tmp_path, capsys):
    run = _dl_run(tmp_path / "run")
    train_prior(run, PriorConfig(**PRIOR))
    err = _fails(capsys, ["sample", run, "--device", "cuda"], "CUDA")
    assert "damaged" not in err


# ------------------------------------------------------------------------------------------ eval and reconstruct
def test_eval_with_negative_images_leaves_eval_json_alone(tmp_path, capsys):
    run = _dl_run(tmp_path / "run")
    before = (run / "eval.json").read_bytes()
    _fails(capsys, ["eval", run, "--eval-images", "-1"], "eval_images")
    _fails(capsys, ["eval", run, "--fid-images", "-3"], "fid_images")
    assert (run / "eval.json").read_bytes() == before


def test_reconstruct_count_must_be_positive(tmp_path, capsys):
    run = _dl_run(tmp_path / "run")
    _fails(capsys, ["reconstruct", run, "--count", "0"], "count")


def test_reconstruct_degrades_the_input_of_a_task_run(tmp_path, capsys, monkeypatch):
    from lasers_ext.training import metrics, plots
    from lasers_ext.training.config import run_dataset
    from lasers_ext.training.evaluation import outputs
    from lasers_ext.training.tasks import inpainting_box

    run = tmp_path / "run"
    train(TrainConfig(**STAGE1, model="dl-vae", task="inpainting", out=str(run)))
    grids = []
    monkeypatch.setattr(plots, "save_reconstruction_grid", lambda x, rows, path, **k: grids.append(rows))
    assert main(["reconstruct", str(run), "--count", "4", "--out", str(tmp_path / "r.png")]) == 0
    printed = [float(line.split("PSNR ")[1].split(" dB")[0]) for line in capsys.readouterr().out.splitlines()
               if "PSNR" in line]
    cfg, model, _ = load_run(run)
    test_set = run_dataset(cfg, "test")
    x = torch.stack([test_set[i] for i in range(4)])
    inputs, y, _, _ = outputs(model, x, "inpainting")
    assert printed == pytest.approx(metrics.psnr(x, y).tolist(), abs=0.006)
    top, left, bh, bw = inpainting_box(16, 16)
    assert list(grids[0]) == ["input", "dl-vae"] and torch.equal(grids[0]["input"], inputs)
    assert (grids[0]["input"][..., top:top + bh, left:left + bw] == 0).all()


# ------------------------------------------------------------------------------------------ rough edges
def test_too_small_images_are_refused_before_training():
    with pytest.raises(ValueError, match="image_size"):
        TrainConfig(**{**STAGE1, "image_size": 8}).validate()


def test_tables_are_written_atomically(tmp_path, monkeypatch):
    result = {"psnr": 30.0, "ssim": 0.5, "flip": 0.1, "lpips": None, "perplexity": 3.0, "active_atoms": 4,
              "latent_error": 0.01}
    save_evaluation(tmp_path, "dl-vae", 4, result)
    before = (tmp_path / "eval.md").read_text()
    real_replace = runs_mod.os.replace

    def crash_on_the_table(src, dst):  # the disk fills up while the table is written
        if str(dst).endswith("eval.md"):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(runs_mod.os, "replace", crash_on_the_table)
    with pytest.raises(OSError):
        save_evaluation(tmp_path, "dl-vae", 8, {**result, "psnr": 1.0})
    assert (tmp_path / "eval.md").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json", "eval.md"]


def test_evaluate_run_rejects_negative_counts(tmp_path):
    run = _dl_run(tmp_path / "run")
    with pytest.raises(ValueError):
        evaluate_run(run, max_images=-1, device="cpu")
