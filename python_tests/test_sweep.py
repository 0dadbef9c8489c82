"""lasers_ext.training.sweep: grids of short trainings and the rate-distortion comparison (``lasers rate-distortion``).

Oracles: the bits-per-site formulas (log2 C(K, S) + S log2 B for DL, log2 K for VQ), each cell's own eval.json and
checkpoint, a hand-made equal-rate example, and the files the command promises, read back."""

import json
import math
from contextlib import nullcontext

import pytest
from PIL import Image

from lasers_ext.training import TrainConfig, load_run, sweep, train
from lasers_ext.training import loop as loop_mod
from lasers_ext.training.cli import main

TINY = dict(hidden=16, res_hidden=8, n_e=32, e_dim=4, image_size=16, train_length=16, batch_size=8, eval_images=4,
            steps=2, log_every=1, checkpoint_every=2, eval_every=0, progress=False, device="cpu")


@pytest.fixture
def no_pictures(monkeypatch):
    monkeypatch.setattr(loop_mod, "run_pictures", lambda *args, **kwargs: None)


def test_rate_distortion_grid_end_to_end_and_resume(tmp_path, no_pictures, capsys, monkeypatch):
    base = TrainConfig(**TINY, out=str(tmp_path / "rd"))
    grid = dict(families=["dl", "vq"], sparsities=[1, 2], bins=[4, 8], codebooks=[8, 64])
    result = sweep.rate_distortion(base, **grid)
    rows = {r["cell"]: r for r in result["rows"]}
    assert set(rows) == {"dl-k32-s1-b4", "dl-k32-s1-b8", "dl-k32-s2-b4", "dl-k32-s2-b8", "vq-k8", "vq-k64"}
    for name, r in rows.items():
        cfg, model, step = load_run(tmp_path / "rd" / name / "seed0")
        evaluation = json.loads((tmp_path / "rd" / name / "seed0" / "eval.json").read_text())
        assert step == 2 and r["psnr"] == evaluation["psnr"] and r["perplexity"] == evaluation["perplexity"]
        assert r["psnr_std"] == 0 and r["seeds"] == 1 and r["seconds_per_step"] > 0
        if r["family"] == "dl":
            assert cfg.model == "dl-vae" and r["config"] == f"K=32 S={cfg.sparsity} B={cfg.coeff_bins}"
            # the support as a set: log2 C(K, S) + S log2 B
            assert r["bits_per_site"] == pytest.approx(math.log2(math.comb(32, cfg.sparsity))
                                                       + cfg.sparsity * math.log2(cfg.coeff_bins))
            assert model.bottleneck.bits_per_site == pytest.approx(r["bits_per_site"])
        else:
            assert cfg.model == "vq-vae" and r["config"] == f"K={cfg.n_e}" and cfg.coeff_bins is None
            assert r["bits_per_site"] == pytest.approx(math.log2(cfg.n_e))
    table = (tmp_path / "rd" / "rate_distortion.md").read_text()
    assert "| DL (Batch-OMP) | K=32 S=2 B=8 | 14.95 |" in table
    assert "| VQ (EMA, the paper's baseline) | K=64 | 6.00 |" in table
    assert table.split("\n\n")[1] in capsys.readouterr().out
    assert json.loads((tmp_path / "rd" / "rate_distortion.json").read_text())["rows"] == json.loads(
        json.dumps(result["rows"]))
    with Image.open(tmp_path / "rd" / "pictures" / "rate_distortion.png") as im:
        assert im.format == "PNG" and im.width > 100

    def no_training(cfg, **kwargs):
        raise AssertionError(f"{cfg.out} was finished and must not train again")

    monkeypatch.setattr(sweep, "train", no_training)
    again = sweep.rate_distortion(base, **grid)
    assert again == result
    # a longer budget resumes the finished cells (here: one cell) from their checkpoints
    resumed = []
    monkeypatch.setattr(sweep, "train", lambda cfg, **kw: resumed.append(cfg) or train(cfg))
    longer = sweep.rate_distortion(TrainConfig(**{**TINY, "steps": 3}, out=str(tmp_path / "rd")), families=["dl", "vq"],
                                   sparsities=[1], bins=[4], codebooks=[8])
    assert [c.out for c in resumed] == [str(tmp_path / "rd" / n / "seed0") for n in ("dl-k32-s1-b4", "vq-k8")]
    assert {r["step"] for r in longer["rows"]} == {3}


