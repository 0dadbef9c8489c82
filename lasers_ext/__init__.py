"""lasers_ext: a dictionary-learning (Batch-OMP) bottleneck for VQ-VAE/VQ-GAN style models.

Public API:
    batch_omp(x, dictionary, sparsity, *, tol=None, backend="auto") -> SparseCodes(indices, coeffs)
    sparse_decode(indices, coeffs, dictionary) -> (..., M)
    SparseDictBottleneck(n_e, e_dim, beta=0.25, ..., sparsity=None, patch_size=1, coeff_bins=None): drop-in for
        taming's VectorQuantizer; with coeff_bins its codes are stage-2 tokens (CoefficientQuantizer, TokenCodec)
    VectorQuantizer(n_e, e_dim, beta=0.25, ..., ema=False): the VQ baseline with the same interface
    build_autoencoder("dl" | "vq", ...) -> Autoencoder; PatchDiscriminator: the paper's models (lasers_ext.models)

The library needs torch alone: ops (the op and its Python face), backends, reference (the float64 oracle),
triton_omp, quantizer (what both quantizers share), bottleneck, vq, tokens, models.

The training application is lasers_ext.training (the ``[train]`` extra): configuration, runs and checkpoints, the
training loop, evaluation, comparison, sweeps, the stage-2 prior, data, metrics, pictures, torchrun, and the
``lasers`` command. The Batch-OMP benchmark (``lasers-omp-bench``) is the package lasers_bench, in bench/.
Old paths of moved modules (lasers_ext.train, lasers_ext.cli, ...) still import, with a FutureWarning.
"""

from . import _moved
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

_moved.install()
