"""Downstream tasks (supplementary 12) and latent analyses (section 5.1): exact degradations against PIL and index
arithmetic, the training tool end to end on each task, the latent reconstruction error and top singular component
against hand computations."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lasers_ext.training import TrainConfig, compare, evaluate, load_run, plots, train
from lasers_ext.training import evaluation as evaluate_mod
from lasers_ext.training import loop as loop_mod
from lasers_ext.training.cli import main
from lasers_ext.training.config import run_dataset
from lasers_ext.training.evaluation import to_image, to_model
from lasers_ext.training.tasks import degrade, inpainting_box

TINY = dict(hidden=16, res_hidden=8, n_e=32, e_dim=4, sparsity=2, image_size=16, train_length=16, batch_size=8,
            eval_images=8, steps=2, log_every=1, checkpoint_every=2, eval_every=0, progress=False, device="cpu")


@pytest.mark.parametrize("size", [(32, 32), (16, 24)])
def test_inpainting_mask_position_and_size(gen, size):
    h, w = size
    x = torch.rand(2, 3, h, w, generator=gen) * 0.9 + 0.1  # no zeros of its own
    out = degrade(x, "inpainting")
    top, left, bh, bw = inpainting_box(h, w)
    assert (bh, bw) == (round(h / 4), round(w / 4)) and (top, left) == ((h - bh) // 2, (w - bw) // 2)
    zero = out == 0
    assert zero[..., top:top + bh, left:left + bw].all() and zero.sum() == 2 * 3 * bh * bw
    keep = torch.ones(h, w, dtype=torch.bool)
    keep[top:top + bh, left:left + bw] = False
    assert torch.equal(out[..., keep], x[..., keep])
    assert inpainting_box(32, 32) == (12, 12, 8, 8)


def test_super_resolution_is_pil_bicubic_down_and_up(gen):
    x = torch.rand(1, 3, 32, 32, generator=gen)
    out = degrade(x, "super-resolution")
    for c in range(3):
        im = Image.fromarray(x[0, c].numpy(), mode="F")
        low = im.resize((8, 8), Image.BICUBIC)
        up = np.clip(np.asarray(low.resize((32, 32), Image.BICUBIC)), 0, 1)
        np.testing.assert_allclose(out[0, c].numpy(), up, atol=2e-5)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    with pytest.raises(ValueError, match="multiples of 4"):
        degrade(torch.rand(1, 3, 30, 32), "super-resolution")
    with pytest.raises(ValueError, match="task must be one of"):
        degrade(x, "denoising")
    assert degrade(x, "reconstruction") is x


@pytest.mark.parametrize("task", ["super-resolution", "inpainting"])
def test_task_training_and_evaluation_end_to_end(tmp_path, monkeypatch, task):
    seen = []
    real = degrade
    for module in (loop_mod, evaluate_mod):  # the training batches and the evaluation batches
        monkeypatch.setattr(module, "degrade", lambda x, t: seen.append((t, tuple(x.shape))) or real(x, t))
    cfg = TrainConfig(**TINY, task=task, out=str(tmp_path / task))
    result = train(cfg)
    # every training batch and every evaluation batch went through the task's degradation
    assert seen.count((task, (8, 3, 16, 16))) >= cfg.steps + 1 and {t for t, _ in seen} == {task}
    cfg_saved, model, _ = load_run(tmp_path / task)
    assert cfg_saved.task == task
    # evaluate's PSNR is the output for the degraded input against the original
    test_set = run_dataset(cfg, "test")
    x = torch.stack([test_set[i] for i in range(8)])
    with torch.no_grad():
        y = to_image(model(to_model(degrade(x, task)))[0])
    from lasers_ext.training import metrics

    assert result["psnr"] == pytest.approx(metrics.psnr(x, y).clamp(max=100).mean().item(), rel=1e-9)
    for name in ("reconstructions", "latent_top_component"):
        with Image.open(tmp_path / task / "pictures" / f"{name}.png") as im:
            assert im.format == "PNG"


def test_latent_error_is_the_mean_squared_quantisation_error(tmp_path):
    train(TrainConfig(**TINY, out=str(tmp_path / "run")))
    cfg, model, _ = load_run(tmp_path / "run")
    test_set = run_dataset(cfg, "test")
    x = torch.stack([test_set[i] for i in range(8)])
    with torch.no_grad():
        z = model.encoder(to_model(x))
        z_q = model.bottleneck(z)[0]
    expected = ((z - z_q) ** 2).mean().item()
    assert evaluate(model, test_set, max_images=8)["latent_error"] == pytest.approx(expected, rel=1e-5)


def test_latent_top_component_by_hand(gen):
    z = torch.randn(3, 4, 5, 6, generator=gen, dtype=torch.float64)
    maps = plots.latent_top_component(z)
    for b in range(3):
        u, s, vh = np.linalg.svd(z[b].reshape(4, 30).numpy(), full_matrices=False)
        top = s[0] * vh[0]
        top = top * np.sign(top[np.abs(top).argmax()])
        np.testing.assert_allclose(maps[b, 0].numpy().ravel(), top, rtol=1e-5, atol=1e-6)
    rank_one = torch.einsum("c,hw->chw", torch.tensor([1.0, 2.0]), torch.arange(6.0).reshape(2, 3))[None]
    expected = torch.arange(6.0).reshape(2, 3) * 5 ** 0.5  # s1 v1 = ||u|| map for a rank-one latent
    torch.testing.assert_close(plots.latent_top_component(rank_one)[0, 0], expected)


def test_compare_on_a_task_shows_the_inputs(tmp_path, monkeypatch):
    monkeypatch.setattr(loop_mod, "run_pictures", lambda *a, **k: None)
    saved = {}
    monkeypatch.setattr(plots, "save_reconstruction_grid",
                        lambda x, recs, path, **k: saved.update(recs=recs))
    compare(TrainConfig(**TINY, task="inpainting", out=str(tmp_path / "cmp")))
    assert list(saved["recs"]) == ["input", "vq-vae", "dl-vae"]
    assert (saved["recs"]["input"] == 0).any()
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "latent error" in table.splitlines()[0]
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["dl-vae"]["latent_error"] >= 0


def test_unknown_task_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--task", "denoising", "--out", str(tmp_path / "x")])
    assert "invalid choice: 'denoising'" in capsys.readouterr().err


def test_recipes_are_valid_configs_of_the_paper_settings():
    from pathlib import Path

    recipes = Path(__file__).resolve().parents[1] / "docs" / "recipes"
    files = sorted(recipes.glob("*.json"))
    assert [f.name for f in files] == ["cifar10-ablation.json", "cifar10-gan.json", "cifar10-vae.json",
                                      "ffhq-gan.json", "flowers-vae.json"]
    for f in files:
        cfg = TrainConfig.from_dict(json.loads(f.read_text())).validate()
        assert (cfg.n_e, cfg.e_dim, cfg.beta, cfg.lr) == (512, 16, 0.25, 1e-4), f.name
    cifar = TrainConfig.from_dict(json.loads((recipes / "cifar10-gan.json").read_text()))
    assert cifar.disc_start == 200 * (50000 // 256) and cifar.steps == 220 * (50000 // 256)
    ffhq = TrainConfig.from_dict(json.loads((recipes / "ffhq-gan.json").read_text()))
    assert ffhq.disc_start == 20 * (63000 // 8) and ffhq.steps == 25 * (63000 // 8) and ffhq.image_size == 512
