"""lasers_ext.training.peers: vector-quantize-pytorch's quantizers behind the package's quantizer contract.

Oracles: brute force in float64 (nearest codeword, greedy residual coding, FSQ's bound-and-round formula of its paper,
LFQ's sign bits, most significant first), hand-computed rates (log2 K, Q log2 K, sum log2 L_i, the bits of LFQ),
numpy histograms for the usage statistics, an uninterrupted run for resume (bit for bit), a one-process run on the
same global batch for the two-process gloo runs, and the files every command promises, read back.
"""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from test_distributed import _assert_same_logs, _assert_same_state, _checkpoint, _one_process, _torchrun

from lasers_ext import Autoencoder
from lasers_ext.tokens import TokenGrammar
from lasers_ext.training import TrainConfig, evaluate_run, load_run, sweep, train
from lasers_ext.training import loop as loop_mod
from lasers_ext.training.cli import main
from lasers_ext.training.config import build_model
from lasers_ext.training.peers import (
    FSQPeer,
    LFQPeer,
    RVQPeer,
    VQPeer,
    lfq_codebook_size,
    parse_levels,
    peer_bits,
)
from lasers_ext.training.prior import PriorConfig, sample_images, train_prior
from lasers_ext.training.runs import CHECKPOINT
from lasers_ext.training.spatial_depth import SpatialDepthPrior, event_spec

pytest.importorskip("vector_quantize_pytorch")

TINY = dict(hidden=16, res_hidden=8, n_e=32, e_dim=4, image_size=16, train_length=48, batch_size=8, eval_images=4,
            steps=8, log_every=2, checkpoint_every=4, eval_every=0, progress=False, device="cpu",
            fsq_levels="5,4,3", lfq_bits=6, lfq_groups=2, rvq_quantizers=2)
PRIOR = dict(steps=2, batch_size=4, width=16, layers=1, heads=2, train_images=16, eval_images=8, samples=4,
             log_every=1, checkpoint_every=1, progress=False, device="cpu")
PEERS = ("vqp", "rvq", "fsq", "lfq")


@pytest.fixture
def no_pictures(monkeypatch):
    monkeypatch.setattr(loop_mod, "run_pictures", lambda *args, **kwargs: None)


def _peer(kind: str, gen: torch.Generator, **kw):
    """A peer with sizes drawn from ``gen``: (adapter, hand-computed bits per site, vocabulary, tokens per site)."""
    draw = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=gen))  # noqa: E731
    if kind == "vqp":
        k = draw(4, 40)
        return VQPeer(draw(2, 8), k, **kw), math.log2(k), k, 1
    if kind == "rvq":
        k, q = draw(4, 40), draw(1, 4)
        return RVQPeer(draw(2, 8), k, q, **kw), q * math.log2(k), q * k, q
    if kind == "fsq":
        levels = [draw(3, 9) for _ in range(draw(1, 5))]
        return FSQPeer(",".join(map(str, levels)), **kw), sum(map(math.log2, levels)), sum(levels), len(levels)
    bits, groups = draw(1, 6), draw(1, 3)
    return LFQPeer(2 ** bits, groups, **kw), float(bits * groups), groups * 2 ** bits, groups


def _latent(peer, gen, b=3, h=4, w=5, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(b, peer.e_dim, h, w, generator=gen, dtype=torch.float64) * 1.5).to(dtype)


def _trained(peer, gen, steps: int = 3):
    """The peer after a few training forwards (k-means init, EMA updates, dead-code restarts) on random latents."""
    peer.train()
    for _ in range(steps):
        peer(_latent(peer, gen, b=4))
    return peer.eval()


def _sites(z: torch.Tensor) -> torch.Tensor:
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).double()


