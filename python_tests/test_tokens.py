"""Sparse codes as tokens: the coefficient quantiser, the token codec, and the bottleneck as a stage-2 VQ replacement
(taming's encode -> info[2].view(B, -1) -> get_codebook_entry call pattern)."""

import io
import math

import numpy as np
import pytest
import torch

from lasers_ext import SparseDictBottleneck, VectorQuantizer, build_autoencoder
from lasers_ext.tokens import CoefficientQuantizer, TokenCodec


def fitted(bins, mode="uniform", low=-2.0, high=3.0, **kw):
    q = CoefficientQuantizer(bins, mode, **kw)
    q.fit(torch.tensor([low, high]))
    return q


# ------------------------------------------------------------------------------------------- coefficient quantiser
@pytest.mark.parametrize("bins", [2, 8, 33])
def test_uniform_levels_and_nearest_level(gen, bins):
    q = fitted(bins)
    expected = -2.0 + 5.0 * np.arange(bins) / (bins - 1)
    np.testing.assert_allclose(q.levels().numpy(), expected, rtol=0, atol=1e-6)
    c = torch.empty(5000).uniform_(-3, 4, generator=gen)
    got = q.quantize(c)
    oracle = np.abs(c.numpy()[:, None] - expected[None, :]).argmin(1)  # brute-force nearest level
    # ties between two levels (measure zero) aside, the nearest level wins
    gap = np.abs(np.abs(c.numpy() - expected[got.numpy()]) - np.abs(c.numpy() - expected[oracle]))
    assert (gap < 1e-5).all()
    assert got.dtype == torch.int64 and got.min() >= 0 and got.max() < bins
    assert torch.equal(q.quantize(q.levels()), torch.arange(bins))  # every level is its own bin
    assert torch.equal(q.quantize(torch.tensor([-100.0, 100.0])), torch.tensor([0, bins - 1]))  # clipped to the ends


