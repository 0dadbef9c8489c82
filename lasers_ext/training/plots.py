"""Pictures of training runs: image grids, labelled reconstruction rows, FLIP heatmaps (paper Figs. 9-12), training
curves smoothed with a Savitzky-Golay filter (Fig. 4), dictionary atoms as tiles and their 2-D embedding (Figs. 7/8).

Every function writes one PNG to ``path`` (creating parent directories) and returns it as a Path. Figures are built
on ``matplotlib.figure.Figure`` with an explicit Agg canvas, never through pyplot, so the caller's backend and global
matplotlib state are untouched; pixel grids are written with PIL.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from scipy.signal import savgol_filter
from torch import Tensor

__all__ = ["latent_top_component", "plot_atom_embedding", "plot_rate_distortion", "plot_sweep", "plot_training_curves",
           "save_atom_images", "save_flip_heatmaps", "save_image_grid", "save_latent_components",
           "save_reconstruction_grid"]

_SAVGOL_POLYORDER = 2
_ATOM_TILE_PX = 32  # atoms are enlarged (nearest neighbour, integer factor) to about this many pixels
_ATOM_PAD_RGB = (60, 100, 160)  # separator colour between atom tiles, distinct from any gray level


def _prepare(path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _check_images(images: Tensor, name: str = "images") -> None:
    """Raise ValueError unless ``images`` is a non-empty, finite, floating (B, C, H, W) tensor with C in {1, 3}."""
    if images.ndim != 4 or images.shape[1] not in (1, 3) or 0 in images.shape:
        raise ValueError(f"{name} must have a non-empty shape (B, C, H, W) with C = 1 or 3, got {tuple(images.shape)}")
    if not images.is_floating_point() or not torch.isfinite(images).all():
        raise ValueError(f"{name} must be finite floating-point values in [0, 1]")


def _labelled(entries: Mapping[str, Tensor] | Tensor, default: str) -> list[tuple[str, Tensor]]:
    """(label, tensor) pairs from a dict or from a single tensor labelled ``default``."""
    pairs = list(entries.items()) if isinstance(entries, Mapping) else [(default, entries)]
    if not pairs:
        raise ValueError("no entries to draw")
    return pairs


def _grid(images: Tensor, nrow: int, pad: int, pad_value: tuple[int, ...] = (0,)) -> np.ndarray:
    """Tile (B, C, H, W) images in [0, 1] into one (H', W', C) uint8 array, torchvision ``make_grid`` layout:
    min(nrow, B) columns, ceil(B / columns) rows, ``pad`` pixels of ``pad_value`` around and between tiles; pixels
    are round(255 * clamp(x, 0, 1))."""
    if nrow < 1 or pad < 0:
        raise ValueError(f"need nrow >= 1 and pad >= 0, got nrow={nrow}, pad={pad}")
    b, c, h, w = images.shape
    cols = min(nrow, b)
    rows = math.ceil(b / cols)
    tiles = (images.detach().cpu().double().clamp(0, 1) * 255 + 0.5).floor().to(torch.uint8).permute(0, 2, 3, 1)
    out = np.empty((rows * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.uint8)
    out[:] = np.asarray(pad_value, dtype=np.uint8)
    for i, tile in enumerate(tiles.numpy()):
        top, left = pad + (i // cols) * (h + pad), pad + (i % cols) * (w + pad)
        out[top:top + h, left:left + w] = tile
    return out


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _hide_frame(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def save_image_grid(images: Tensor, path: str | Path, nrow: int = 8, pad: int = 2) -> Path:
    """Write images (B, C, H, W) in [0, 1] as one PNG grid with ``nrow`` images per row and black ``pad``-pixel
    borders: size (rows * (H + pad) + pad) x (min(nrow, B) * (W + pad) + pad), rows = ceil(B / min(nrow, B));
    mode "L" for C = 1, "RGB" for C = 3. Values outside [0, 1] are clamped."""
    _check_images(images)
    grid = _grid(images, nrow, pad)
    path = _prepare(path)
    Image.fromarray(grid[..., 0] if grid.shape[2] == 1 else grid).save(path)
    return path


def save_reconstruction_grid(originals: Tensor, reconstructions: Mapping[str, Tensor] | Tensor, path: str | Path,
                             max_images: int = 8) -> Path:
    """One labelled row of the first ``max_images`` originals (B, C, H, W), then one row per model's reconstructions
    (same shape; a bare tensor is labelled "reconstruction")."""
    _check_images(originals, "originals")
    if max_images < 1:
        raise ValueError(f"max_images must be positive, got {max_images}")
    rows = [("original", originals), *_labelled(reconstructions, "reconstruction")]
    for label, images in rows[1:]:
        _check_images(images, f"reconstructions[{label!r}]")
        if images.shape != originals.shape:
            raise ValueError(f"reconstructions[{label!r}] has shape {tuple(images.shape)}, originals "
                             f"{tuple(originals.shape)}")
    return _save_rows(rows, path, max_images)


def _save_rows(rows: list[tuple[str, Tensor]], path: str | Path, max_images: int = 8) -> Path:
    """Labelled rows of images (all of one shape (B, C, H, W) in [0, 1]), the first ``max_images`` of each."""
    n = min(max_images, rows[0][1].shape[0])
    strips = [_grid(images[:n], nrow=n, pad=2) for _, images in rows]
    scale = max(1.0, 64 / rows[0][1].shape[2]) / 100  # inches per pixel: small images are enlarged
    height, width = strips[0].shape[:2]
    fig = _new_figure(width * scale + 1.2, len(rows) * (height * scale + 0.1) + 0.2)
    for ax, (label, _), strip in zip(fig.subplots(len(rows), 1, squeeze=False)[:, 0], rows, strips):
        ax.imshow(strip[..., 0] if strip.shape[2] == 1 else strip, cmap="gray", vmin=0, vmax=255,
                  interpolation="nearest")
        _hide_frame(ax)
        ax.set_ylabel(label)
    path = _prepare(path)
    fig.savefig(path)
    return path


def save_flip_heatmaps(error_maps: Mapping[str, Tensor] | Tensor, path: str | Path) -> Path:
    """FLIP error maps (B, H, W) in [0, 1] drawn with the magma colormap (black = no error, as in the paper's
    figures), one row per model (a bare tensor is labelled "FLIP"), each map titled with its mean, one colour bar."""
    rows = _labelled(error_maps, "FLIP")
    shape = rows[0][1].shape
    for label, maps in rows:
        if maps.ndim != 3 or 0 in maps.shape or maps.shape != shape:
            raise ValueError(f"error maps must all have one non-empty shape (B, H, W); {label!r} has "
                             f"{tuple(maps.shape)}, the first {tuple(shape)}")
        if not maps.is_floating_point() or not torch.isfinite(maps).all():
            raise ValueError(f"error maps {label!r} must be finite floating-point values")
    b, h, w = shape
    tile = max(1.2, min(2.5, w / 64))
    fig = _new_figure(b * tile + 1.6, len(rows) * tile * h / w + 0.4)
    axes = fig.subplots(len(rows), b, squeeze=False)
    for row, (label, maps) in zip(axes, rows):
        for ax, m in zip(row, maps.detach().cpu().float().numpy()):
            image = ax.imshow(m, cmap="magma", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"{m.mean():.3f}", fontsize=8)
            _hide_frame(ax)
        row[0].set_ylabel(label)
    fig.colorbar(image, ax=axes, label="FLIP error", shrink=0.9)
    path = _prepare(path)
    fig.savefig(path)
    return path


def _savgol_window(n: int, polyorder: int = _SAVGOL_POLYORDER) -> int | None:
    """Savitzky-Golay window for n points: about n / 10, odd, at least polyorder + 2; None if n is too small."""
    window = max(n // 10, polyorder + 2)
    window += 1 - window % 2
    return window if window <= n else None


def plot_training_curves(runs: Mapping[str, Sequence[Mapping]], path: str | Path,
                         keys: Sequence[str] = ("psnr", "perplexity"), smooth: bool = True) -> Path:
    """One subplot per key against "step" for every run (records like {"step": int, "psnr": float, ...}), as the
    paper's Figure 4: raw values faint and a Savitzky-Golay smoothed line (polyorder 2, window about a tenth of the
    points), or the raw line alone when ``smooth`` is False or a run has too few points. Records without the key or
    with a non-finite value are skipped."""
    if not runs or not keys:
        raise ValueError("need at least one run and one key")
    fig = _new_figure(4.8 * len(keys), 3.6)
    for ax, key in zip(fig.subplots(1, len(keys), squeeze=False)[0], keys):
        for i, (name, records) in enumerate(runs.items()):
            if any("step" not in r for r in records):
                raise ValueError(f"every record needs a 'step'; run {name!r} has one without")
            points = sorted((float(r["step"]), float(r[key])) for r in records if key in r)
            points = np.array([p for p in points if math.isfinite(p[1])]).reshape(-1, 2)
            if len(points) == 0:
                continue
            steps, values = points.T
            window = _savgol_window(len(values)) if smooth else None
            if window is None:
                ax.plot(steps, values, color=f"C{i}", label=name)
            else:
                ax.plot(steps, values, color=f"C{i}", alpha=0.25, linewidth=0.8)
                ax.plot(steps, savgol_filter(values, window, _SAVGOL_POLYORDER), color=f"C{i}", label=name)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    path = _prepare(path)
    fig.savefig(path)
    return path


def plot_rate_distortion(curves: Mapping[str, Sequence[tuple]], path: str | Path, ylabel: str = "PSNR (dB)",
                         annotate: bool = True) -> Path:
    """Distortion against rate: one marker series per curve name, points (bits per site, value, label) or (bits per
    site, value, label, spread) -- the spread (e.g. the standard deviation over seeds) drawn as an error bar -- each
    point annotated with its label (e.g. "S=2 B=16") when ``annotate``, and the curve's upper envelope (the best
    value at or below each rate) drawn as a line."""
    if not curves or not any(curves.values()):
        raise ValueError("need at least one curve with points")
    fig = _new_figure(9.0, 4.6)
    ax = fig.subplots()
    for i, (name, points) in enumerate(curves.items()):
        pts = sorted((float(p[0]), float(p[1]), str(p[2]), float(p[3]) if len(p) > 3 else 0.0) for p in points
                     if math.isfinite(p[1]) and math.isfinite(p[0]))
        if not pts:
            continue
        bits, values = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
        spread = np.array([p[3] if math.isfinite(p[3]) else 0.0 for p in pts])
        if spread.any():
            ax.errorbar(bits, values, yerr=spread, fmt="o", color=f"C{i}", label=name, capsize=3, zorder=3)
        else:
            ax.scatter(bits, values, color=f"C{i}", label=name, zorder=3)
        ax.plot(bits, np.maximum.accumulate(values), color=f"C{i}", alpha=0.6)
        for b, v, lab, _ in pts if annotate else ():
            ax.annotate(lab, (b, v), textcoords="offset points", xytext=(3, 3), fontsize=7, color=f"C{i}")
    ax.set_xscale("log", base=2)
    ticks: list[float] = []  # the points' rates, rounded, at least 15% apart on the log axis
    for b in sorted({round(float(p[0])) for points in curves.values() for p in points if math.isfinite(p[0])}):
        if b > 0 and (not ticks or b >= ticks[-1] * 1.15):
            ticks.append(b)
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_xlabel("bits per latent site (log scale)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: never over a point
    path = _prepare(path)
    fig.savefig(path)
    return path


def plot_sweep(panels: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]], path: str | Path, xlabel: str,
               log_x: bool = True) -> Path:
    """One subplot per metric (``panels``: {metric: {series name: [(x, value), ...]}}), each series a line with
    markers against ``xlabel`` (log base 2 with ``log_x``): the ablation plots (metric against K or S)."""
    if not panels or not any(points for series in panels.values() for points in series.values()):
        raise ValueError("need at least one series with points")
    fig = _new_figure(4.8 * len(panels), 3.6)
    for ax, (metric, series) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels.items()):
        for i, (name, points) in enumerate(series.items()):
            pts = sorted((float(x), float(y)) for x, y in points if math.isfinite(y))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=f"C{i}", label=name)
        if log_x:
            ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3, which="both")
        if ax.lines:
            ax.legend()
    path = _prepare(path)
    fig.savefig(path)
    return path


def latent_top_component(latents: Tensor) -> Tensor:
    """The top singular component of each latent (B, C, h, w) as seen in the paper's Figures 5/6: per image, the
    first right singular vector of its (C, h w) matrix times the singular value, as a map (B, 1, h, w), its sign
    fixed so that the entry of largest magnitude is positive."""
    if latents.dim() != 4:
        raise ValueError(f"latents must be (B, C, h, w), got {tuple(latents.shape)}")
    b, c, h, w = latents.shape
    _, s, vh = torch.linalg.svd(latents.detach().double().reshape(b, c, h * w), full_matrices=False)
    top = vh[:, 0] * s[:, :1]
    sign = torch.sign(top.gather(1, top.abs().argmax(1, keepdim=True)))
    return (top * sign).reshape(b, 1, h, w).float()


def save_latent_components(latents: Mapping[str, Tensor], path: str | Path) -> Path:
    """One row per model of :func:`latent_top_component` maps, each map scaled to [0, 1] by its own range and
    enlarged to at least 32 pixels, labelled like :func:`save_reconstruction_grid`."""
    if not latents:
        raise ValueError("need at least one model's latents")
    rows = {}
    for name, z in latents.items():
        maps = latent_top_component(z)
        lo = maps.amin(dim=(1, 2, 3), keepdim=True)
        hi = maps.amax(dim=(1, 2, 3), keepdim=True)
        maps = (maps - lo) / (hi - lo).clamp_min(1e-12)
        scale = max(1, math.ceil(32 / maps.shape[-1]))
        rows[name] = torch.nn.functional.interpolate(maps, scale_factor=scale, mode="nearest")
    return _save_rows(list(rows.items()), path)


def _check_atoms(atoms: Tensor) -> None:
    if atoms.ndim != 2 or 0 in atoms.shape:
        raise ValueError(f"atoms must have shape (K, M) with K, M >= 1, got {tuple(atoms.shape)}")
    if not atoms.is_floating_point() or not torch.isfinite(atoms).all():
        raise ValueError("atoms must be finite floating-point values")


def _square_shape(m: int) -> tuple[int, int]:
    """The most square (h, w) with h * w = m and h <= w, e.g. 16 -> (4, 4), 12 -> (3, 4), 7 -> (1, 7)."""
    h = max(d for d in range(1, math.isqrt(m) + 1) if m % d == 0)
    return h, m // h


def save_atom_images(atoms: Tensor, path: str | Path, shape: tuple[int, int] | None = None) -> Path:
    """Dictionary atoms / codewords (K, M) as grayscale tiles (the paper's Figs. 7a/8a): each atom reshaped to
    ``shape`` (default the most square factorisation of M), min-max normalised on its own (a constant atom is
    black), enlarged by the integer factor max(1, 32 // max(h, w)), in a grid of ceil(sqrt(K)) columns separated by
    2 blue-gray pixels; RGB PNG."""
    _check_atoms(atoms)
    k, m = atoms.shape
    h, w = _square_shape(m) if shape is None else shape
    if h * w != m:
        raise ValueError(f"shape {shape} does not hold {m} values")
    tiles = atoms.detach().cpu().double().reshape(k, 1, h, w)
    lo, hi = tiles.amin((1, 2, 3), keepdim=True), tiles.amax((1, 2, 3), keepdim=True)
    tiles = (tiles - lo) / (hi - lo).clamp_min(torch.finfo(torch.float64).tiny)
    scale = max(1, _ATOM_TILE_PX // max(h, w))
    tiles = tiles.repeat_interleave(scale, 2).repeat_interleave(scale, 3).expand(-1, 3, -1, -1)
    grid = _grid(tiles, nrow=math.ceil(math.sqrt(k)), pad=2, pad_value=_ATOM_PAD_RGB)
    path = _prepare(path)
    Image.fromarray(grid).save(path)
    return path


def _pca_2d(atoms: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (K, 2) of the centred atoms (K, M) on their first two principal axes, and the fraction of the
    variance each axis explains (2,)."""
    x = atoms.detach().cpu().double()
    u, s, _ = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    total = s.square().sum()
    explained = s[:2].square() / total if total > 0 else torch.zeros(2, dtype=torch.float64)
    return (u[:, :2] * s[:2]).numpy(), explained.numpy()


def _umap_2d(atoms: Tensor) -> np.ndarray | None:
    """UMAP coordinates (K, 2) of the atoms when umap-learn is installed (the paper's Figs. 7b/8b), else None."""
    try:
        import umap
    except ImportError:
        return None
    k = atoms.shape[0]
    reducer = umap.UMAP(n_components=2, n_neighbors=max(2, min(15, k - 1)), random_state=0, init="random")
    return np.asarray(reducer.fit_transform(atoms.detach().cpu().double().numpy()))


def plot_atom_embedding(atoms: Tensor, path: str | Path, usage: Tensor | None = None, title: str = "",
                        method: str = "auto") -> Path:
    """Scatter of the atoms (K, M), K, M >= 2, in two dimensions, coloured and sized by usage counts (K,) when given.
    ``method``: "umap" (umap-learn, as the paper's Figs. 7b/8b; ImportError when it is not installed), "pca" (first
    two principal components by SVD) or "auto" (UMAP when umap-learn is installed, else PCA). The axis labels say
    which one was used."""
    _check_atoms(atoms)
    k, m = atoms.shape
    if k < 2 or m < 2:
        raise ValueError(f"a 2-D embedding needs K >= 2 atoms of M >= 2 values, got {tuple(atoms.shape)}")
    if method not in ("auto", "umap", "pca"):
        raise ValueError(f"method must be auto, umap or pca, got {method!r}")
    coords = _umap_2d(atoms) if method in ("auto", "umap") and k > 3 else None
    if coords is None and method == "umap":
        raise ImportError("method='umap' needs umap-learn (pip install umap-learn) and K > 3 atoms")
    explained = None
    if coords is None:
        coords, explained = _pca_2d(atoms)
    fig = _new_figure(5.6, 4.6)
    ax = fig.subplots()
    if usage is None:
        ax.scatter(coords[:, 0], coords[:, 1], s=14)
    else:
        if usage.shape != (k,):
            raise ValueError(f"usage must have shape ({k},), got {tuple(usage.shape)}")
        u = usage.detach().cpu().double().numpy()
        if not np.isfinite(u).all() or (u < 0).any():
            raise ValueError("usage must be finite and non-negative")
        points = ax.scatter(coords[:, 0], coords[:, 1], c=u, s=6 + 80 * u / max(u.max(), 1.0), cmap="viridis")
        fig.colorbar(points, ax=ax, label="usage count")
    if explained is None:
        ax.set_xlabel("UMAP 1")
        ax.set_ylabel("UMAP 2")
    else:
        ax.set_xlabel(f"PC 1 ({100 * explained[0]:.1f}% of variance)")
        ax.set_ylabel(f"PC 2 ({100 * explained[1]:.1f}% of variance)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    path = _prepare(path)
    fig.savefig(path)
    return path