# ----------------------------------------------------------------------------------------------------- the contract
@pytest.mark.parametrize("kind", PEERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_contract_shapes_dtypes_and_tokens_decode_bit_for_bit(kind, dtype, gen):
    peer, bits, vocab, per_site = _peer(kind, gen)
    assert (peer.bits_per_site, peer.vocab_size, peer.n_e, peer.tokens_per_site) == (
        pytest.approx(bits), vocab, vocab, per_site)
    _trained(peer, gen)
    z = _latent(peer, gen, dtype=dtype)
    z_q, loss, info = peer(z)
    n = z.shape[0] * z.shape[2] * z.shape[3]
    assert z_q.shape == z.shape and z_q.dtype == dtype and loss.dim() == 0 and loss.dtype == dtype
    tokens = info[2]
    assert tokens.dtype == torch.int64 and tokens.shape == ((n,) if per_site == 1 else (n, per_site))
    assert info.indices is tokens and torch.equal(info.atom_indices, tokens) and info[1] is None
    assert torch.equal(info.coeffs, torch.ones_like(tokens, dtype=dtype))
    slots = tokens.reshape(n, per_site)
    for q, (lo, hi) in enumerate(peer.token_ranges):
        assert bool(((slots[:, q] >= lo) & (slots[:, q] < hi)).all())
    # the tokens decode to exactly the forward's z_q (taming's call with the latent's shape, and per site)
    b, c, h, w = z.shape
    decoded = peer.get_codebook_entry(tokens.reshape(-1), (b, h, w, c))
    assert decoded.dtype == torch.float32 and torch.equal(decoded.to(dtype), z_q)
    per_site_decoded = peer.get_codebook_entry(tokens, None)
    assert per_site_decoded.shape == (n, c) and torch.equal(per_site_decoded, _sites(decoded).float())
    # usage statistics against numpy
    counts = np.bincount(tokens.reshape(-1).numpy(), minlength=vocab)
    p = counts / counts.sum()
    assert int(info.active_atoms) == (counts > 0).sum() and int(info.dead_atoms) == vocab - (counts > 0).sum()
    assert float(info.perplexity) == pytest.approx(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum()), rel=1e-4)


@pytest.mark.parametrize("kind", PEERS)
def test_sane_index_shape_and_gradients_reach_the_encoder(kind, gen):
    peer, *_ = _peer(kind, gen, sane_index_shape=True)
    z = _latent(peer, gen).requires_grad_(True)
    z_q, loss, info = peer(z)
    b, _, h, w = z.shape
    t = peer.tokens_per_site
    assert info[2].shape == ((b, h, w) if t == 1 else (b, h, w, t))
    (z_q.square().sum() + loss).backward()
    assert z.grad is not None and bool(torch.isfinite(z.grad).all()) and z.grad.abs().sum() > 0
    peer.eval()
    z_q, _, info = peer(z.detach())
    assert torch.equal(peer.get_codebook_entry(info[2], None).permute(0, 3, 1, 2), z_q)


def test_vq_tokens_are_the_nearest_codewords(gen):
    peer = _trained(VQPeer(6, 24), gen)
    z = _latent(peer, gen)
    _, _, info = peer(z)
    codebook = peer.codewords().double()
    nearest = torch.cdist(_sites(z), codebook).argmin(1)
    assert torch.equal(info[2], nearest)


def test_rvq_tokens_are_greedy_residual_codes(gen):
    peer = _trained(RVQPeer(5, 16, 3), gen)
    z = _latent(peer, gen)
    z_q, _, info = peer(z)
    residual, total = _sites(z), torch.zeros_like(_sites(z))
    codebooks = peer.rvq.codebooks.double()
    for q in range(3):  # stage q codes what the stages before it left, with ids offset by q K
        ids = torch.cdist(residual, codebooks[q]).argmin(1)
        assert torch.equal(info[2][:, q], ids + q * 16)
        residual, total = residual - codebooks[q][ids], total + codebooks[q][ids]
    torch.testing.assert_close(_sites(z_q), total, rtol=0, atol=1e-6)