def test_mulaw_levels_follow_the_companding_law(gen):
    mu, bins = 255.0, 16
    q = fitted(bins, "mulaw", low=-1.0, high=1.0, mu=mu)
    y = np.linspace(-1, 1, bins)
    expected = np.sign(y) * np.expm1(np.abs(y) * np.log1p(mu)) / mu
    np.testing.assert_allclose(q.levels().numpy(), expected, rtol=1e-5, atol=1e-7)
    assert (np.diff(expected)[bins // 2 - 1] < np.diff(expected)[0])  # denser near the centre
    c = torch.empty(4000).uniform_(-1, 1, generator=gen)
    companded = np.sign(c.numpy()) * np.log1p(mu * np.abs(c.numpy())) / np.log1p(mu)
    oracle = np.abs(companded[:, None] - y[None, :]).argmin(1)
    got = q.quantize(c).numpy()
    close = np.abs(np.abs(companded - y[got]) - np.abs(companded - y[oracle])) < 1e-5
    assert close.all()


def test_round_trip_is_exact_on_quantised_values(gen):
    q = fitted(16, "mulaw")
    c = torch.randn(1000, generator=gen)
    values = q.dequantize(q.quantize(c))
    assert torch.equal(q.dequantize(q.quantize(values)), values)


def test_straight_through_gradient_of_the_rounding(gen):
    q = fitted(8).eval()
    c = torch.randn(50, generator=gen).requires_grad_()
    out = q(c)
    assert torch.equal(out.detach(), q.dequantize(q.quantize(c.detach())))
    g = torch.randn(50, generator=gen)
    (grad,) = torch.autograd.grad((out * g).sum(), c)
    assert torch.equal(grad, g)  # the rounding counts as the identity


def test_unfitted_range_is_an_error_and_fit_takes_quantiles(gen):
    q = CoefficientQuantizer(8)
    with pytest.raises(RuntimeError, match="never fitted"):
        q.quantize(torch.zeros(3))
    c = torch.randn(10000, generator=gen, dtype=torch.float64)
    valid = torch.rand(10000, generator=gen) < 0.7
    q.fit(c, valid, quantile=0.99)
    kept = c[valid].numpy()
    assert q.low.item() == pytest.approx(np.quantile(kept, 0.01), rel=1e-5)
    assert q.high.item() == pytest.approx(np.quantile(kept, 0.99), rel=1e-5)
    with pytest.raises(ValueError, match="at least one"):
        CoefficientQuantizer(8).fit(torch.tensor([float("nan")]))


def test_moving_average_range_by_hand():
    q = CoefficientQuantizer(8, decay=0.9)
    valid = torch.tensor([True, True, True, False])
    q.observe(torch.tensor([0.5, -1.0, 2.0, 100.0]), valid)  # the first batch sets the range; masked slot ignored
    assert (q.low.item(), q.high.item(), bool(q.fitted)) == (-1.0, 2.0, True)
    q.observe(torch.tensor([-3.0, 1.0, float("nan"), 0.0]))  # non-finite values ignored
    assert q.low.item() == pytest.approx(0.9 * -1.0 + 0.1 * -3.0)
    assert q.high.item() == pytest.approx(0.9 * 2.0 + 0.1 * 1.0)
    before = (q.low.clone(), q.high.clone())
    q.observe(torch.ones(3), torch.zeros(3, dtype=torch.bool))  # nothing valid: unchanged
    assert torch.equal(q.low, before[0]) and torch.equal(q.high, before[1])


def test_quantiser_state_dict_round_trip(gen):
    q = fitted(16, "mulaw", low=-0.7, high=1.9)
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    other = CoefficientQuantizer(16, "mulaw")
    other.load_state_dict(torch.load(buf))
    c = torch.randn(500, generator=gen)
    assert torch.equal(other.quantize(c), q.quantize(c)) and torch.equal(other.levels(), q.levels())


@pytest.mark.parametrize("kwargs", [{"bins": 1}, {"bins": 2.0}, {"bins": 8, "mode": "log"}, {"bins": 8, "mu": 0},
                                    {"bins": 8, "decay": 1.0}])
def test_quantiser_arguments_are_checked(kwargs):
    with pytest.raises(ValueError):
        CoefficientQuantizer(**kwargs)


# ----------------------------------------------------------------------------------------------------- token codec
def random_codes(gen, n, k, b, s):
    indices = torch.randint(0, k, (n, s), generator=gen)
    used = torch.randint(0, s + 1, (n, 1), generator=gen)  # each site uses a prefix of its slots
    indices = torch.where(torch.arange(s) < used, indices, -1)
    return indices, torch.randint(0, b, (n, s), generator=gen)


@pytest.mark.parametrize("s", [1, 2, 5])
def test_codec_round_trip_and_layout(gen, s):
    k, b = 37, 8
    codec = TokenCodec(k, b, s)
    assert (codec.vocab_size, codec.pad_id, codec.tokens_per_site) == (k + b + 1, k + b, 2 * s)
    assert codec.bits_per_site == pytest.approx(math.log2(math.comb(k, s)) + 3 * s)  # the support as a set
    indices, bins = random_codes(gen, 500, k, b, s)
    tokens = codec.encode(indices, bins)
    assert tokens.shape == (500, 2 * s) and tokens.dtype == torch.int64
    assert ((tokens >= 0) & (tokens < codec.vocab_size)).all()
    atom_pos, bin_pos = tokens[:, 0::2], tokens[:, 1::2]
    assert ((atom_pos < k) | (atom_pos == codec.pad_id)).all() and (bin_pos >= k).all()
    used = atom_pos != codec.pad_id
    assert (used[:, 1:] <= used[:, :-1]).all()  # pads only after the last used slot
    idx, got_bins = codec.decode(tokens)
    assert torch.equal(idx, indices) and torch.equal(got_bins[idx >= 0], bins[idx >= 0])
    assert (got_bins[idx < 0] == 0).all()


@pytest.mark.parametrize("tokens, match", [
    ([0, 46, 1, 37], r"\[0, 46\)"),          # id out of range
    ([-1, 37, 1, 38], r"\[0, 46\)"),         # negative id
    ([37, 37, 1, 38], "even positions"),     # a bin id where an atom belongs
    ([0, 1, 1, 38], "odd positions"),        # an atom id where a bin belongs
    ([0, 45, 1, 38], "half padded"),         # atom used, bin padded
    ([45, 45, 1, 38], "follows a pad"),      # a used slot after a pad
])
def test_codec_rejects_invalid_tokens(tokens, match):
    codec = TokenCodec(37, 8, 2)  # ids: atoms 0..36, bins 37..44, pad 45
    assert torch.equal(codec.decode(torch.tensor([[0, 40, 1, 44]]))[1], torch.tensor([[3, 7]]))
    t = torch.tensor([tokens])
    with pytest.raises(ValueError, match=match):
        codec.decode(t)


def test_codec_rejects_wrong_shapes_and_dtypes():
    codec = TokenCodec(10, 4, 3)
    with pytest.raises(ValueError, match=r"\(\.\.\., 6\)"):
        codec.decode(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        codec.decode(torch.zeros(2, 6))
    with pytest.raises(ValueError, match="shape"):
        codec.encode(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long))


# ------------------------------------------------------------------------------------------ the bottleneck's tokens
def trained_bottleneck(gen, sparsity, patch=1, mode="uniform", bins=16, **kw):
    q = SparseDictBottleneck(24, 4, sparsity=sparsity, patch_size=patch, coeff_bins=bins, coeff_quant=mode, **kw)
    q.train()
    q(torch.randn(4, 4, 8, 8, generator=gen))  # training mode tracks the coefficient range
    return q.eval()


@pytest.mark.parametrize("sparsity, patch, sane, mode", [(1, 1, False, "uniform"), (3, 1, False, "mulaw"),
                                                         (3, 2, True, "uniform"), (5, 2, False, "mulaw")])
def test_taming_stage2_round_trip_is_exact(gen, sparsity, patch, sane, mode):
    q = trained_bottleneck(gen, sparsity, patch, mode, sane_index_shape=sane)
    z = torch.randn(2, 4, 6, 8, generator=gen)
    z_q, _, info = q(z)
    sites = 2 * (6 // patch) * (8 // patch)
    tokens = info[2]
    assert tokens.shape == ((2, 6 // patch, 8 // patch, 2 * sparsity) if sane else (sites, 2 * sparsity))
    assert ((tokens >= 0) & (tokens < q.vocab_size)).all()
    seq = info[2].view(2, -1)  # taming's Net2NetTransformer line
    assert seq.shape == (2, sites // 2 * q.tokens_per_site)
    decoded = q.get_codebook_entry(seq.reshape(-1), shape=(2, 6, 8, 4))
    assert torch.equal(decoded, z_q)  # exactly the forward's latent
    # the atom ids and quantised coefficients of info agree with the tokens
    idx, bins = q.codec.decode(tokens.reshape(-1, 2 * sparsity))
    assert torch.equal(idx, info.atom_indices.reshape(-1, sparsity))
    levels = q.coeff_quantizer.levels()
    used = idx >= 0
    assert torch.equal(info.coeffs.reshape(-1, sparsity)[used], levels[bins[used]])
    # per-site decoding (shape=None) gives the same latents site by site
    per_site = q.get_codebook_entry(tokens, None)
    assert per_site.shape == (*tokens.shape[:-1], 4 * patch * patch)


def test_early_stopped_sites_pad_and_still_round_trip(gen):
    q = trained_bottleneck(gen, 4)
    z = torch.randn(1, 4, 4, 4, generator=gen)
    z[0, :, 0, 0] = 0  # a zero site uses no atom
    z[0, :, 1, 1] = q.atoms()[3].detach() * 2  # exactly one atom
    z_q, _, info = q(z)
    tokens = info[2]
    pad = q.codec.pad_id
    assert (tokens[0] == pad).all()
    assert tokens[5, 0] == 3 and (tokens[5, 2:] == pad).all()
    assert torch.equal(q.get_codebook_entry(tokens.reshape(-1), (1, 4, 4, 4)), z_q)
    assert torch.equal(z_q[0, :, 0, 0], torch.zeros(4))


def test_real_model_stage2_pattern(gen):
    torch.manual_seed(0)
    model = build_autoencoder("dl", in_channels=3, hidden=16, res_hidden=8, n_res_blocks=1, n_e=32, e_dim=8,
                              sparsity=3, coeff_bins=8, coeff_quant="mulaw")
    x = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    model.train()
    model(x)
    model.eval()
    with torch.no_grad():
        quant_z, _, info = model.encode(x)
        indices = info[2].view(quant_z.shape[0], -1)  # taming: Net2NetTransformer.encode_to_z
        bhwc = (quant_z.shape[0], quant_z.shape[2], quant_z.shape[3], quant_z.shape[1])
        z = model.bottleneck.get_codebook_entry(indices.reshape(-1), shape=bhwc)  # taming: decode_to_img
        assert torch.equal(z, quant_z)
        assert torch.equal(model.decode(z), model(x)[0])


def test_bits_and_vocabulary_attributes():
    q = SparseDictBottleneck(512, 16, sparsity=5, coeff_bins=32)
    assert (q.vocab_size, q.tokens_per_site) == (512 + 32 + 1, 10)
    assert q.bits_per_site == pytest.approx(math.log2(512 * 511 * 510 * 509 * 508 / 120) + 5 * 5)
    plain = SparseDictBottleneck(512, 16, sparsity=5)
    assert (plain.vocab_size, plain.tokens_per_site, plain.bits_per_site) == (None, None, None)
    vq = VectorQuantizer(1024, 16)
    assert (vq.vocab_size, vq.tokens_per_site, vq.bits_per_site) == (1024, 1, 10)
    assert "coeff_quantizer" in repr(q) and "bins=32" in repr(q)


def test_training_forward_quantises_and_trains(gen):
    q = SparseDictBottleneck(24, 4, sparsity=3, coeff_bins=8)
    z = torch.randn(2, 4, 4, 4, generator=gen, requires_grad=True)
    z_q, loss, info = q(z)
    assert bool(q.coeff_quantizer.fitted)
    used = info.atom_indices >= 0
    levels = q.coeff_quantizer.levels()
    assert torch.isin(info.coeffs[used], levels).all()  # the decoder sees quantised coefficients
    (z_q.sum() + loss).backward()
    assert z.grad is not None and q.embedding.weight.grad is not None
    assert torch.isfinite(z.grad).all() and q.embedding.weight.grad.abs().sum() > 0


def test_state_dict_round_trip_keeps_tokens(gen):
    q = trained_bottleneck(gen, 3, mode="mulaw")
    other = SparseDictBottleneck(24, 4, sparsity=3, coeff_bins=16, coeff_quant="mulaw").eval()
    other.load_state_dict(q.state_dict())
    z = torch.randn(1, 4, 4, 4, generator=gen)
    assert torch.equal(other(z)[2][2], q(z)[2][2])
    assert {"coeff_quantizer.low", "coeff_quantizer.high", "coeff_quantizer.fitted"} <= set(q.state_dict())


def test_bad_token_inputs_give_clear_errors(gen):
    q = trained_bottleneck(gen, 3)
    z = torch.randn(1, 4, 4, 4, generator=gen)
    tokens = q(z)[2][2]
    flat = tokens.reshape(-1)
    with pytest.raises(ValueError, match="6 tokens per site"):
        q.get_codebook_entry(flat[:-1], (1, 4, 4, 4))
    with pytest.raises(ValueError, match="holds 16 coded sites"):
        q.get_codebook_entry(flat[:-6], (1, 4, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, H, W, 4\)"):
        q.get_codebook_entry(flat, (1, 4, 4, 5))
    bad = flat.clone()
    bad[0] = q.vocab_size
    with pytest.raises(ValueError, match="vocab_size"):
        q.get_codebook_entry(bad, (1, 4, 4, 4))
    with pytest.raises(TypeError, match="integer"):
        q.get_codebook_entry(flat.float(), (1, 4, 4, 4))
    with pytest.raises(ValueError, match=r"\(\.\.\., 6\)"):
        q.get_codebook_entry(tokens[:, :4], None)
    with pytest.raises(RuntimeError, match="never fitted"):
        SparseDictBottleneck(24, 4, sparsity=3, coeff_bins=8).eval()(z)
    with pytest.raises(ValueError, match="coeff_quant"):
        SparseDictBottleneck(24, 4, coeff_bins=8, coeff_quant="log")
    with pytest.raises(ValueError, match="bins"):
        SparseDictBottleneck(24, 4, coeff_bins=1)


def test_compiled_forward_with_tokens_matches_eager(gen):
    q = trained_bottleneck(gen, 3)
    z = torch.randn(2, 4, 4, 4, generator=gen)
    eager = q(z)
    compiled = torch.compile(q, fullgraph=True, backend="eager")(z)
    assert torch.equal(compiled[0], eager[0]) and torch.equal(compiled[2][2], eager[2][2])


# ------------------------------------------------------------------------- issue 21: the state contract and the edges
def test_state_dict_records_bins_mode_and_mu(gen):
    """A state saved with one coefficient scheme must not load into a module with another: its bins would decode to
    other levels (z_q silently changed)."""
    q = trained_bottleneck(gen, 3, mode="uniform", bins=16)
    state = q.state_dict()
    assert "coeff_quantizer.scheme" in state
    for bins, mode, match in [(8, "uniform", "bins=16"), (16, "mulaw", "mode='uniform'")]:
        other = SparseDictBottleneck(24, 4, sparsity=3, coeff_bins=bins, coeff_quant=mode)
        with pytest.raises(RuntimeError, match=match):
            other.load_state_dict(state)
        with pytest.raises(RuntimeError, match=match):  # not even a non-strict load accepts it
            other.load_state_dict(state, strict=False)
    mulaw = CoefficientQuantizer(16, "mulaw", mu=255.0).fit(torch.tensor([-1.0, 2.0]))
    with pytest.raises(RuntimeError, match="mu=255"):
        CoefficientQuantizer(16, "mulaw", mu=100.0).load_state_dict(mulaw.state_dict())
    CoefficientQuantizer(16, "uniform", mu=100.0).load_state_dict(  # mu means nothing to uniform levels
        CoefficientQuantizer(16, "uniform").fit(torch.tensor([0.0, 1.0])).state_dict())
    same = SparseDictBottleneck(24, 4, sparsity=3, coeff_bins=16).eval()
    same.load_state_dict(state)
    z = torch.randn(1, 4, 4, 4, generator=gen)
    assert torch.equal(same(z)[0], q(z)[0])
    buf = io.BytesIO()  # and through a file, as checkpoints travel
    torch.save(state, buf)
    buf.seek(0)
    with pytest.raises(RuntimeError, match="bins=16"):
        SparseDictBottleneck(24, 4, sparsity=3, coeff_bins=8).load_state_dict(torch.load(buf, weights_only=True))


def test_state_without_a_scheme_record_loads_with_a_warning(gen):
    q = fitted(16, "mulaw", low=-0.7, high=1.9)
    legacy = {k: v for k, v in q.state_dict().items() if k != "scheme"}  # saved before the record existed
    other = CoefficientQuantizer(16, "mulaw")
    with pytest.warns(UserWarning, match="cannot check"):
        other.load_state_dict(legacy)
    assert torch.equal(other.levels(), q.levels())


def test_first_training_batches_without_used_slots_leave_the_range_unfitted(gen):
    q = SparseDictBottleneck(24, 4, sparsity=3, coeff_bins=8, tol=1e9).train()  # every site stops before an atom
    z_q, loss, info = q(torch.randn(2, 4, 4, 4, generator=gen))
    assert not bool(q.coeff_quantizer.fitted)  # nothing seen, nothing fitted
    assert (info[2] == q.codec.pad_id).all() and torch.equal(z_q, torch.zeros_like(z_q))
    q(torch.zeros(2, 4, 4, 4))  # zero latents: no used slot either
    assert not bool(q.coeff_quantizer.fitted)
    q.tol = None
    z = torch.randn(2, 4, 4, 4, generator=gen)
    _, _, info = q(z)  # the first batch with used slots sets the range
    used = info.atom_indices >= 0
    assert bool(q.coeff_quantizer.fitted)
    assert q.coeff_quantizer.low.item() == pytest.approx(info.coeffs[used].min().item(), abs=1e-6)
    q.eval()
    assert torch.equal(q.get_codebook_entry(q(z)[2][2].reshape(-1), (2, 4, 4, 4)), q(z)[0])


def test_bins_are_limited_to_what_float32_levels_tell_apart():
    for bins in (2**24 + 1, 2**30):
        with pytest.raises(ValueError, match=r"2\*\*24"):
            CoefficientQuantizer(bins)
        with pytest.raises(ValueError, match=r"2\*\*24"):
            SparseDictBottleneck(24, 4, coeff_bins=bins)
    b = 2**24
    q = CoefficientQuantizer(b).fit(torch.tensor([-1.0, 1.0]))
    c = torch.tensor([-5.0, -1.0, 0.3, 1.0, 7.0])
    got = q.quantize(c)
    assert got[[0, 1]].tolist() == [0, 0] and got[[3, 4]].tolist() == [b - 1, b - 1]
    step = 2.0 / (b - 1)
    assert abs(q.dequantize(got[2:3]).item() - 0.3) <= step  # the nearest level, to float32 precision


def test_compiled_eval_with_an_unfitted_range_is_not_silent(gen):
    q = SparseDictBottleneck(24, 4, sparsity=3, coeff_bins=8).eval()
    z = torch.randn(1, 4, 4, 4, generator=gen)
    with pytest.raises(RuntimeError, match="never fitted"):
        torch.compile(q, fullgraph=True, backend="eager")(z)
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="never fitted"):
        torch.compile(q, backend="eager")(z)
    torch._dynamo.reset()
    fitted_q = trained_bottleneck(gen, 3, bins=8)
    compiled = torch.compile(fitted_q, fullgraph=True, backend="eager")
    compiled(z)
    fitted_q.coeff_quantizer.fitted.fill_(False)  # the range reset after compiling: the compiled graph checks too
    with pytest.raises(RuntimeError, match="never fitted"):
        compiled(z)
    torch._dynamo.reset()


def test_extreme_ranges_give_finite_levels(gen):
    big = 3e38
    q = fitted(9, low=-big, high=big)
    levels = q.levels()
    assert torch.isfinite(levels).all()
    np.testing.assert_allclose(levels.double().numpy(), np.linspace(-big, big, 9), rtol=1e-6)
    assert torch.equal(q.quantize(levels), torch.arange(9))
    assert torch.equal(q.quantize(torch.tensor([-3.4e38, 0.0, 3.4e38])), torch.tensor([0, 4, 8]))
    m = fitted(16, "mulaw", low=-big, high=big)
    assert torch.isfinite(m.levels()).all() and torch.equal(m.quantize(m.levels()), torch.arange(16))


@pytest.mark.parametrize("bad", [-1, 8, 100])
def test_dequantize_rejects_bins_outside_the_range(bad):
    q = fitted(8)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        q.dequantize(torch.tensor([0, bad, 3]))
    assert q.dequantize(torch.tensor([], dtype=torch.long)).shape == (0,)


@pytest.mark.parametrize("indices, bins, match", [
    ([[37, 0]], [[0, 0]], r"atom indices must be in \[-1, 37\)"),    # atom id past K
    ([[-2, 0]], [[0, 0]], r"atom indices must be in \[-1, 37\)"),    # below the unused mark
    ([[3, 0]], [[8, 0]], r"bins must be in \[0, 8\)"),               # bin past B on a used slot
    ([[3, 1]], [[0, -1]], r"bins must be in \[0, 8\)"),              # negative bin on a used slot
    ([[-1, 4]], [[0, 0]], "after an unused slot"),                     # a used slot after an unused one
])
def test_codec_encode_rejects_what_decode_would(indices, bins, match):
    codec = TokenCodec(37, 8, 2)
    with pytest.raises(ValueError, match=match):
        codec.encode(torch.tensor(indices), torch.tensor(bins))
    ok = codec.encode(torch.tensor([[3, -1]]), torch.tensor([[7, 99]]))  # an unused slot's bin is not looked at
    assert torch.equal(ok, torch.tensor([[3, 44, 45, 45]]))
    assert torch.equal(codec.decode(ok)[0], torch.tensor([[3, -1]]))
    with pytest.raises(TypeError, match="integer"):
        codec.encode(torch.tensor([[3.0, 1.0]]), torch.tensor([[0, 0]]))


def test_encoded_random_codes_always_decode(gen):
    codec = TokenCodec(11, 5, 4)
    for _ in range(20):
        indices = torch.randint(-3, 14, (50, 4), generator=gen)
        bins = torch.randint(-2, 7, (50, 4), generator=gen)
        try:
            tokens = codec.encode(indices, bins)
        except ValueError:
            continue
        idx, got = codec.decode(tokens)  # whatever encode emits, decode takes back
        assert torch.equal(idx, indices)


@pytest.mark.parametrize("bins", [1, 0, True])
def test_codec_needs_two_bins(bins):
    with pytest.raises(ValueError, match="bins"):
        TokenCodec(10, bins, 2)


# ------------------------------------------------------------------------------ issue 26: per-slot ranges and rate
def test_rate_counts_the_support_as_a_set_or_in_order():
    # K=4 atoms, B=2 bins, S=2 slots: by hand, a set of 2 of 4 atoms (6) times 2 bins each (4) = 24 codes; in order
    # 4 * 3 = 12 supports, 48 codes
    assert TokenCodec(4, 2, 2).bits_per_site == pytest.approx(math.log2(24))
    assert TokenCodec(4, 2, 2, ordered=True).bits_per_site == pytest.approx(math.log2(48))
    assert (TokenCodec(4, 2, 2).support, TokenCodec(4, 2, 2, ordered=True).support) == ("set", "ordered")
    # brute force: distinct latents of generic atoms and shared levels = the set count
    atoms, levels = torch.randn(4, 6, dtype=torch.float64), torch.tensor([0.3, -1.7], dtype=torch.float64)
    codes = {tuple(torch.round((levels[b1] * atoms[a1] + levels[b2] * atoms[a2]) * 1e9).tolist())
             for a1 in range(4) for a2 in range(4) if a1 != a2 for b1 in range(2) for b2 in range(2)}
    assert len(codes) == 24
    assert TokenCodec(512, 16, 1).bits_per_site == pytest.approx(13.0)  # S = 1: both counts are log2 K + log2 B
    with pytest.raises(ValueError, match="sparsity must be <= atoms"):
        TokenCodec(3, 4, 4)
    q = SparseDictBottleneck(64, 8, sparsity=3, coeff_bins=16, coeff_per_slot=True)
    assert q.codec.support == "ordered"
    assert q.bits_per_site == pytest.approx(math.log2(64 * 63 * 62) + 12)


def test_per_slot_levels_are_the_nearest_of_their_slot(gen):
    q = CoefficientQuantizer(8, slots=3)
    q.fit(torch.tensor([[-4.0, -1.0, 0.0], [4.0, 1.0, 0.5]]))
    assert q.levels().shape == (3, 8)
    np.testing.assert_allclose(q.levels().numpy(), np.stack([np.linspace(lo, hi, 8) for lo, hi in
                                                             [(-4, 4), (-1, 1), (0, 0.5)]]), atol=1e-6)
    c = torch.empty(2000, 3).uniform_(-5, 5, generator=gen)
    got = q.quantize(c)
    levels = q.levels().numpy()
    for j in range(3):  # brute force per slot
        err = np.abs(c[:, j].numpy()[:, None] - levels[j][None, :])
        best = err.min(1)
        assert np.all(np.abs(err[np.arange(2000), got[:, j].numpy()] - best) < 1e-5)
    assert torch.equal(q.dequantize(got), torch.from_numpy(levels)[torch.arange(3), got])
    with pytest.raises(ValueError, match="3 slots as their last dimension"):
        q.quantize(torch.zeros(5, 2))
    assert "slots=3" in repr(q)


def test_per_slot_moving_average_by_hand():
    q = CoefficientQuantizer(8, decay=0.5, slots=3)
    valid = torch.tensor([[True, True, False], [True, False, False]])
    q.observe(torch.tensor([[2.0, -1.0, 9.0], [-3.0, 5.0, 9.0]]), valid)
    # slot 0 saw {2, -3}, slot 1 saw {-1}, slot 2 nothing: it takes the batch's whole range [-3, 2]
    assert q.low.tolist() == [-3.0, -1.0, -3.0] and q.high.tolist() == [2.0, -1.0, 2.0]
    assert q.fitted.tolist() == [True, True, True]
    q.observe(torch.tensor([[1.0, 1.0, 4.0]]), torch.tensor([[False, True, True]]))
    assert q.low.tolist() == [-3.0, 0.0, 0.5] and q.high.tolist() == [2.0, 0.0, 3.0]  # slot 0 unseen: unchanged


def test_per_slot_fit_and_scheme_record(gen):
    c = torch.randn(3000, 2, generator=gen) * torch.tensor([3.0, 0.5])
    valid = torch.ones(3000, 2, dtype=torch.bool)
    valid[:, 1] = False
    q = CoefficientQuantizer(16, slots=2).fit(c, valid)
    assert q.low[0].item() == pytest.approx(c[:, 0].min().item()) and q.high[0].item() == pytest.approx(
        c[:, 0].max().item())
    assert q.low[1].item() == q.low[0].item()  # a slot without data takes every slot's range
    with pytest.raises(RuntimeError, match="a range per slot"):
        CoefficientQuantizer(16).load_state_dict(q.state_dict())
    other = CoefficientQuantizer(16, slots=2)
    other.load_state_dict(q.state_dict())
    assert torch.equal(other.levels(), q.levels())


@pytest.mark.parametrize("sparsity, patch, mode", [(2, 1, "uniform"), (4, 2, "mulaw")])
def test_per_slot_bottleneck_round_trip_is_exact(gen, sparsity, patch, mode):
    q = trained_bottleneck(gen, sparsity, patch, mode, coeff_per_slot=True)
    assert q.coeff_quantizer.low.shape == (sparsity,)
    z = torch.randn(2, 4, 4, 8, generator=gen)
    z_q, _, info = q(z)
    assert torch.equal(q.get_codebook_entry(info[2].reshape(-1), (2, 4, 8, 4)), z_q)
    idx, bins = q.codec.decode(info[2].reshape(-1, 2 * sparsity))
    levels = q.coeff_quantizer.levels()  # (S, B)
    used = idx >= 0
    slot = torch.arange(sparsity).expand_as(idx)
    assert torch.equal(info.coeffs.reshape(-1, sparsity)[used], levels[slot[used], bins[used]])


# ------------------------------------------------------------------------------------------------ Lloyd-Max levels
def test_lloyd_fit_by_hand():
    # data {0, 0, 0, 1, 1, 10}, B = 2: uniform start {0, 10}; the midpoint 5 splits {0, 0, 0, 1, 1} | {10}: levels
    # {0.4, 10}, then stable
    q = CoefficientQuantizer(2, "lloyd").fit(torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 10.0]))
    torch.testing.assert_close(q.levels(), torch.tensor([0.4, 10.0]))
    assert q.quantize(torch.tensor([5.3, 5.1, -3.0, 40.0])).tolist() == [1, 0, 0, 1]  # the midpoint is 5.2
    assert "lloyd" in repr(q)


def test_lloyd_levels_against_a_brute_force_lloyd(gen):
    c = torch.randn(4000, generator=gen, dtype=torch.float64) ** 3  # heavy-tailed, as OMP's coefficients
    q = CoefficientQuantizer(8, "lloyd", lloyd_iters=50)
    q.low, q.high, q.table = q.low.double(), q.high.double(), q.table.double()
    q.fit(c)
    levels = torch.linspace(float(c.min()), float(c.max()), 8, dtype=torch.float64)
    for _ in range(50):  # the textbook iteration: nearest level by brute force, then each level its cell's mean
        owner = (c[:, None] - levels[None, :]).abs().argmin(1)
        levels = torch.stack([c[owner == j].mean() if (owner == j).any() else levels[j] for j in range(8)])
        levels = levels.sort().values
    torch.testing.assert_close(q.levels(), levels)
    # the nearest level, by brute force
    x = torch.randn(500, generator=gen, dtype=torch.float64) * 3
    err = (x[:, None] - q.levels()[None, :]).abs()
    got = q.quantize(x)
    assert torch.allclose(err[torch.arange(500), got], err.min(1).values)


def test_lloyd_moving_average_step_by_hand():
    q = CoefficientQuantizer(2, "lloyd", decay=0.5)
    # range [0, 10] (centre 5, half-width 5): relative values {-1, -.8, 1}; uniform {-1, 1}, then half way to the
    # cells' means {-.9, 1}: {-.95, 1}, i.e. levels {0.25, 10}
    q.observe(torch.tensor([0.0, 1.0, 10.0]))
    torch.testing.assert_close(q.table, torch.tensor([-0.95, 1.0]))
    torch.testing.assert_close(q.levels(), torch.tensor([0.25, 10.0]))
    # the range moves half way to [2, 2]: [1, 6] (centre 3.5, half-width 2.5); 2 is relative -.6, nearest -.95:
    # -.95 -> (-.95 - .6) / 2 = -.775, the level 3.5 - 2.5 * .775 = 1.5625; the top level follows the range to 6
    q.observe(torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(q.table, torch.tensor([-0.775, 1.0]))
    torch.testing.assert_close(q.levels(), torch.tensor([1.5625, 6.0]))


@pytest.mark.parametrize("per_slot", [False, True])
def test_lloyd_bottleneck_round_trip_and_state(gen, per_slot):
    q = trained_bottleneck(gen, 3, mode="lloyd", coeff_per_slot=per_slot)
    assert q.coeff_quantizer.table.shape == ((3, 16) if per_slot else (16,))
    z = torch.randn(2, 4, 4, 4, generator=gen)
    z_q, _, info = q(z)
    assert torch.equal(q.get_codebook_entry(info[2].reshape(-1), (2, 4, 4, 4)), z_q)
    other = SparseDictBottleneck(24, 4, sparsity=3, coeff_bins=16, coeff_quant="lloyd", coeff_per_slot=per_slot)
    other.load_state_dict(q.state_dict())
    assert torch.equal(other.eval()(z)[0], z_q)
    with pytest.raises(RuntimeError, match="mode='lloyd'"):
        SparseDictBottleneck(24, 4, sparsity=3, coeff_bins=16, coeff_per_slot=per_slot).load_state_dict(
            q.state_dict(), strict=False)
