"""Python face of the Batch-OMP op: argument checks, backend choice, fake kernels and the autograd formula.

Every backend is a ``torch.library`` operator with the same schema
``(Tensor x, Tensor dictionary, int sparsity, float? tol=None) -> (Tensor indices, Tensor coeffs)``:

* ``lasers_ext::batch_omp`` -- the C++ CPU kernel (``csrc/cpu``) and, for CUDA tensors, the CUDA kernel (``csrc/cuda``).
* ``lasers_ext::batch_omp_triton`` -- the Triton kernel (``lasers_ext/triton_omp.py``, imported on first use).
* ``lasers_ext::batch_omp_reference`` -- :func:`lasers_ext.reference.batch_omp_reference`, any device, float64 inside.

All share one fake (meta) kernel, so they trace under ``torch.compile``, and one autograd formula: the gradient of the
least-squares coefficients on the chosen support (the support itself is piecewise constant).
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .backends import resolve_backend
from .reference import batch_omp_reference

__all__ = ["SparseCodes", "batch_omp", "sparse_decode", "gather_atoms", "least_squares_backward"]

class SparseCodes(NamedTuple):
    """Sparse codes of N vectors with S slots each.

    Attributes:
        indices: (N, S) int64 atom indices in selection order; -1 marks an unused slot.
        coeffs: (N, S) coefficients with respect to the atoms as given (not normalised); 0 in unused slots.
    """

    indices: Tensor
    coeffs: Tensor


@torch.library.custom_op("lasers_ext::batch_omp_reference", mutates_args=())
def _batch_omp_reference_op(
    x: Tensor, dictionary: Tensor, sparsity: int, tol: Optional[float] = None
) -> tuple[Tensor, Tensor]:
    return batch_omp_reference(x, dictionary, sparsity, tol)


@torch.library.custom_op("lasers_ext::batch_omp_triton", mutates_args=())
def _batch_omp_triton_op(
    x: Tensor, dictionary: Tensor, sparsity: int, tol: Optional[float] = None
) -> tuple[Tensor, Tensor]:
    from .triton_omp import batch_omp_triton  # lazy: Triton is optional for CPU-only users

    return batch_omp_triton(x, dictionary, sparsity, tol)


_OPS = ("lasers_ext::batch_omp", "lasers_ext::batch_omp_triton", "lasers_ext::batch_omp_reference")


def _fake(x: Tensor, dictionary: Tensor, sparsity: int, tol: Optional[float] = None) -> tuple[Tensor, Tensor]:
    n = x.shape[0]
    return x.new_empty((n, sparsity), dtype=torch.long), x.new_empty((n, sparsity))


def _setup_context(ctx, inputs, output) -> None:
    x, dictionary, _, _ = inputs
    indices, coeffs = output
    ctx.mark_non_differentiable(indices)
    ctx.save_for_backward(x, dictionary, indices, coeffs)


def gather_atoms(dictionary: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """The chosen atoms D_T (N, S, M), zero rows in unused slots, and the (N, S) mask of used slots."""
    valid = indices >= 0
    return dictionary[indices.clamp(min=0)] * valid.unsqueeze(-1), valid


def least_squares_backward(
    x: Tensor, chosen: Tensor, valid: Tensor, coeffs: Tensor, grad_coeffs: Tensor
) -> tuple[Tensor, Tensor]:
    """Backward of gamma = (D_T D_T^T)^-1 D_T x with the support T held fixed.

    Args: x (N, M); chosen (N, S, M) the atoms D_T (zero rows in unused slots); valid (N, S) bool; coeffs (N, S)
    gamma; grad_coeffs (N, S) dL/dgamma. Returns dL/dx (N, M) and dL/dD_T (N, S, M): with v = (D_T D_T^T)^-1 g,
    dL/dx = D_T^T v and dL/dD_T = v (x - x_hat)^T - gamma (D_T^T v)^T.
    """
    lhs = chosen @ chosen.transpose(1, 2)
    lhs = lhs + torch.diag_embed((~valid).to(lhs.dtype))  # identity on unused slots keeps the system regular
    v = torch.linalg.solve(lhs, (grad_coeffs * valid).unsqueeze(-1)).squeeze(-1)  # (N, S)
    grad_x = (v.unsqueeze(1) @ chosen).squeeze(1)
    x_hat = (coeffs.unsqueeze(1) @ chosen).squeeze(1)
    grad_chosen = v.unsqueeze(-1) * (x - x_hat).unsqueeze(1) - coeffs.unsqueeze(-1) * grad_x.unsqueeze(1)
    return grad_x, grad_chosen * valid.unsqueeze(-1)


def _backward(ctx, grad_indices: Optional[Tensor], grad_coeffs: Optional[Tensor]):
    x, dictionary, indices, coeffs = ctx.saved_tensors
    if grad_coeffs is None:
        return None, None, None, None
    chosen, valid = gather_atoms(dictionary, indices)
    grad_x, grad_chosen = least_squares_backward(x, chosen, valid, coeffs, grad_coeffs)
    grad_dict = None
    if ctx.needs_input_grad[1]:
        grad_dict = torch.zeros_like(dictionary).index_add_(
            0, indices.clamp(min=0).reshape(-1), grad_chosen.reshape(-1, dictionary.shape[1])
        )
    return (grad_x if ctx.needs_input_grad[0] else None), grad_dict, None, None


for _name in _OPS:
    torch.library.register_fake(_name)(_fake)
    torch.library.register_autograd(_name, _backward, setup_context=_setup_context)


@torch.library.register_fake("lasers_ext::prepare_dictionary")
def _prepare_fake(dictionary: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    k, m = dictionary.shape
    return dictionary.new_empty((m, k)), dictionary.new_empty((k, k)), dictionary.new_empty((k,))


def _check_tensor(name: str, t: object) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        shape = "(N, M)" if name == "x" else "(K, M)"
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_finite(name: str, t: Tensor) -> None:
    if torch.compiler.is_compiling() or t.numel() == 0 or t.device.type == "meta":
        return  # value checks need the data; compiled graphs and meta tensors (shape inference) skip them
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def _check_args(x: object, dictionary: object, sparsity: object, tol: object) -> None:
    _check_tensor("x", x)
    _check_tensor("dictionary", dictionary)
    if x.dtype != dictionary.dtype:
        raise TypeError(f"x and dictionary must have the same dtype, got {x.dtype} and {dictionary.dtype}")
    if x.device != dictionary.device:
        raise ValueError(f"x and dictionary must be on the same device, got {x.device} and {dictionary.device}")
    k, m = dictionary.shape
    if x.shape[1] != m:
        raise ValueError(f"x has M={x.shape[1]} features per row but dictionary atoms have M={m}")
    if k == 0:
        raise ValueError("dictionary is empty (K = 0 atoms)")
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Integral):
        raise TypeError(f"sparsity must be an int, got {type(sparsity).__name__}")
    if not 1 <= sparsity <= min(k, m):
        raise ValueError(f"sparsity must be in [1, min(K, M)] = [1, {min(k, m)}], got {sparsity}")
    if tol is not None:
        if isinstance(tol, bool) or not isinstance(tol, numbers.Real):
            raise TypeError(f"tol must be a float or None, got {type(tol).__name__}")
        if not (math.isfinite(tol) and tol >= 0):
            raise ValueError(f"tol must be a finite number >= 0, got {tol}")
    _check_finite("x", x)
    _check_finite("dictionary", dictionary)


def batch_omp(
    x: Tensor, dictionary: Tensor, sparsity: int, *, tol: float | None = None, backend: str = "auto"
) -> SparseCodes:
    """Sparse-codes every row of ``x`` with at most ``sparsity`` atoms of ``dictionary`` by Batch-OMP.

    Args:
        x: (N, M) float16/bfloat16/float32/float64 signals. Half types are computed in float32.
        dictionary: (K, M) atoms as rows (the ``nn.Embedding.weight`` layout), same dtype and device as ``x``.
            Atoms need not be normalised: selection uses normalised correlations, coefficients refer to the atoms
            as given, zero atoms are never chosen.
        sparsity: S, the number of atoms per vector, 1 <= S <= min(K, M).
        tol: if given, a vector stops once its squared residual norm is at most ``tol`` (scikit-learn's
            convention; checked before every selection, so a vector with ||x||^2 <= tol uses no atom).
        backend: ``"auto"`` (fastest for the device), ``"cpu"`` (C++ kernel), ``"cuda"``, ``"triton"`` (CUDA
            tensors, or CPU tensors under TRITON_INTERPRET=1) or ``"reference"`` (pure PyTorch, float64 inside).

    Returns:
        :class:`SparseCodes` ``(indices, coeffs)``: (N, S) int64 in selection order and (N, S) coefficients in
        ``x.dtype``; the coefficients are differentiable w.r.t. ``x`` and ``dictionary`` (least squares on the
        chosen support).

    Unused slots hold index -1 and coefficient 0, and they are always the trailing ones. A vector leaves slots
    unused when (a) its squared residual reaches ``tol``, (b) its residual is numerically zero
    (max_k <atom_k/||atom_k||, r>^2 <= eps ||x||^2, which includes x = 0), or (c) the next atom is linearly dependent
    on the chosen ones (new Cholesky pivot < sqrt(eps)), e.g. a duplicate atom. eps is the machine epsilon of the
    compute dtype. :func:`sparse_decode` ignores unused slots; so does ``coeffs[..., None] * dictionary[indices]``.

    NaN or Inf input raises ``ValueError`` here. Where that check is skipped (under ``torch.compile``, or calling
    ``torch.ops.lasers_ext.batch_omp*`` directly), a row with a NaN or infinite entry gets every slot unused, on every
    backend. The codes do not depend on the scale of a row or of an atom: every backend codes each row scaled by a
    power of two (exactly), so any finite input of the dtype is coded, from subnormal to near-overflow values.
    """
    _check_args(x, dictionary, sparsity, tol)
    name = resolve_backend(backend, x.device)
    op = {"reference": torch.ops.lasers_ext.batch_omp_reference,
          "triton": torch.ops.lasers_ext.batch_omp_triton}.get(name, torch.ops.lasers_ext.batch_omp)
    tol = None if tol is None else float(tol)
    if x.dtype in (torch.float16, torch.bfloat16):
        indices, coeffs = op(x.float(), dictionary.float(), int(sparsity), tol)
        return SparseCodes(indices, coeffs.to(x.dtype))
    return SparseCodes(*op(x, dictionary, int(sparsity), tol))


def sparse_decode(indices: Tensor, coeffs: Tensor, dictionary: Tensor) -> Tensor:
    """Rebuilds signals from sparse codes: ``sum_s coeffs[..., s] * dictionary[indices[..., s]]``.

    Args:
        indices: (..., S) int64 atom indices; -1 marks unused slots, which contribute nothing.
        coeffs: (..., S) floating coefficients, same shape as ``indices``.
        dictionary: (K, M) atoms as rows.

    Returns:
        (..., M) tensor in the promoted dtype of ``coeffs`` and ``dictionary``; differentiable w.r.t. both.
    """
    for name, t in (("indices", indices), ("coeffs", coeffs), ("dictionary", dictionary)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"indices must be int64 or int32, got {indices.dtype}")
    if not coeffs.is_floating_point() or not dictionary.is_floating_point():
        raise TypeError(f"coeffs and dictionary must be floating point, got {coeffs.dtype} and {dictionary.dtype}")
    if indices.shape != coeffs.shape or indices.dim() < 1:
        raise ValueError(f"indices and coeffs must have the same shape (..., S), got {tuple(indices.shape)} "
                         f"and {tuple(coeffs.shape)}")
    if dictionary.dim() != 2:
        raise ValueError(f"dictionary must have shape (K, M), got {tuple(dictionary.shape)}")
    if not (indices.device == coeffs.device == dictionary.device):
        raise ValueError("indices, coeffs and dictionary must be on the same device")
    dtype = torch.promote_types(coeffs.dtype, dictionary.dtype)
    valid = indices >= 0
    atoms = dictionary.to(dtype)[indices.clamp(min=0).long()]  # (..., S, M)
    weights = torch.where(valid, coeffs.to(dtype), torch.zeros((), dtype=dtype, device=coeffs.device))
    return (weights.unsqueeze(-2) @ atoms).squeeze(-2)