def test_fsq_levels_follow_the_papers_bound_and_round(gen):
    levels = [8, 5, 4, 3]
    peer = FSQPeer(levels).eval()
    z = _latent(peer, gen)
    z_q, loss, info = peer(z)
    x, lv = _sites(z), torch.tensor(levels, dtype=torch.float64)
    half_l = (lv - 1) * (1 + 1e-3) / 2  # FSQ paper, appendix A.1: f(z) = tanh(z + shift) * half_l - offset
    offset = torch.where(lv % 2 == 0, 0.5, 0.0)
    k = torch.round(torch.tanh(x + torch.atanh(offset / half_l)) * half_l - offset)
    half_width = torch.floor(lv / 2)
    assert torch.equal(info[2] - torch.tensor([0, 8, 13, 17]), (k + half_width).long())
    assert torch.equal(_sites(z_q), k / half_width) and float(loss) == 0.0


def test_lfq_tokens_are_sign_bits_most_significant_first(gen):
    peer = LFQPeer(16, 3).eval()  # 3 groups of 4 bits: 12 latent channels
    z = _latent(peer, gen)
    z_q, _, info = peer(z)
    signs = (_sites(z) > 0).long().reshape(-1, 3, 4)
    code = (signs * torch.tensor([8, 4, 2, 1])).sum(-1)
    assert torch.equal(info[2], code + torch.tensor([0, 16, 32]))
    assert torch.equal(_sites(z_q), signs.reshape(-1, 12).double() * 2 - 1)


# ---------------------------------------------------------------------------------------------------- rate accounting
@pytest.mark.parametrize(("peer", "bits", "vocab", "per_site"), [
    (lambda: VQPeer(16, 1024), 10.0, 1024, 1),
    (lambda: VQPeer(16, 1000), math.log2(1000), 1000, 1),
    (lambda: RVQPeer(16, 256, 3), 24.0, 768, 3),
    (lambda: RVQPeer(16, 90, 2), 2 * math.log2(90), 180, 2),
    (lambda: FSQPeer("8,5,5,5"), 3 + 3 * math.log2(5), 23, 4),
    (lambda: FSQPeer([8] * 8), 24.0, 64, 8),
    (lambda: LFQPeer(1024), 10.0, 1024, 1),
    (lambda: LFQPeer(2 ** 13, 2), 26.0, 2 ** 14, 2),
    (lambda: LFQPeer(256, 8), 64.0, 2048, 8),
])
def test_rates_by_hand(peer, bits, vocab, per_site):
    q = peer()
    assert q.bits_per_site == pytest.approx(bits, abs=1e-12) and q.vocab_size == vocab
    assert q.tokens_per_site == per_site


def test_sweep_and_config_rates_agree_with_the_built_bottlenecks():
    base = TrainConfig(**{**TINY, "e_dim": 16}, out="unused")
    cells = sweep.default_cells(base, list(sweep.FAMILIES))
    assert {c["family"] for c in cells} == set(sweep.FAMILIES)
    for cell in cells:
        cfg = dataclasses.replace(base, **cell["overrides"]).validate()
        bottleneck = build_model(cfg, 3).bottleneck
        assert bottleneck.bits_per_site == pytest.approx(cell["bits_per_site"], abs=1e-12), cell["name"]
        # matched rates: every cell sits at or at most 2.5 bits below one of the budgets
        assert any(b - 2.5 <= cell["bits_per_site"] <= b + 1e-9 for b in sweep.RD_BUDGETS), cell
        if cfg.kind in ("vqp", "rvq", "fsq", "lfq"):
            assert cell["bits_per_site"] == pytest.approx(peer_bits(cfg.kind, n_e=cfg.n_e,
                                                                    rvq_quantizers=cfg.rvq_quantizers,
                                                                    fsq_levels=cfg.fsq_levels, lfq_bits=cfg.lfq_bits))
    for family in ("dl", "rvq", "fsq", "lfq"):  # these families cover every budget
        covered = {b for b in sweep.RD_BUDGETS for c in cells
                   if c["family"] == family and b - 2.5 <= c["bits_per_site"] <= b + 1e-9}
        assert covered == set(sweep.RD_BUDGETS), family