def test_rate_matched_by_hand():
    rows = [{"cell": "dl-a", "family": "dl", "bits_per_site": 12.0, "psnr": 20.0},
            {"cell": "dl-b", "family": "dl", "bits_per_site": 24.0, "psnr": 19.0},
            {"cell": "vq-a", "family": "vq", "bits_per_site": 6.0, "psnr": 15.0},
            {"cell": "vq-b", "family": "vq", "bits_per_site": 12.0, "psnr": 21.0},
            {"cell": "fsq-a", "family": "fsq", "bits_per_site": 23.9, "psnr": 22.0}]
    matched = sweep.rate_matched(rows, budgets=[6, 12, 24])
    # 6 bits: VQ alone; 12: DL 20 vs VQ 21; 24: DL's best within 24 bits is still dl-a (the envelope), FSQ wins
    summary = [(m["budget"], {f: b["cell"] for f, b in m["best"].items()}, m["winner"]) for m in matched]
    assert summary == [(6, {"vq": "vq-a"}, "vq"), (12, {"dl": "dl-a", "vq": "vq-b"}, "vq"),
                       (24, {"dl": "dl-a", "vq": "vq-b", "fsq": "fsq-a"}, "fsq")]
    assert matched[2]["best"]["dl"]["psnr"] == 20.0 and matched[1]["best"]["vq"]["bits_per_site"] == 12.0


@pytest.mark.parametrize(("flags", "expected"), [
    (["--sparsities", "1,x"], "comma-separated integers"),
    (["--sparsities", "0"], "sparsities must be a non-empty list"),
    (["--bins", "1"], "bins must be a non-empty list of ints >= 2"),
    (["--codebooks", ""], "codebooks must be a non-empty list"),
    (["--families", "dl,pq"], "families must be a non-empty list of dl, vq, vqp, rvq, fsq, lfq"),
    (["--seeds", "-1"], "seeds must be a non-empty list of ints >= 0"),
    (["--budgets", "0"], "budgets must be a non-empty list of positive bits per site"),
    (["--budgets", "1.5"], "no cell of the grid lies within 2.5 bits below a budget of [1.5]"),
    (["--budgets", "x"], "comma-separated numbers"),
    (["--sparsities", "9"], "sparsities must be <="),
])
def test_cli_rate_distortion_bad_grids_exit_2(tmp_path, capsys, flags, expected):
    argv = ["rate-distortion", "--out", str(tmp_path / "rd"), "--n-e", "8", "--e-dim", "4", "--sparsity", "1", *flags]
    # argparse's own type errors exit
    with pytest.raises(SystemExit) if "comma-separated" in expected else nullcontext():
        code = main(argv)
        assert code == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "rd").exists()



def test_ablation_sweep_end_to_end_and_skips_finished_cells(tmp_path, no_pictures, monkeypatch):
    base = TrainConfig(**TINY, out=str(tmp_path / "ab"))
    result = sweep.ablation(base, sizes=[8, 16], size_sparsity=2, sparsities=[1, 2, 3], sparsity_size=16)
    cells = [r["cell"] for r in result["rows"]]
    # (K, S=2) for K in sizes and (K=16, S) for S in sparsities, the shared cell once; VQ at every K
    assert cells == ["dl-k8-s2", "dl-k16-s1", "dl-k16-s2", "dl-k16-s3", "vq-k8", "vq-k16"]
    for r in result["rows"]:
        cfg, _, step = load_run(tmp_path / "ab" / r["cell"])
        assert (cfg.n_e, step) == (r["K"], 2) and (cfg.sparsity == r["S"] or r["bottleneck"] == "VQ")
        assert r["psnr"] == json.loads((tmp_path / "ab" / r["cell"] / "eval.json").read_text())["psnr"]
    assert (tmp_path / "ab" / "sweep.md").read_text().count("\n") == 2 + 6
    for name in ("sweep_K.png", "sweep_S.png"):
        with Image.open(tmp_path / "ab" / "pictures" / name) as im:
            assert im.format == "PNG"
    monkeypatch.setattr(sweep, "train", lambda cfg, **kw: pytest.fail(f"{cfg.out} retrained"))
    assert sweep.ablation(base, sizes=[8, 16], size_sparsity=2, sparsities=[1, 2, 3], sparsity_size=16) == result


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"sizes": []}, "sizes must be a non-empty list"),
    ({"sizes": [8, 0]}, "sizes must be a non-empty list"),
    ({"sparsities": [2, 5], "sparsity_size": 16}, "sparsities must be <="),
    ({"sizes": [2, 16], "size_sparsity": 3}, "size_sparsity 3 exceeds"),
])
def test_ablation_bad_grids_are_clear_errors(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sweep.ablation(TrainConfig(**TINY, out=str(tmp_path / "ab")), **kwargs)
    assert not (tmp_path / "ab").exists()
