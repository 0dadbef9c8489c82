"""lasers_ext.training.spatial_depth: the spatial-depth prior over DL (atom-or-stop, coefficient) events, VQ codes and
residual-VQ codes (synthetic), and its use by ``lasers prior train``.

Oracles: causality by perturbing later sites and later events; the likelihood recomputed event by event from full
forward passes on sequences whose later events are garbage, with the masks written out here by hand (no atom twice
in a site, stops only where allowed, nothing modelled after a stop); the cached sampler against the full forward
(the likelihood of what it drew, and greedy draws against the argmax of the masked logits); hand-worked label
smoothing, soft coefficient targets and top-k / top-p; bit-exact resume against an uninterrupted run."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from lasers_ext.tokens import TokenCodec
from lasers_ext.training import TrainConfig, load_run, train
from lasers_ext.training import loop as loop_mod
from lasers_ext.training import prior as prior_mod
from lasers_ext.training.cli import main
from lasers_ext.training.prior import PriorConfig, load_prior, train_prior
from lasers_ext.training.spatial_depth import EventSpec, SpatialDepthPrior, event_spec, filter_logits

STAGE1 = dict(hidden=16, res_hidden=8, n_e=16, e_dim=4, sparsity=2, image_size=16, train_length=32, batch_size=8,
              eval_images=8, steps=4, log_every=2, checkpoint_every=4, eval_every=0, progress=False, device="cpu")
PRIOR = dict(steps=6, batch_size=4, width=32, layers=1, heads=2, depth_layers=1, train_images=16, eval_images=8,
             samples=4, log_every=2, checkpoint_every=2, progress=False, device="cpu")


def dl_spec(gen, atoms=6, bins=4, depth=3, m=4):
    codebooks = F.normalize(torch.randn(1, atoms, m, generator=gen), dim=-1)
    return EventSpec(depth, atoms, bins, True, True, codebooks, torch.linspace(-1.0, 2.0, bins), "codec", "DL")


def vq_spec(gen, atoms=5, m=3):
    return EventSpec(1, atoms, None, False, False, torch.randn(1, atoms, m, generator=gen), None, "index", "VQ")


def rvq_spec(gen, atoms=4, depth=3, m=3):
    """Residual VQ: one codebook per depth, no stop, atoms may repeat across depths."""
    return EventSpec(depth, atoms, None, False, False, torch.randn(depth, atoms, m, generator=gen), None, "index",
                     "RVQ")


SPECS = {"dl": dl_spec, "vq": vq_spec, "rvq": rvq_spec}


def random_events(spec, n, sites, gen, stop_rate=0.3):
    """Valid events (n, sites, D): distinct atoms where the spec asks, a stop with probability stop_rate per event."""
    atoms = torch.empty(n, sites, spec.depth, dtype=torch.long)
    for i in range(n):
        for t in range(sites):
            atoms[i, t] = torch.randperm(spec.atoms, generator=gen)[:spec.depth] if spec.distinct else \
                torch.randint(0, spec.atoms, (spec.depth,), generator=gen)
            if spec.stop:
                for j in range(spec.depth):
                    if torch.rand((), generator=gen) < stop_rate:
                        atoms[i, t, j:] = spec.atoms
                        break
    bins = torch.randint(0, spec.bins or 1, atoms.shape, generator=gen)
    bins[atoms == spec.atoms] = 0
    spec.check(atoms, bins)
    return atoms, bins


def make_prior(spec, grid=(2, 3), seed=0, **kw):
    torch.manual_seed(seed)
    prior = SpatialDepthPrior(spec, grid, width=16, layers=2, heads=2, depth_layers=2, **kw).eval()
    with torch.no_grad():  # an untrained prior: make its logits spread, and stops frequent enough to test
        for p in prior.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return prior


def hand_masked_log_softmax(logits, spec, earlier):
    """log-softmax (float64) of raw atom logits (classes,) with the atoms in ``earlier`` masked (distinct specs)."""
    out = logits.double().clone()
    if spec.distinct:
        for a in earlier:
            if a != spec.atoms:
                out[a] = -math.inf
    return out.log_softmax(-1)


# ------------------------------------------------------------------------------------------------ causality
@pytest.mark.parametrize("kind", ["dl", "rvq"])
def test_spatial_transformer_is_causal_over_sites(gen, kind):
    spec = SPECS[kind](gen)
    prior = make_prior(spec)
    atoms, bins = random_events(spec, 3, 6, gen)
    atom_logits, coeff_logits = prior(atoms, bins)
    t = 3
    other_atoms, other_bins = random_events(spec, 3, 6, gen)
    changed_atoms, changed_bins = atoms.clone(), bins.clone()
    changed_atoms[:, t:], changed_bins[:, t:] = other_atoms[:, t:], other_bins[:, t:]
    a2, c2 = prior(changed_atoms, changed_bins)
    torch.testing.assert_close(a2[:, :t], atom_logits[:, :t], rtol=0, atol=1e-5)
    torch.testing.assert_close(a2[:, t, 0], atom_logits[:, t, 0], rtol=0, atol=1e-5)  # site t's first event
    assert not torch.allclose(a2[:, t + 1:], atom_logits[:, t + 1:], atol=1e-4)  # later sites see the change
    if coeff_logits is not None:
        torch.testing.assert_close(c2[:, :t], coeff_logits[:, :t], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["dl", "rvq"])
def test_depth_transformer_is_causal_over_events(gen, kind):
    spec = SPECS[kind](gen)
    prior = make_prior(spec)
    atoms, bins = random_events(spec, 4, 6, gen, stop_rate=0.0)
    atom_logits, coeff_logits = prior(atoms, bins)
    t, j = 2, 1
    changed_atoms, changed_bins = atoms.clone(), bins.clone()
    changed_atoms[:, t, j:] = (atoms[:, t, j:] + 1) % spec.atoms  # raw logits take any ids
    if spec.bins:
        changed_bins[:, t, j:] = (bins[:, t, j:] + 1) % spec.bins
    a2, c2 = prior(changed_atoms, changed_bins)
    torch.testing.assert_close(a2[:, t, :j + 1], atom_logits[:, t, :j + 1], rtol=0, atol=1e-5)  # atom j: events < j
    assert not torch.allclose(a2[:, t, j + 1:], atom_logits[:, t, j + 1:], atol=1e-4)
    if coeff_logits is not None:
        torch.testing.assert_close(c2[:, t, :j], coeff_logits[:, t, :j], rtol=0, atol=1e-5)
        assert not torch.allclose(c2[:, t, j], coeff_logits[:, t, j], atol=1e-4)  # the bin sees its own atom
    torch.testing.assert_close(a2[:, :t], atom_logits[:, :t], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------ likelihood
@pytest.mark.parametrize("kind", ["dl", "vq", "rvq"])
def test_likelihood_recomputed_event_by_event(gen, kind):
    spec = SPECS[kind](gen)
    prior = make_prior(spec, grid=(2, 2))
    n, sites = 3, 4
    atoms, bins = random_events(spec, n, sites, gen)
    garbage_atoms, garbage_bins = random_events(spec, n, sites, gen, stop_rate=0.0)
    expected = torch.zeros(n, dtype=torch.float64)
    for t in range(sites):
        for j in range(spec.depth):
            later = torch.zeros(sites, spec.depth, dtype=torch.bool)
            later.view(-1)[t * spec.depth + j:] = True  # event (t, j) and everything after it: garbage
            a = torch.where(later, garbage_atoms, atoms)
            b = torch.where(later, garbage_bins, bins)
            atom_logits, _ = prior(a, b)
            a[:, t, j], b[:, t, j] = atoms[:, t, j], garbage_bins[:, t, j]  # the true atom, a garbage bin
            _, coeff_logits = prior(a, b)
            for i in range(n):
                earlier = atoms[i, t, :j].tolist()
                if spec.stop and spec.atoms in earlier:
                    continue  # a pad after a stop: not modelled
                true_atom = int(atoms[i, t, j])
                expected[i] += hand_masked_log_softmax(atom_logits[i, t, j], spec, earlier)[true_atom]
                if spec.bins and true_atom != spec.atoms:
                    expected[i] += coeff_logits[i, t, j].double().log_softmax(-1)[bins[i, t, j]]
    torch.testing.assert_close(prior.log_prob(atoms, bins).double(), expected, rtol=1e-5, atol=1e-4)


def test_a_repeated_atom_or_an_atom_after_a_stop_is_not_a_code(gen):
    spec = dl_spec(gen)
    atoms, bins = random_events(spec, 2, 6, gen, stop_rate=0.0)
    bad = atoms.clone()
    bad[0, 0, 1] = bad[0, 0, 0]
    with pytest.raises(ValueError, match="repeats an atom"):
        spec.check(bad, bins)
    bad = atoms.clone()
    bad[0, 0, 0] = spec.atoms
    with pytest.raises(ValueError, match="follows a stop"):
        spec.check(bad, bins)
    rvq = rvq_spec(gen)
    same = torch.zeros(1, 2, rvq.depth, dtype=torch.long)
    rvq.check(same, torch.zeros_like(same))  # residual VQ may pick code 0 at every depth
    with pytest.raises(ValueError, match=r"atom ids must be in \[0, 4\)"):
        rvq.check(same + rvq.atoms, torch.zeros_like(same))  # no stop id without stops


def test_tokens_and_events_round_trip_through_the_codec(gen):
    spec = dl_spec(gen)
    atoms, bins = random_events(spec, 5, 6, gen)
    tokens = spec.to_tokens(atoms, bins)
    codec = TokenCodec(spec.atoms, spec.bins, spec.depth)
    idx, b = codec.decode(tokens.reshape(5, 6, -1))  # an independent decoder of the same tokens
    assert torch.equal(torch.where(idx >= 0, idx, spec.atoms), atoms) and torch.equal(b, bins)
    back = spec.to_events(tokens)
    assert torch.equal(back[0], atoms) and torch.equal(back[1], bins)
    rvq = rvq_spec(gen)
    ra, rb = random_events(rvq, 2, 4, gen)
    assert torch.equal(rvq.to_events(rvq.to_tokens(ra, rb))[0], ra)


# ------------------------------------------------------------------------------------------------ training options
def test_label_smoothing_and_soft_coefficient_targets_by_hand(gen):
    spec = dl_spec(gen, atoms=5, bins=7, depth=2)
    prior = make_prior(spec, grid=(1, 2))
    atoms = torch.tensor([[[3, 1], [0, 5]]])  # site 1 stops after one atom
    bins = torch.tensor([[[0, 6], [3, 0]]])
    with torch.no_grad():
        atom_logits, coeff_logits = prior(atoms, bins)
    eps, sigma = 0.2, 1.0
    expected = 0.0
    for t, j in [(0, 0), (0, 1), (1, 0), (1, 1)]:
        earlier = atoms[0, t, :j].tolist()
        logp = hand_masked_log_softmax(atom_logits[0, t, j], spec, earlier)
        allowed = torch.isfinite(logp)
        expected += -(1 - eps) * logp[atoms[0, t, j]] - eps * logp[allowed].mean()
        if atoms[0, t, j] != spec.atoms:
            lp = coeff_logits[0, t, j].double().log_softmax(-1)
            true = int(bins[0, t, j])
            w = torch.tensor([math.exp(-0.5 * (k - true) ** 2) if abs(k - true) <= 3 else 0.0 for k in range(7)],
                             dtype=torch.float64)
            expected += -(w / w.sum() * lp).sum()
    loss = prior.loss(atoms, bins, label_smoothing=eps, coeff_sigma=sigma)
    torch.testing.assert_close(loss.detach().double(), torch.tensor([float(expected)], dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(prior.loss(atoms, bins), -prior.log_prob(atoms, bins))  # no options: the NLL
    with pytest.raises(ValueError, match="label_smoothing"):
        prior.loss(atoms, bins, label_smoothing=1.0)
    with pytest.raises(ValueError, match="coeff_sigma"):
        prior.loss(atoms, bins, coeff_sigma=float("nan"))


def test_top_k_and_top_p_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.1, 0.3, 0.0, 0.1]]))  # one id not allowed (-inf)
    keep = lambda out: torch.isfinite(out[0]).tolist()  # noqa: E731
    assert keep(filter_logits(logits, top_k=2)) == [True, False, True, False, False]
    assert keep(filter_logits(logits, top_p=0.5)) == [True, False, False, False, False]
    assert keep(filter_logits(logits, top_p=0.75)) == [True, False, True, False, False]  # 0.5 < 0.75: one more
    assert keep(filter_logits(logits, top_p=0.85)) == [True, True, True, False, True]  # ties at 0.1: both stay
    assert keep(filter_logits(logits, top_p=0.01)) == [True, False, False, False, False]  # the top id always stays
    assert keep(filter_logits(logits)) == [True, True, True, False, True]
    for bad in ({"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            filter_logits(logits, **bad)


# ------------------------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("kind", ["dl", "vq", "rvq"])
def test_cached_sampler_matches_the_full_forward(gen, kind):
    spec = SPECS[kind](gen)
    prior = make_prior(spec, dropout=0.1)
    prior.train()  # the sampler switches to eval mode (no dropout) and back
    seed = int(torch.randint(2**31, (), generator=gen))
    atoms, bins, log_prob = prior.sample(16, generator=torch.Generator().manual_seed(seed))
    assert prior.training
    prior.eval()
    spec.check(atoms, bins)
    torch.testing.assert_close(log_prob, prior.log_prob(atoms, bins).detach(), rtol=1e-4, atol=1e-3)
    if spec.stop:
        assert (atoms == spec.atoms).any() and (atoms != spec.atoms).all(-1).any()  # stops and full sites both drawn


@pytest.mark.parametrize("kind", ["dl", "rvq"])
def test_greedy_sampling_follows_the_argmax_of_the_full_forward(gen, kind):
    spec = SPECS[kind](gen)
    prior = make_prior(spec)
    atoms, bins, _ = prior.sample(4, temperature=1e-30)
    atom_logits, coeff_logits = prior(atoms, bins)
    ok, active = prior.allowed(atoms)
    best = atom_logits.masked_fill(~ok, -math.inf).argmax(-1)
    assert torch.equal(atoms[active], best[active])
    if coeff_logits is not None:
        real = active & (atoms < spec.atoms)
        assert torch.equal(bins[real], coeff_logits.argmax(-1)[real])
    top1, _, _ = prior.sample(4, top_k=1, coeff_temperature=1e-30)  # top-1 atoms: greedy too
    assert torch.equal(top1, atoms)


def test_masks_hold_on_many_samples(gen):
    spec = dl_spec(gen, atoms=4, bins=3, depth=3)  # 3 atoms of 4: a repeat would be likely without the mask
    prior = make_prior(spec, grid=(3, 3))
    with torch.no_grad():
        prior.atom_head.bias[spec.atoms] -= 1.5  # stops rarer, so that filtered draws keep several atoms too
    for settings in ({}, {"temperature": 2.0}, {"top_k": 2}, {"top_p": 0.7, "coeff_temperature": 0.5}):
        atoms, bins, _ = prior.sample(200, generator=torch.Generator().manual_seed(7), **settings)
        real = atoms < spec.atoms
        same = (atoms.unsqueeze(-1) == atoms.unsqueeze(-2)) & real.unsqueeze(-1) & real.unsqueeze(-2)
        assert (same.sum((-1, -2)) == real.sum(-1)).all(), settings  # no atom twice in a site
        stopped = ~real
        assert (stopped[..., 1:] >= stopped[..., :-1]).all(), settings  # pads only after a stop
        assert (bins[stopped] == 0).all()
        assert (real.sum(-1) >= 2).any(), settings  # sites with several atoms: the mask had work to do
        if "top_p" not in settings:
            assert real.all(-1).any() and stopped.any(), settings  # full sites and stops both occur
        TokenCodec(spec.atoms, spec.bins, spec.depth).decode(spec.to_tokens(atoms, bins).reshape(200, 9, -1))
    rvq = rvq_spec(gen, atoms=3, depth=3)
    atoms, _, _ = make_prior(rvq, grid=(3, 3)).sample(200, generator=torch.Generator().manual_seed(7))
    assert (atoms[..., 0] == atoms[..., 1]).any()  # residual VQ: no mask across depths


def test_sampler_settings_are_validated(gen):
    prior = make_prior(dl_spec(gen))
    for bad, word in (({"temperature": 0.0}, "temperature"), ({"coeff_temperature": -1.0}, "coeff_temperature"),
                      ({"top_k": -2}, "top_k"), ({"top_p": 2.0}, "top_p")):
        with pytest.raises(ValueError, match=word):
            prior.sample(2, **bad)
    with pytest.raises(ValueError, match="n must be"):
        prior.sample(0)


# ------------------------------------------------------------------------------------------------ RVQ learns
def test_residual_vq_codes_are_learned_from_synthetic_tokens(gen):
    """Two fixed residual-VQ images (3 depths, a codebook per depth): the prior memorises them."""
    spec = rvq_spec(gen, atoms=8, depth=3)
    torch.manual_seed(0)
    prior = SpatialDepthPrior(spec, (2, 2), width=32, layers=1, heads=2, depth_layers=1)
    data = torch.randint(0, 8, (2, 4 * 3), generator=gen)
    atoms, bins = spec.to_events(data)
    opt = torch.optim.Adam(prior.parameters(), lr=3e-3)
    start = -prior.log_prob(atoms, bins).mean().item()
    for _ in range(150):
        loss = prior.loss(atoms, bins).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * start  # from ~12 events x log 8 nats to near 0 (each image has probability ~1/2)
    drawn, _, _ = prior.eval().sample(64, temperature=0.5, generator=torch.Generator().manual_seed(0))
    tokens = spec.to_tokens(drawn, torch.zeros_like(drawn))
    assert ((tokens == data[0]).all(1) | (tokens == data[1]).all(1)).float().mean() > 0.9


def test_a_bottleneck_can_give_its_own_event_spec(gen):
    spec = rvq_spec(gen)

    class Peer(torch.nn.Module):  # the shape of a peer adapter (issue 22)
        def event_spec(self):
            return spec

    assert event_spec(Peer()) is spec
    with pytest.raises(ValueError, match="does not know the codes of Linear"):
        event_spec(torch.nn.Linear(2, 2))


def test_spec_and_constructor_errors(gen):
    with pytest.raises(ValueError, match="codebooks"):
        EventSpec(3, 4, None, False, False, torch.randn(2, 4, 3))  # 2 codebooks for 3 depths
    with pytest.raises(ValueError, match="levels"):
        EventSpec(1, 4, 3, True, True, torch.randn(1, 4, 3), None, "codec")
    with pytest.raises(ValueError, match="distinct"):
        EventSpec(5, 4, None, False, True, torch.randn(1, 4, 3))
    with pytest.raises(ValueError, match="heads"):
        SpatialDepthPrior(dl_spec(gen), (2, 2), width=10, heads=4)
    prior = make_prior(dl_spec(gen))
    with pytest.raises(ValueError, match=r"\(N, 6, 3\)"):
        prior(torch.zeros(1, 5, 3, dtype=torch.long), torch.zeros(1, 5, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="multiple of 6"):
        dl_spec(gen).to_events(torch.zeros(2, 4, dtype=torch.long))  # VQ-like tokens given to a DL spec


# ------------------------------------------------------------------------------------------------ the tool
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("stage1")
    mp = pytest.MonkeyPatch()
    mp.setattr(loop_mod, "run_pictures", lambda *a, **k: None)
    out = {}
    for name, extra in {"dl": dict(model="dl-vae", coeff_bins=4), "vq": dict(model="vq-vae")}.items():
        train(TrainConfig(**STAGE1, **extra, out=str(base / name)))
        out[name] = base / name
    mp.undo()
    return out


def _copy(runs, kind, tmp_path, name=None):
    dest = tmp_path / (name or kind)
    shutil.copytree(runs[kind], dest, ignore=shutil.ignore_patterns("prior"))
    return dest


def test_event_specs_of_the_real_bottlenecks_decode_like_the_tokens(runs):
    _, model, _ = load_run(runs["dl"])
    spec = event_spec(model.bottleneck)
    assert (spec.depth, spec.atoms, spec.bins, spec.stop, spec.distinct) == (2, 16, 4, True, True)
    x = torch.rand(3, 3, 16, 16)
    z_q, _, info = model.encode(x * 2 - 1)
    tokens = info[2].reshape(3, -1)
    atoms, bins = spec.to_events(tokens)
    latent = spec.contributions(atoms, bins, torch.arange(2), spec.codebooks, spec.levels).sum(-2)  # (3, 16, M)
    torch.testing.assert_close(latent.reshape(3, 4, 4, 4).permute(0, 3, 1, 2), z_q, rtol=1e-5, atol=1e-5)
    _, vq, _ = load_run(runs["vq"])
    vspec = event_spec(vq.bottleneck)
    assert (vspec.depth, vspec.atoms, vspec.bins, vspec.stop) == (1, 16, None, False)


def test_exact_resume_with_selection_dropout_and_soft_targets(runs, tmp_path):
    cfg = dict(PRIOR, dropout=0.1, label_smoothing=0.1, coeff_sigma=1.0, fid_every=2, select_images=4, steps=8)
    a, b = _copy(runs, "dl", tmp_path, "a"), _copy(runs, "dl", tmp_path, "b")
    ra = train_prior(a, PriorConfig(**cfg))
    train_prior(b, PriorConfig(**{**cfg, "steps": 4}))  # "crashes" after its step-4 checkpoint
    rb = train_prior(b, PriorConfig(**cfg))
    sa = torch.load(a / "prior" / "checkpoint.pt", weights_only=False)
    sb = torch.load(b / "prior" / "checkpoint.pt", weights_only=False)
    for key in sa["model"]:
        assert torch.equal(sa["model"][key], sb["model"][key]), key
    assert sa["selections"] == sb["selections"] and [s["step"] for s in sa["selections"]] == [2, 4, 6, 8]
    assert sa["best"]["step"] == sb["best"]["step"] == ra["selected_step"] == rb["selected_step"]
    assert ra["selected_step"] == min(sa["selections"], key=lambda s: s["fid"])["step"]
    for key in sa["best"]["model"]:
        assert torch.equal(sa["best"]["model"][key], sb["best"]["model"][key]), key
    assert ra["nll_bits_per_dim"] == rb["nll_bits_per_dim"]  # the same selected weights evaluated
    _, prior, _, _ = load_prior(a)
    for key, value in prior.state_dict().items():  # sampling uses the selected weights
        assert torch.equal(value, sa["best"]["model"][key]), key
    records = [json.loads(line) for line in (b / "prior" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "select"] == [2, 4, 6, 8]  # each selection logged once


def test_stage2_result_has_cost_fid_and_reconstruction_fid(runs, tmp_path):
    run = _copy(runs, "vq", tmp_path)
    r = train_prior(run, PriorConfig(**{**PRIOR, "steps": 2, "fid_images": 4, "eval_images": 4}))
    assert r["prior"] == "spatial-depth" and r["selected_step"] == 2 and r["fid_images"] == 4
    assert r["recon_fid_images"] == 4 and math.isfinite(r["recon_fid"]) and math.isfinite(r["fid"])
    assert r["seconds_per_step"] == pytest.approx(r["train_time_s"] / 2)
    assert r["prior_parameters"] == sum(p.numel() for p in load_prior(run)[1].parameters())
    table = prior_mod.format_stage2_table({"vq-vae": r})
    assert f"| vq-vae | spatial-depth | 16 | 64 | {r['prior_parameters'] / 1e6:.2f} M | 2 (2) |" in table
    assert f"| {r['fid']:.2f} (4) | {r['recon_fid']:.2f} (4) |" in table


def test_a_prior_of_another_bottleneck_is_a_clear_error(runs, tmp_path):
    vq = _copy(runs, "vq", tmp_path)
    train_prior(vq, PriorConfig(**{**PRIOR, "steps": 2}))
    dl = _copy(runs, "dl", tmp_path)
    shutil.copytree(vq / "prior", dl / "prior")  # a VQ prior put into a DL run
    (dl / "prior" / "tokens.pt").unlink()
    with pytest.raises(ValueError, match="another autoencoder"):
        train_prior(dl, PriorConfig(**{**PRIOR, "steps": 2}))
    with pytest.raises(ValueError, match="another autoencoder"):
        load_prior(dl)
    # the same autoencoder, but the checkpoint says it models other codes (a hand-edited or foreign file)
    ckpt = vq / "prior" / "checkpoint.pt"
    saved = torch.load(ckpt, weights_only=False)
    saved["codes"] = {**saved["codes"], "kind": "DL", "depth": 2}
    torch.save(saved, ckpt)
    with pytest.raises(ValueError, match="models other codes"):
        load_prior(vq)


def test_a_flat_prior_is_not_resumed_as_a_spatial_depth_one(runs, tmp_path):
    run = _copy(runs, "dl", tmp_path)
    r = train_prior(run, PriorConfig(**{**PRIOR, "prior": "flat", "steps": 2}))
    assert r["prior"] == "flat"
    with pytest.raises(ValueError, match="prior='flat'"):
        train_prior(run, PriorConfig(**{**PRIOR, "steps": 4}))
    ckpt = run / "prior" / "checkpoint.pt"
    saved = torch.load(ckpt, weights_only=False)
    del saved["config"]["prior"]  # a checkpoint written before the spatial-depth prior existed
    for key in ("depth_layers", "label_smoothing", "coeff_sigma", "fid_every", "select_images", "top_k", "top_p",
                "coeff_temperature"):
        del saved["config"][key]
    torch.save(saved, ckpt)
    assert isinstance(load_prior(run)[1], prior_mod.TokenPrior)
    with pytest.raises(ValueError, match="spatial-depth prior only"):
        PriorConfig(prior="flat", coeff_sigma=1.0).validate()
    with pytest.raises(ValueError, match="fid_every needs"):
        PriorConfig(fid_every=5).validate()


def test_cli_prior_choice_and_sampler_flags(runs, tmp_path, capsys):
    run = _copy(runs, "dl", tmp_path)
    flags = ["--steps", "2", "--batch-size", "4", "--width", "16", "--layers", "1", "--depth-layers", "1", "--heads",
             "2", "--train-images", "8", "--eval-images", "4", "--samples", "4", "--no-progress", "--device", "cpu",
             "--label-smoothing", "0.1", "--coeff-sigma", "0.5", "--top-p", "0.9"]
    assert main(["prior", "train", str(run), *flags]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prior"] == "spatial-depth" and out["sampler"]["top_p"] == 0.9
    assert main(["sample", str(run), "--n", "3", "--top-k", "2", "--coeff-temperature", "0.5"]) == 0
    assert "3 samples" in capsys.readouterr().out
    assert main(["sample", str(run), "--n", "3", "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err
    flat = _copy(runs, "vq", tmp_path)
    assert main(["prior", "train", str(flat), *flags[:-6], "--prior", "flat"]) == 0
    assert json.loads(capsys.readouterr().out)["prior"] == "flat"
    assert main(["sample", str(flat), "--n", "2", "--top-k", "3"]) == 0
    assert main(["sample", str(flat), "--n", "2", "--coeff-temperature", "0.5"]) == 2
    assert "spatial-depth prior only" in capsys.readouterr().err