# ----------------------------------------------------------------------------------------------- bad configurations
@pytest.mark.parametrize(("make", "error", "match"), [
    (lambda: FSQPeer("8,1,5"), ValueError, "fsq_levels must be a non-empty list of ints >= 3"),
    (lambda: FSQPeer([8, 2]), ValueError, "fsq_levels must be a non-empty list of ints >= 3"),
    (lambda: FSQPeer(""), ValueError, "fsq_levels must be a non-empty list"),
    (lambda: FSQPeer("8,x"), ValueError, "comma-separated ints"),
    (lambda: LFQPeer(1000), ValueError, "codebook_size must be a power of two for LFQ"),
    (lambda: LFQPeer(2 ** 17), ValueError, "exceeds 2\\^16 per group"),
    (lambda: LFQPeer(1), ValueError, "codebook_size must be an int >= 2"),
    (lambda: LFQPeer(16, 0), ValueError, "groups must be an int >= 1"),
    (lambda: lfq_codebook_size(10, 3), ValueError, "lfq_groups \\(3\\) must divide lfq_bits \\(10\\)"),
    (lambda: lfq_codebook_size(34, 2), ValueError, "17 bits per group exceeds 16"),
    (lambda: VQPeer(16, 1), ValueError, "codebook_size must be an int >= 2"),
    (lambda: VQPeer(0, 16), ValueError, "e_dim must be an int >= 1"),
    (lambda: VQPeer(16, 64, decay=1.0), ValueError, "decay must be a finite number in \\[0.0, 1.0\\)"),
    (lambda: VQPeer(16, 64, threshold_ema_dead_code=-1), ValueError, "threshold_ema_dead_code must be"),
    (lambda: VQPeer(16, 64, beta=float("nan")), ValueError, "beta must be a finite number"),
    (lambda: VQPeer(16, 64, kmeans_init="yes"), TypeError, "kmeans_init must be True or False"),
    (lambda: RVQPeer(16, 64, 0), ValueError, "num_quantizers must be an int >= 1"),
    (lambda: RVQPeer(16, 64.0, 2), ValueError, "codebook_size must be an int >= 2"),
])
def test_bad_configurations_are_clear_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize(("overrides", "match"), [
    ({"model": "fsq-vae", "fsq_levels": "8,2"}, "fsq_levels must be a non-empty list of ints >= 3"),
    ({"model": "lfq-vae", "lfq_bits": 10, "lfq_groups": 4}, "lfq_groups \\(4\\) must divide lfq_bits \\(10\\)"),
    ({"model": "lfq-vae", "lfq_bits": 0}, "lfq_bits must be an int >= 1"),
    ({"model": "vqp-vae", "n_e": 1}, "n_e \\(the codebook size K of vqp\\) must be >= 2"),
    ({"model": "rvq-gan", "rvq_quantizers": 0}, "rvq_quantizers must be >= 1"),
    ({"model": "vqp-vae", "peer_decay": 1.5}, "peer_decay must be in \\[0, 1\\)"),
    ({"model": "rvq-vae", "peer_dead_code": -1.0}, "peer_dead_code must be a finite number >= 0"),
])
def test_bad_training_options_are_clear_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{**TINY, **overrides}, out="unused").validate()


