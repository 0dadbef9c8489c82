"""lasers_ext: a dictionary-learning (Batch-OMP) bottleneck for VQ-VAE/VQ-GAN style models.

Public API:
    batch_omp(x, dictionary, sparsity, *, tol=None, backend="auto") -> SparseCodes(indices, coeffs)
    sparse_decode(indices, coeffs, dictionary) -> (..., M)
    SparseDictBottleneck(n_e, e_dim, beta=0.25, ..., sparsity=None, patch_size=1, coeff_bins=None): drop-in for
        taming's VectorQuantizer; with coeff_bins its codes are stage-2 tokens (CoefficientQuantizer, TokenCodec)
    VectorQuantizer(n_e, e_dim, beta=0.25, ..., ema=False): the VQ baseline with the same interface
    build_autoencoder("dl" | "vq", ...) -> Autoencoder; PatchDiscriminator: the paper's models (lasers_ext.models)

Submodules imported on demand: lasers_ext.train (TrainConfig, train, evaluate, compare), lasers_ext.prior (stage-2
transformer prior), lasers_ext.sweep (rate-distortion and ablation grids), lasers_ext.tasks (downstream tasks),
lasers_ext.data, lasers_ext.metrics, lasers_ext.plots, lasers_ext.cli (the ``lasers`` command),
lasers_ext.benchmark.
"""

from .backends import BACKENDS, available_backends
from .bottleneck import SparseDictBottleneck
from .models import Autoencoder, PatchDiscriminator, build_autoencoder
from .ops import SparseCodes, batch_omp, sparse_decode
from .quantizer import QuantizerInfo
from .tokens import CoefficientQuantizer, TokenCodec
from .vq import VectorQuantizer

__all__ = ["BACKENDS", "Autoencoder", "CoefficientQuantizer", "PatchDiscriminator", "QuantizerInfo", "SparseCodes",
           "SparseDictBottleneck", "TokenCodec", "VectorQuantizer", "available_backends", "batch_omp",
           "build_autoencoder", "sparse_decode"]
__version__ = "0.1.0"
