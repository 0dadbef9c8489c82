"""Downstream tasks of the paper's supplementary section 12: the model sees a degraded image and reconstructs the
original. ``reconstruction`` (the default) is the plain autoencoder; the training tool's ``--task`` picks one."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["TASKS", "degrade", "inpainting_box"]

TASKS = ("reconstruction", "super-resolution", "inpainting")
SR_FACTOR = 4  # supplementary 12.1: 64x64 from 256x256 and back, by bicubic resampling
MASK_FRACTION = 0.25  # supplementary 12.2: a centred square of 0.25 of the image side, set to 0


def inpainting_box(height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, box height, box width) of the centred mask: round(0.25 * side) pixels each way, at least 1."""
    bh, bw = max(1, round(MASK_FRACTION * height)), max(1, round(MASK_FRACTION * width))
    return (height - bh) // 2, (width - bw) // 2, bh, bw


def degrade(x: Tensor, task: str) -> Tensor:
    """The task's input for images x (B, C, H, W) in [0, 1] (the target is x itself).

    ``super-resolution``: bicubic down-sampling by 4 (to H/4 x W/4) and bicubic up-sampling back to H x W, both
    with the antialiased a = -0.5 kernel of PIL's and MATLAB's imresize (the "bicubic degradation" the paper cites),
    clamped to [0, 1]; H and W must be multiples of 4. ``inpainting``: the centred box of
    :func:`inpainting_box` set to 0. ``reconstruction``: x unchanged.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if x.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if task == "super-resolution":
        if h % SR_FACTOR or w % SR_FACTOR:
            raise ValueError(f"super-resolution needs image sides that are multiples of {SR_FACTOR}, got {h} x {w}")
        low = F.interpolate(x, size=(h // SR_FACTOR, w // SR_FACTOR), mode="bicubic", align_corners=False,
                            antialias=True)
        return F.interpolate(low, size=(h, w), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    if task == "inpainting":
        top, left, bh, bw = inpainting_box(h, w)
        out = x.clone()
        out[..., top:top + bh, left:left + bw] = 0
        return out
    return x