@pytest.mark.parametrize("kind", PEERS)
def test_bad_calls_are_clear_errors(kind, gen):
    peer, *_ = _peer(kind, gen)
    with pytest.raises(ValueError, match=f"z must have shape \\(B, {peer.e_dim}, H, W\\)"):
        peer(torch.zeros(1, peer.e_dim + 1, 2, 2))
    z = _latent(peer, gen)
    z[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        peer(z)
    t = peer.tokens_per_site
    bad = torch.tensor([[hi for _, hi in peer.token_ranges]])  # one past each slot's range
    with pytest.raises(ValueError, match="token ids must lie in their slot's range"):
        peer.get_codebook_entry(bad, None)
    with pytest.raises(ValueError, match="shape must be"):
        peer.get_codebook_entry(torch.tensor([lo for lo, _ in peer.token_ranges] * 4), (1, 2, 3, peer.e_dim))
    if t > 1:
        with pytest.raises(ValueError, match=f"{t} tokens per site"):
            peer.get_codebook_entry(torch.zeros(t + 1, dtype=torch.long), (1, 1, 1, peer.e_dim))
    with pytest.raises(TypeError, match="integer tensor"):
        peer.get_codebook_entry(torch.zeros(2, t), None)


# ------------------------------------------------------------------------------------------ state_dict, grammar, models
@pytest.mark.parametrize("kind", PEERS)
def test_state_dict_round_trip(kind, gen):
    peer, *_ = _peer(kind, gen)
    _trained(peer, gen)
    state = peer.state_dict()
    fresh = type(peer)(**_same_arguments(peer))
    fresh.load_state_dict(state)
    fresh.eval()
    assert fresh.state_dict().keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(fresh.state_dict()[key], value), key
    z = _latent(peer, gen)
    (z_q, loss, info), (z_q2, loss2, info2) = peer(z), fresh(z)
    assert torch.equal(z_q, z_q2) and torch.equal(loss, loss2) and torch.equal(info[2], info2[2])
    if kind in ("vqp", "rvq"):
        assert any(key.endswith("initted") and bool(v) for key, v in state.items())  # k-means is not run again


def _same_arguments(peer) -> dict:
    if isinstance(peer, VQPeer):
        return {"e_dim": peer.e_dim, "codebook_size": peer.codebook_size}
    if isinstance(peer, RVQPeer):
        return {"e_dim": peer.e_dim, "codebook_size": peer.codebook_size, "num_quantizers": peer.num_quantizers}
    if isinstance(peer, FSQPeer):
        return {"levels": peer.levels}
    return {"codebook_size": peer.codebook_size, "groups": peer.groups}


def test_grammar_masks_each_position_to_its_slot():
    peer = FSQPeer("5,3,4")  # ids 0-4, 5-7, 8-11
    grammar = TokenGrammar.of(peer)
    allowed = grammar.allowed(torch.zeros(2, 7, dtype=torch.long), torch.arange(7))
    assert allowed.shape == (2, 7, 12)
    expected = torch.zeros(3, 12, dtype=torch.bool)
    expected[0, :5], expected[1, 5:8], expected[2, 8:] = True, True, True
    assert torch.equal(allowed[1], expected[[0, 1, 2, 0, 1, 2, 0]])
    grammar.check(torch.tensor([[4, 5, 11, 0, 7, 8]]))
    with pytest.raises(ValueError, match="position's range"):
        grammar.check(torch.tensor([[4, 4, 11, 0, 7, 8]]))
    assert TokenGrammar.of(VQPeer(4, 16)).allowed(torch.zeros(1, 3), torch.arange(3)) is None  # one free range
    with pytest.raises(ValueError, match="ranges must hold one"):
        TokenGrammar(12, 2, ranges=((0, 5), (5, 13)))


@pytest.mark.parametrize("kind", PEERS)
def test_training_tool_builds_each_peer_and_its_autoencoder_round_trips(kind, gen):
    cfg = TrainConfig(**TINY, model=f"{kind}-vae", out="unused").validate()
    model = build_model(cfg, 3)
    assert isinstance(model, Autoencoder) and model.kind == kind == model.bottleneck.kind
    channels = {"fsq": 3, "lfq": 6}.get(kind, cfg.e_dim)
    assert model.bottleneck.e_dim == channels and model.encoder.net[-1].out_channels == channels
    x = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    model.train()
    model(x)
    model.eval()
    z_q, _, info = model.encode(x)
    assert torch.equal(model.bottleneck.get_codebook_entry(info[2].reshape(-1), (2, 4, 4, channels)), z_q)


# ------------------------------------------------------------------------------------------ training, resume, stage 2
@pytest.mark.parametrize("kind", PEERS)
def test_crash_and_resume_equals_uninterrupted_run(tmp_path, no_pictures, kind):
    cfg_a = TrainConfig(**TINY, model=f"{kind}-vae", out=str(tmp_path / "a"))
    cfg_b = dataclasses.replace(cfg_a, out=str(tmp_path / "b"))
    result_a = train(cfg_a)

    def crash_at_6(step, record):
        if step == 6:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        train(cfg_b, callback=crash_at_6)
    assert torch.load(tmp_path / "b" / CHECKPOINT, weights_only=False)["step"] == 4
    result_b = train(cfg_b)
    ckpt_a = torch.load(tmp_path / "a" / CHECKPOINT, weights_only=False)
    ckpt_b = torch.load(tmp_path / "b" / CHECKPOINT, weights_only=False)
    for key in ("model", "opt", "rng"):
        a, b = ckpt_a[key], ckpt_b[key]
        if key == "model":
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), kind
        elif key == "opt":
            for i, state in a["state"].items():
                assert all(torch.equal(state[n], b["state"][i][n]) for n in state if torch.is_tensor(state[n]))
        else:
            assert torch.equal(a["torch"], b["torch"])
    assert result_a == result_b
    if kind in ("vqp", "rvq"):
        assert any(k.endswith("initted") for k in ckpt_a["model"]) and any(
            k.endswith("cluster_size") for k in ckpt_a["model"])


