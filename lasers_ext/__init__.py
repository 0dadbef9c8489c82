"""lasers_ext: a dictionary-learning (Batch-OMP) bottleneck for VQ-VAE/VQ-GAN style models.

Public API:
    batch_omp(x, dictionary, sparsity, *, tol=None, backend="auto") -> SparseCodes(indices, coeffs)
    sparse_decode(indices, coeffs, dictionary) -> (..., M)
    SparseDictBottleneck(n_e, e_dim, beta=0.25, ..., sparsity=None, patch_size=1): drop-in for taming's VectorQuantizer
    VectorQuantizer(n_e, e_dim, beta=0.25, ..., ema=False): the VQ baseline with the same interface
"""

from .bottleneck import QuantizerInfo, SparseDictBottleneck
from .ops import BACKENDS, SparseCodes, available_backends, batch_omp, sparse_decode
from .vq import VectorQuantizer

__all__ = ["BACKENDS", "QuantizerInfo", "SparseCodes", "SparseDictBottleneck", "VectorQuantizer", "available_backends",
           "batch_omp", "sparse_decode"]
__version__ = "0.1.0"
