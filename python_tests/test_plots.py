"""lasers_ext.training.plots: every function writes a readable PNG; the pixel grids have exact geometry and content."""

import math

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from PIL import Image
from sklearn.decomposition import PCA

from lasers_ext.training.plots import (
    _pca_2d,
    _savgol_window,
    _square_shape,
    plot_atom_embedding,
    plot_training_curves,
    save_atom_images,
    save_flip_heatmaps,
    save_image_grid,
    save_reconstruction_grid,
)


def _quantised(gen, *shape):
    """Random images whose values are multiples of 1/255, so the PNG holds them exactly."""
    return torch.randint(0, 256, shape, generator=gen).float() / 255


def _read(path):
    with Image.open(path) as image:
        image.load()
    assert image.width > 0 and image.height > 0
    return image


@pytest.mark.parametrize(("b", "c", "nrow", "pad"), [(5, 3, 3, 2), (4, 1, 8, 0), (1, 3, 1, 1), (7, 1, 2, 3)])
def test_save_image_grid_geometry_and_pixels(gen, tmp_path, b, c, nrow, pad):
    h, w = 5, 7
    images = _quantised(gen, b, c, h, w)
    path = save_image_grid(images, tmp_path / "new" / "dir" / "grid.png", nrow=nrow, pad=pad)
    image = _read(path)
    assert path == tmp_path / "new" / "dir" / "grid.png"
    assert image.mode == ("L" if c == 1 else "RGB")
    cols = min(nrow, b)
    rows = math.ceil(b / cols)
    assert image.size == (cols * (w + pad) + pad, rows * (h + pad) + pad)
    pixels = np.asarray(image).reshape(image.height, image.width, c)
    expected = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    background = np.ones(pixels.shape[:2], dtype=bool)
    for i in range(b):
        top, left = pad + (i // cols) * (h + pad), pad + (i % cols) * (w + pad)
        np.testing.assert_array_equal(pixels[top:top + h, left:left + w], expected[i])
        background[top:top + h, left:left + w] = False
    assert (pixels[background] == 0).all()  # padding and unused slots are black


def test_save_image_grid_clamps_and_rejects_bad_input(tmp_path):
    image = _read(save_image_grid(torch.tensor([-1.0, 0.5, 2.0]).view(1, 1, 1, 3), tmp_path / "g.png", pad=0))
    assert np.asarray(image).tolist() == [[0, 128, 255]]
    for bad in (torch.rand(3, 8, 8), torch.rand(2, 2, 8, 8), torch.rand(0, 3, 8, 8),
                torch.full((1, 3, 4, 4), float("nan")), torch.ones(1, 3, 4, 4, dtype=torch.int64)):
        with pytest.raises(ValueError):
            save_image_grid(bad, tmp_path / "bad.png")
    with pytest.raises(ValueError):
        save_image_grid(torch.rand(2, 3, 4, 4), tmp_path / "bad.png", nrow=0)
    with pytest.raises(ValueError):
        save_image_grid(torch.rand(2, 3, 4, 4), tmp_path / "bad.png", pad=-1)


@pytest.mark.parametrize("c", [1, 3])
def test_save_reconstruction_grid(gen, tmp_path, c):
    x = torch.rand(10, c, 16, 16, generator=gen)
    recs = {"VQ-VAE": x.flip(-1), "DL-VAE": (x + 0.05).clamp(0, 1)}
    two = _read(save_reconstruction_grid(x, recs, tmp_path / "rec.png", max_images=4))
    one = _read(save_reconstruction_grid(x, x, tmp_path / "sub" / "rec1.png"))
    assert two.mode == one.mode == "RGBA"
    assert two.height > one.height  # three labelled rows against two
    with pytest.raises(ValueError, match="shape"):
        save_reconstruction_grid(x, {"bad": x[:5]}, tmp_path / "bad.png")
    with pytest.raises(ValueError):
        save_reconstruction_grid(x, {}, tmp_path / "bad.png")
    with pytest.raises(ValueError):
        save_reconstruction_grid(x, x, tmp_path / "bad.png", max_images=0)


def test_save_flip_heatmaps_uses_magma(tmp_path):
    ramp = torch.linspace(0, 1, 24).expand(3, 24, 24)
    maps = {"zero": torch.zeros(3, 24, 24), "one": torch.ones(3, 24, 24), "ramp": ramp}
    image = _read(save_flip_heatmaps(maps, tmp_path / "flip.png"))
    colours = {tuple(p) for p in np.asarray(image.convert("RGB")).reshape(-1, 3)}
    magma = colormaps["magma"]
    for value in (0.0, 1.0):
        assert tuple(magma(value, bytes=True)[:3]) in colours  # black (no error) and pale yellow
    assert _read(save_flip_heatmaps(torch.rand(2, 10, 30), tmp_path / "one.png")).mode == "RGBA"
    for bad in ({"a": torch.rand(2, 1, 8, 8)}, {"a": torch.rand(2, 8, 8), "b": torch.rand(3, 8, 8)}, {},
                torch.full((1, 8, 8), float("inf"))):
        with pytest.raises(ValueError):
            save_flip_heatmaps(bad, tmp_path / "bad.png")


def test_savgol_window():
    assert _savgol_window(4) is None
    assert _savgol_window(5) == 5
    assert _savgol_window(100) == 11
    assert _savgol_window(1000) == 101
    for n in range(5, 400):
        window = _savgol_window(n)
        assert window % 2 == 1 and 4 <= window <= n


def test_plot_training_curves(gen, tmp_path):
    steps = range(0, 3000, 10)
    noise = torch.randn(2, len(steps), generator=gen).tolist()
    runs = {
        "VQ-VAE": [{"step": s, "psnr": 20 + s / 1000 + e, "perplexity": 275 + 10 * e} for s, e in zip(steps, noise[0])],
        "DL-VAE": [{"step": s, "psnr": 25 + s / 800 + e, "perplexity": 507 + 10 * e} for s, e in zip(steps, noise[1])],
        "short": [{"step": 0, "psnr": 10.0}, {"step": 5, "psnr": float("nan")},
                  {"step": 10, "psnr": torch.tensor(12.0)}, {"step": 20, "loss": 1.0}],
    }
    image = _read(plot_training_curves(runs, tmp_path / "curves.png"))
    raw = _read(plot_training_curves(runs, tmp_path / "raw.png", keys=("psnr", "perplexity", "loss"), smooth=False))
    assert image.mode == raw.mode == "RGBA" and raw.width > image.width  # one subplot per key
    _read(plot_training_curves({"few": [{"step": 1, "psnr": 3.0}]}, tmp_path / "few.png", keys=("psnr", "fid")))
    with pytest.raises(ValueError, match="step"):
        plot_training_curves({"bad": [{"psnr": 1.0}]}, tmp_path / "bad.png")
    with pytest.raises(ValueError):
        plot_training_curves({}, tmp_path / "bad.png")


def test_square_shape():
    assert [_square_shape(m) for m in (1, 7, 12, 16, 64, 96)] == [(1, 1), (1, 7), (3, 4), (4, 4), (8, 8), (8, 12)]


def test_save_atom_images_geometry_and_tiles(gen, tmp_path):
    k = 10
    atoms = torch.randn(k, 16, generator=gen)
    atoms[3] = 0.7  # constant atom: drawn black
    image = _read(save_atom_images(atoms, tmp_path / "atoms.png"))
    tile, pad, cols, rows = 4 * 8, 2, 4, 3  # 4x4 atoms enlarged 8x, ceil(sqrt(10)) = 4 columns
    assert image.mode == "RGB" and image.size == (cols * (tile + pad) + pad, rows * (tile + pad) + pad)
    pixels = np.asarray(image)
    for i in range(k):
        top, left = pad + (i // cols) * (tile + pad), pad + (i % cols) * (tile + pad)
        a = atoms[i].double().reshape(4, 4)
        expected = torch.zeros(4, 4) if i == 3 else (a - a.min()) / (a.max() - a.min())
        expected = (expected * 255).round().to(torch.uint8).repeat_interleave(8, 0).repeat_interleave(8, 1)
        for ch in range(3):
            np.testing.assert_array_equal(pixels[top:top + tile, left:left + tile, ch], expected.numpy())
    wide = _read(save_atom_images(atoms, tmp_path / "wide.png", shape=(2, 8)))
    assert wide.size == (cols * (8 * 4 + pad) + pad, rows * (2 * 4 + pad) + pad)
    with pytest.raises(ValueError, match="does not hold"):
        save_atom_images(atoms, tmp_path / "bad.png", shape=(3, 5))
    with pytest.raises(ValueError):
        save_atom_images(atoms[0], tmp_path / "bad.png")


def test_pca_matches_sklearn(gen):
    atoms = torch.randn(40, 16, generator=gen, dtype=torch.float64) * torch.linspace(3, 0.5, 16, dtype=torch.float64)
    coords, explained = _pca_2d(atoms)
    pca = PCA(n_components=2, svd_solver="full").fit(atoms.numpy())
    reference = pca.transform(atoms.numpy())
    signs = np.sign((coords * reference).sum(0))  # principal axes are defined up to sign
    np.testing.assert_allclose(coords * signs, reference, atol=1e-10)
    np.testing.assert_allclose(explained, pca.explained_variance_ratio_, rtol=1e-10)


def test_plot_atom_embedding(gen, tmp_path):
    atoms = torch.randn(64, 16, generator=gen)
    usage = torch.randint(0, 50, (64,), generator=gen)
    usage[:5] = 0
    assert _read(plot_atom_embedding(atoms, tmp_path / "emb.png", usage=usage, title="DL-VAE atoms")).mode == "RGBA"
    assert _read(plot_atom_embedding(atoms, tmp_path / "plain.png")).mode == "RGBA"
    _read(plot_atom_embedding(torch.ones(3, 4), tmp_path / "constant.png"))  # no variance at all
    with pytest.raises(ValueError):
        plot_atom_embedding(atoms[:1], tmp_path / "bad.png")
    with pytest.raises(ValueError):
        plot_atom_embedding(atoms, tmp_path / "bad.png", usage=usage[:10])
    with pytest.raises(ValueError):
        plot_atom_embedding(atoms, tmp_path / "bad.png", usage=-usage - 1)
