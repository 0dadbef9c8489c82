"""lasers_ext.training.prior:
the stage-2 transformer over DL tokens and VQ indices (one code path), sampling, resume, CLI.

Oracles: the token grammar (every sampled sequence decodes through TokenCodec.decode / the VQ range), causality
checked by perturbing later tokens, NLL recomputed position by position from prefixes, bit-exact resume against an
uninterrupted run, and the files the commands promise."""

import json
import math
import shutil

import pytest
import torch
from PIL import Image

from lasers_ext.tokens import TokenCodec, TokenGrammar
from lasers_ext.training import TrainConfig, load_run, train
from lasers_ext.training import comparison as compare_mod
from lasers_ext.training import loop as loop_mod
from lasers_ext.training import prior as prior_mod
from lasers_ext.training.cli import main
from lasers_ext.training.prior import PriorConfig, TokenPrior, load_prior, sample_tokens, sequence_nll, train_prior

STAGE1 = dict(hidden=16, res_hidden=8, n_e=16, e_dim=4, sparsity=2, image_size=16, train_length=32, batch_size=8,
              eval_images=8, steps=4, log_every=2, checkpoint_every=4, eval_every=0, progress=False, device="cpu")
PRIOR = dict(steps=6, batch_size=4, width=32, layers=1, heads=2, train_images=16, eval_images=8, samples=4,
             log_every=2, checkpoint_every=2, progress=False, device="cpu")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny trained autoencoders: DL-VAE with coefficient tokens, VQ-VAE, DL-VAE without tokens."""
    base = tmp_path_factory.mktemp("stage1")
    mp = pytest.MonkeyPatch()
    mp.setattr(loop_mod, "run_pictures", lambda *a, **k: None)
    out = {}
    for name, extra in {"dl": dict(model="dl-vae", coeff_bins=4), "vq": dict(model="vq-vae"),
                        "plain": dict(model="dl-vae")}.items():
        train(TrainConfig(**STAGE1, **extra, out=str(base / name)))
        out[name] = base / name
    mp.undo()
    return out


def test_prior_is_causal_and_nll_matches_prefix_by_prefix(gen):
    torch.manual_seed(0)
    prior = TokenPrior(11, 8, width=16, layers=2, heads=2).eval()
    grammar = TokenGrammar(11, 8)  # VQ-style: no mask
    tokens = torch.randint(0, 11, (3, 8), generator=gen)
    logits = prior(tokens)
    changed = tokens.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 11
    assert torch.allclose(prior(changed)[:, :6], logits[:, :6], atol=1e-6)  # position i sees tokens < i only
    assert not torch.allclose(prior(changed)[:, 6:], logits[:, 6:])
    by_prefix = torch.zeros(3, dtype=torch.float64)
    for i in range(8):
        step_logits = prior(torch.cat([tokens[:, :i], tokens.new_zeros(3, 1)], 1))[:, -1]
        by_prefix -= step_logits.log_softmax(-1).gather(1, tokens[:, i:i + 1]).squeeze(1).double()
    torch.testing.assert_close(sequence_nll(prior, grammar, tokens).double(), by_prefix, rtol=1e-5, atol=1e-5)


def test_grammar_masks_by_position_and_pads():
    codec = TokenCodec(5, 3, 2)  # atoms 0-4, bins 5-7, pad 8; 4 tokens per site
    grammar = TokenGrammar(codec.vocab_size, 4, codec)
    prev = torch.tensor([[-1, 2, 5, 8, 8, 0, 8, 8]])
    allowed = grammar.allowed(prev, torch.arange(8))[0]
    atom_or_pad = [True] * 5 + [False] * 3 + [True]
    bins = [False] * 5 + [True] * 3 + [False]
    pad = [False] * 8 + [True]
    expected = [atom_or_pad, bins, atom_or_pad, pad,  # site 1: used slot, then a pad slot
                atom_or_pad, bins, pad, pad]          # site 2 starts afresh after site 1's pads; pad after pad
    # position 6 follows token 8 (pad) at an even position inside the site: only pads
    assert allowed.tolist() == [[bool(v) for v in row] for row in expected]


@pytest.mark.parametrize("kind", ["dl", "vq"])
def test_samples_are_valid_sequences(runs, kind):
    torch.manual_seed(1)
    _, model, _ = load_run(runs[kind])
    grammar = TokenGrammar.of(model.bottleneck)
    t = 16 * grammar.tokens_per_site  # 4 x 4 latent sites
    untrained = TokenPrior(grammar.vocab_size, t, width=16, layers=1, heads=2)  # near-uniform: pads are frequent
    seqs = sample_tokens(untrained, grammar, 32, generator=torch.Generator().manual_seed(0))
    assert seqs.shape == (32, t)
    grammar.check(seqs)  # ids in range, atoms/bins in their positions, pads only after a site's last used slot
    if kind == "dl":
        sites = seqs.reshape(32, 16, -1)
        pad = grammar.codec.pad_id
        assert (sites == pad).any() and (sites[..., 0::2] < 16).any()  # both occur, so the check had work to do
    images = prior_mod.decode_tokens(model, seqs, (4, 4, 4))
    assert images.shape == (32, 3, 16, 16) and torch.isfinite(images).all()


def test_vq_and_dl_priors_train_with_one_code_path(runs):
    results = {kind: train_prior(runs[kind], PriorConfig(**PRIOR)) for kind in ("dl", "vq")}
    assert results["dl"].keys() == results["vq"].keys()
    assert results["dl"]["tokens_per_image"] == 16 * 4 and results["vq"]["tokens_per_image"] == 16
    assert results["dl"]["bits_per_image"] == pytest.approx(16 * (math.log2(16 * 15 / 2) + 2 * 2))  # C(K, S) B^S
    assert results["vq"]["bits_per_image"] == pytest.approx(16 * 4)
    for kind, r in results.items():
        assert r["nll_bits_per_dim"] > 0 and math.isfinite(r["nll_bits_per_dim"]) and r["test_images"] == 8
        with Image.open(runs[kind] / "prior" / "samples.png") as im:
            assert im.format == "PNG"
        assert json.loads((runs[kind] / "prior" / "eval.json").read_text()) == r


def test_loss_falls_on_a_tiny_set(runs, tmp_path):
    cfg = PriorConfig(**{**PRIOR, "steps": 80, "train_images": 4, "batch_size": 4, "lr": 3e-3, "log_every": 10,
                         "checkpoint_every": 80})
    run = tmp_path / "dl"
    shutil.copytree(runs["dl"], run, ignore=shutil.ignore_patterns("prior"))
    train_prior(run, cfg)
    records = [json.loads(line) for line in (run / "prior" / "metrics.jsonl").read_text().splitlines()]
    bpd = [r["bits_per_dim"] for r in records if r["kind"] == "train"]
    assert bpd[-1] < 0.5 * bpd[0]  # four sequences are memorised


def test_resume_is_exact(runs, tmp_path):
    for name in ("a", "b"):
        shutil.copytree(runs["dl"], tmp_path / name, ignore=shutil.ignore_patterns("prior"))
    train_prior(tmp_path / "a", PriorConfig(**{**PRIOR, "steps": 8}))
    train_prior(tmp_path / "b", PriorConfig(**{**PRIOR, "steps": 4}))  # "crashes" after its step-4 checkpoint
    with open(tmp_path / "b" / "prior" / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 5, "ba')  # a line cut by the crash
    train_prior(tmp_path / "b", PriorConfig(**{**PRIOR, "steps": 8}))
    a = torch.load(tmp_path / "a" / "prior" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "prior" / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 8
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    ra = [r for r in map(json.loads, (tmp_path / "a" / "prior" / "metrics.jsonl").read_text().splitlines())
          if r["kind"] == "train"]
    rb = [r for r in map(json.loads, (tmp_path / "b" / "prior" / "metrics.jsonl").read_text().splitlines())
          if r["kind"] == "train"]
    assert [r["step"] for r in rb] == [2, 4, 6, 8]
    assert [r["bits_per_dim"] for r in ra] == [r["bits_per_dim"] for r in rb]
    with pytest.raises(ValueError, match="width"):
        train_prior(tmp_path / "b", PriorConfig(**{**PRIOR, "steps": 9, "width": 64}))


def test_bad_inputs_are_clear_errors(runs, tmp_path):
    with pytest.raises(FileNotFoundError, match="no run directory"):
        train_prior(tmp_path / "missing", PriorConfig(**PRIOR))
    with pytest.raises(ValueError, match="coeff_bins"):
        train_prior(runs["plain"], PriorConfig(**PRIOR))
    prior = TokenPrior(10, 8, width=16, layers=1, heads=2)
    with pytest.raises(ValueError, match="block size 8"):
        prior(torch.zeros(1, 9, dtype=torch.long))
    grammar = TokenGrammar.of(load_run(runs["dl"])[1].bottleneck)
    with pytest.raises(ValueError, match="multiple of 4"):
        grammar.check(torch.zeros(2, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="heads"):
        PriorConfig(width=30, heads=4).validate()
    shutil.copytree(runs["vq"], tmp_path / "vq", ignore=shutil.ignore_patterns("prior"))
    with pytest.raises(FileNotFoundError, match="lasers prior train"):
        load_prior(tmp_path / "vq")


def test_cli_prior_train_and_sample(runs, tmp_path, capsys):
    run = tmp_path / "vq"
    shutil.copytree(runs["vq"], run, ignore=shutil.ignore_patterns("prior"))
    flags = ["--steps", "2", "--batch-size", "4", "--width", "16", "--layers", "1", "--heads", "2",
             "--train-images", "8", "--eval-images", "4", "--samples", "4", "--no-progress", "--device", "cpu"]
    assert main(["prior", "train", str(run), *flags]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 2
    assert main(["sample", str(run), "--n", "5", "--seed", "3"]) == 0
    assert "5 samples" in capsys.readouterr().out
    with Image.open(run / "prior" / "samples-3.png") as im:
        assert im.format == "PNG"
    assert main(["prior", "train", str(tmp_path / "nowhere"), *flags]) == 2
    assert "no run directory" in capsys.readouterr().err
    assert main(["sample", str(runs["plain"])]) == 2
    assert "coeff_bins" in capsys.readouterr().err


def test_compare_stage2_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(loop_mod, "run_pictures", lambda *a, **k: None)
    monkeypatch.setattr(compare_mod, "_compare_pictures", lambda *a, **k: None)
    cfg = TrainConfig(**{**STAGE1, "steps": 2, "checkpoint_every": 2}, out=str(tmp_path / "cmp"))
    results = prior_mod.compare_stage2(cfg, PriorConfig(**{**PRIOR, "steps": 2}))
    assert list(results) == ["vq-vae", "dl-vae"]
    assert load_run(tmp_path / "cmp" / "dl-vae")[0].coeff_bins == 16  # the DL model got coefficient tokens
    table = (tmp_path / "cmp" / "stage2.md").read_text()
    assert table.startswith("| model | prior | tokens / image | bits / image |")
    assert "| dl-vae | spatial-depth | 64 |" in table  # 16 sites x 2S tokens
    assert "| vq-vae | spatial-depth | 16 | 64 |" in table and table.strip() in capsys.readouterr().out
    assert json.loads((tmp_path / "cmp" / "stage2.json").read_text()) == results
    for name in results:
        with Image.open(tmp_path / "cmp" / "pictures" / f"samples-{name}.png") as im:
            assert im.format == "PNG"


def test_cached_step_decoding_matches_the_full_forward(gen):
    torch.manual_seed(0)
    prior = TokenPrior(13, 10, width=16, layers=2, heads=4).eval()
    tokens = torch.randint(0, 13, (3, 10), generator=gen)
    full = prior(tokens)
    caches = [[] for _ in prior.blocks]
    previous = prior.start(3)
    for t in range(10):
        torch.testing.assert_close(prior.step(previous, t, caches), full[:, t], rtol=1e-5, atol=1e-5)
        previous = tokens[:, t]


def test_damaged_files_are_clear_errors_or_rebuilt(runs, tmp_path):
    run = tmp_path / "dl"
    shutil.copytree(runs["dl"], run, ignore=shutil.ignore_patterns("prior"))
    train_prior(run, PriorConfig(**{**PRIOR, "steps": 2}))
    (run / "prior" / "tokens.pt").write_bytes(b"not a tensor file")  # a damaged cache is rebuilt
    ckpt = run / "prior" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])  # a checkpoint cut by a crash outside the atomic write
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        train_prior(run, PriorConfig(**{**PRIOR, "steps": 4}))
    assert len(ckpt.read_bytes()) == 100  # left untouched
    ckpt.unlink()
    result = train_prior(run, PriorConfig(**{**PRIOR, "steps": 2}))
    assert result["steps"] == 2 and torch.load(run / "prior" / "tokens.pt", weights_only=False)["train"].numel()