@pytest.mark.parametrize("kind", PEERS)
def test_stage2_prior_and_samples_for_every_peer(tmp_path, no_pictures, kind):
    run = tmp_path / kind
    train(TrainConfig(**{**TINY, "steps": 2}, model=f"{kind}-vae", out=str(run)))
    _, model, _ = load_run(run)
    result = train_prior(run, PriorConfig(**PRIOR))
    peer = model.bottleneck
    assert result["tokens_per_image"] == 16 * peer.tokens_per_site and result["vocab_size"] == peer.vocab_size
    assert result["bits_per_image"] == pytest.approx(16 * peer.bits_per_site)
    assert math.isfinite(result["nll_bits_per_dim"]) and (run / "prior" / "samples.png").exists()
    tokens = torch.load(run / "prior" / "tokens.pt", weights_only=False)["train"].long()
    peer.check_tokens(tokens.reshape(-1, peer.tokens_per_site))  # every cached token in its slot's range
    images = sample_images(run, 3, seed=1, progress=False)
    assert images.shape == (3, 3, 16, 16) and float(images.min()) >= 0 and float(images.max()) <= 1
    again = evaluate_run(run, progress=False)  # lasers eval: the same numbers as the training's final evaluation
    assert again == json.loads((run / "eval.json").read_text()) and again["step"] == 2


def test_compare_stage2_takes_peer_models(tmp_path, no_pictures, capsys):
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**TINY, "steps": 2, "sparsity": 2}.items()
             if not isinstance(v, bool)]
    prior = [f"--prior-{k.replace('_', '-')}={v}" for k, v in PRIOR.items() if not isinstance(v, bool)]
    code = main(["compare", "--stage2", "--models", "fsq-vae,rvq-vae", "--out", str(tmp_path / "cmp"), *flags,
                 "--no-progress", *prior, "--no-prior-progress"])
    assert code == 0
    table = (tmp_path / "cmp" / "stage2.md").read_text()
    assert "| fsq-vae | spatial-depth | 48 |" in table and "| rvq-vae | spatial-depth | 32 |" in table
    assert set(json.loads((tmp_path / "cmp" / "stage2.json").read_text())) == {"fsq-vae", "rvq-vae"}
    assert "| fsq-vae | 2 |" in (tmp_path / "cmp" / "compare.md").read_text()


