"""The training application (needs the ``[train]`` extra): the ``lasers`` command and what it runs.

Modules, by concept (each imports only those above it in this list, and the library ``lasers_ext``):
    tasks, data, metrics, plots, distributed   the pieces: downstream tasks, data sets, metrics, pictures, torchrun
    peers      vector-quantize-pytorch's VectorQuantize, ResidualVQ, FSQ and LFQ behind the quantizer contract
    config     MODELS, TrainConfig (every field a ``lasers train`` flag), the model and data of a configuration
    runs       a run directory: atomic writes, metrics records, checkpoints (TrainState), load_run
    evaluation the paper's metrics on a test split, the run's pictures, the results table
    loop       ``train(cfg)``: training, resume, DDP
    comparison models side by side with identical budgets
    sweep      rate-distortion and ablation grids
    spatial_depth  stage 2's spatial-depth prior: transformers over latent sites and over each site's events
    prior      stage 2: a prior over a run's tokens (spatial-depth or flat), training, sampling, NLL, FID
    cli        the ``lasers`` command
"""

from __future__ import annotations

import importlib

# The public names, imported on first use: importing the package alone (as `lasers` does to name a missing extra)
# needs nothing beyond torch.
_PUBLIC = {"MODELS": "config", "TrainConfig": "config", "TrainState": "runs", "compare": "comparison",
           "evaluate": "evaluation", "evaluate_run": "evaluation", "format_results_table": "evaluation",
           "load_run": "runs", "train": "loop"}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
