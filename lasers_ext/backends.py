"""Which Batch-OMP backends this installation has, and which one a call uses: the one place that knows.

* ``cpu``: the C++ kernel, always compiled into ``lasers_ext._C``;
* ``cuda``: the CUDA kernels, compiled in when ``lasers_ext._C.with_cuda`` is true;
* ``triton``: the Triton kernel, when the ``triton`` package is installed (CUDA tensors, or CPU tensors under
  Triton's interpreter, ``TRITON_INTERPRET=1``);
* ``reference``: the pure-PyTorch float64 oracle, everywhere.
"""

from __future__ import annotations

import importlib.util
import os

import torch

try:
    from . import _C  # loads the compiled library: registers the lasers_ext ops and their CPU/CUDA kernels
except ImportError as err:
    raise ImportError(
        f"lasers_ext's compiled extension could not be loaded ({err}). It must be built against the torch that "
        f"imports it (torch {torch.__version__} here): reinstall with `pip install --no-build-isolation .` "
        "after installing torch, or run `bash scripts/env.sh ...` from the repository."
    ) from err

__all__ = ["BACKENDS", "available_backends", "resolve_backend", "triton_interpreting", "HAS_TRITON", "WITH_CUDA"]

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")

# Read once at import: neither is traceable by torch.compile.
WITH_CUDA = bool(_C.with_cuda)
HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """Whether Triton runs its CPU interpreter (TRITON_INTERPRET=1), which takes CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can code tensors on ``device`` in this installation, fastest first."""
    device = torch.device(device)
    if device.type == "cpu":
        return ["cpu", "reference"]
    if device.type == "cuda":
        return (["cuda"] if WITH_CUDA else []) + (["triton"] if HAS_TRITON else []) + ["reference"]
    return ["reference"]


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend a call with ``backend`` on ``device`` uses; a clear error where it cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return available_backends(device)[0]
    if backend == "triton":
        if not HAS_TRITON:
            raise ImportError("backend='triton' needs the 'triton' package (pip install triton)")
        if device.type != "cuda" and not (device.type == "cpu" and triton_interpreting()):
            raise ValueError(f"backend='triton' needs CUDA tensors, got tensors on {device} "
                             "(TRITON_INTERPRET=1 runs Triton's interpreter on CPU tensors, for testing)")
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
        if not WITH_CUDA:
            raise RuntimeError(
                "backend='cuda': this lasers_ext was built without CUDA kernels "
                "(rebuild with a CUDA torch and nvcc, LASERS_EXT_CUDA=1 makes that a hard requirement)"
            )
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
    return backend