def test_rate_distortion_grid_with_every_family_end_to_end(tmp_path, no_pictures, capsys):
    base = TrainConfig(**{**TINY, "steps": 2, "checkpoint_every": 2}, out=str(tmp_path / "rd"))
    # the DL cell at 12 bits lies above every budget: --budgets leaves it out
    grid = {"dl": [{"n_e": 16, "sparsity": 1, "coeff_bins": 4}, {"n_e": 16, "sparsity": 2, "coeff_bins": 4}],
            "vq": [{"n_e": 64}], "vqp": [{"n_e": 64}],
            "rvq": [{"n_e": 8, "rvq_quantizers": 2}], "fsq": [{"fsq_levels": "8,8"}],
            "lfq": [{"lfq_bits": 6, "lfq_groups": 1}]}
    result = sweep.rate_distortion(base, seeds=[0, 1], budgets=[6, 8], grid=grid)
    rows = {r["family"]: r for r in result["rows"]}
    assert len(result["rows"]) == 6 and not (tmp_path / "rd" / "dl-k16-s2-b4").exists()
    assert set(rows) == set(sweep.FAMILIES) and all(r["seeds"] == 2 for r in rows.values())
    assert {f: rows[f]["bits_per_site"] for f in rows} == pytest.approx(
        {"dl": 6.0, "vq": 6.0, "vqp": 6.0, "rvq": 6.0, "fsq": 6.0, "lfq": 6.0})
    for r in rows.values():
        psnr = [json.loads((tmp_path / "rd" / r["cell"] / f"seed{s}" / "eval.json").read_text())["psnr"]
                for s in (0, 1)]
        assert r["psnr_values"] == psnr and r["psnr"] == pytest.approx(np.mean(psnr))
        assert r["psnr_std"] == pytest.approx(np.std(psnr, ddof=1)) and r["seconds_per_step"] > 0
        for s in (0, 1):
            cfg, _, step = load_run(tmp_path / "rd" / r["cell"] / f"seed{s}")
            assert (cfg.seed, step, cfg.kind) == (s, 2, r["family"])
    matched = result["equal_rate"]
    assert [m["budget"] for m in matched] == [6, 8] and set(matched[0]["best"]) == set(sweep.FAMILIES)
    best = max(rows.values(), key=lambda r: r["psnr"])
    assert matched[0]["winner"] == best["family"]
    table = (tmp_path / "rd" / "rate_distortion.md").read_text()
    assert "mean ± standard deviation over 2 seeds" in table and "| ResidualVQ | Q=2 K=8 | 6.00 |" in table
    assert f"**{best['psnr']:.2f} ± {best['psnr_std']:.2f}" in table
    assert table.split("\n\n")[1] in capsys.readouterr().out
    assert (tmp_path / "rd" / "pictures" / "rate_distortion.png").stat().st_size > 1000


# ------------------------------------------------------------------------------------------ two processes (gloo)
needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")
DDP = ["--hidden", "16", "--res-hidden", "8", "--n-e", "32", "--e-dim", "4", "--image-size", "16", "--train-length",
       "64", "--eval-images", "16", "--log-every", "2", "--checkpoint-every", "2", "--eval-every", "0", "--no-progress",
       "--device", "cpu", "--seed", "0", "--steps", "2", "--batch-size", "8", "--fsq-levels", "5,4,3",
       "--lfq-bits", "6", "--lfq-groups", "2", "--rvq-quantizers", "2"]


@needs_gloo
@pytest.mark.parametrize(("kind", "options"), [
    ("vqp", ["--no-peer-kmeans", "--peer-dead-code", "0"]),  # deterministic: all-reduced EMA statistics
    ("fsq", []),
    ("lfq", []),
])
def test_two_process_gloo_step_matches_one_process(tmp_path, kind, options):
    flags = ["--model", f"{kind}-vae", *DDP, *options]
    rc, output = _torchrun(tmp_path / "two", flags)
    assert rc == 0, output
    _one_process(tmp_path / "one", flags)
    _assert_same_state(tmp_path / "two", tmp_path / "one", 2)
    _assert_same_logs(tmp_path / "two", tmp_path / "one")


@needs_gloo
def test_two_process_gloo_step_with_kmeans_and_restarts(tmp_path):
    """ResidualVQ with its defaults under DDP: k-means on samples gathered from both ranks, synchronised EMA
    statistics and restarts; the run finishes and its checkpoint is a trained, loadable model."""
    rc, output = _torchrun(tmp_path / "two", ["--model", "rvq-vae", *DDP])
    assert rc == 0, output
    state = _checkpoint(tmp_path / "two")
    assert state["world_size"] == 2
    assert all(bool(v) for k, v in state["model"].items() if k.endswith("initted"))
    assert all(bool(torch.isfinite(v).all()) for v in state["model"].values() if v.is_floating_point())
    cfg, model, step = load_run(tmp_path / "two")
    assert (cfg.model, step) == ("rvq-vae", 2) and isinstance(model.bottleneck, RVQPeer)
    assert json.loads(Path(tmp_path / "two" / "eval.json").read_text())["step"] == 2


def test_parse_levels_accepts_lists_and_text():
    assert parse_levels("8, 5,5,5") == parse_levels([8, 5, 5, 5]) == (8, 5, 5, 5)


@pytest.mark.parametrize("make", [lambda: VQPeer(4, 16), lambda: RVQPeer(4, 8, 3), lambda: FSQPeer([8, 5, 5, 5]),
                                  lambda: LFQPeer(16, 2)], ids=["vqp", "rvq", "fsq", "lfq"])
def test_spatial_depth_prior_reads_every_peer(make):
    # the events of a peer's tokens: one per token slot; their contributions sum to the z_q the tokens decode to,
    # the tokens round-trip, and samples of an untrained prior respect each slot's range (FSQ: 8, 5, 5, 5 levels)
    q = make().eval()
    z = torch.randn(2, q.e_dim, 3, 3)
    z_q, _, info = q(z)
    tokens = info[2].reshape(2, -1)
    spec = event_spec(q)
    atoms, bins = spec.to_events(tokens)
    assert torch.equal(spec.to_tokens(atoms, bins), tokens)
    total = spec.contributions(atoms, bins, torch.arange(spec.depth), spec.codebooks, spec.levels).sum(2)
    torch.testing.assert_close(total, z_q.permute(0, 2, 3, 1).reshape(2, 9, -1), rtol=0, atol=1e-6)
    prior = SpatialDepthPrior(spec, (3, 3), width=32, layers=1, heads=2, depth_layers=1)
    atoms, bins, log_prob = prior.sample(64, generator=torch.Generator().manual_seed(0))
    widths = torch.tensor([end - first for first, end in q.token_ranges])
    assert (atoms >= 0).all() and (atoms < widths).all()
    torch.testing.assert_close(log_prob, prior.log_prob(atoms, bins), rtol=1e-5, atol=1e-4)
    assert q.get_codebook_entry(spec.to_tokens(atoms, bins).reshape(-1), (64, 3, 3, q.e_dim)).isfinite().all()
    if spec.limits:  # FSQ: the last channel has 5 levels, id 7 is no code of it
        bad = atoms.clone()
        bad[0, 0, -1] = spec.atoms - 1
        with pytest.raises(ValueError, match="below"):
            spec.check(bad, bins)


def test_missing_vector_quantize_pytorch_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "vector_quantize_pytorch", None)  # as if not installed
    code = main(["train", "--model", "fsq-vae", "--out", str(tmp_path / "run"), "--steps", "1", "--no-progress"])
    assert code == 2 and "pip install vector-quantize-pytorch" in capsys.readouterr().err
