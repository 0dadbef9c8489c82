"""torch.distributed plumbing for the training tool: one process per GPU (or CPU worker) under ``torchrun``.

``torchrun --nproc_per_node=N -m lasers_ext.training.cli train ...`` (or the ``lasers`` script)
sets RANK, WORLD_SIZE and
LOCAL_RANK; :func:`setup` then joins the process group (NCCL for CUDA, gloo for CPU). Without those variables
everything runs in one process and the helpers here are no-ops.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DistributedSampler

__all__ = ["Context", "setup", "teardown", "all_reduce_mean", "all_reduce_sum", "barrier", "ResumableSampler"]


@dataclass(frozen=True)
class Context:
    """Where this process runs: ``rank`` of ``world_size`` processes, on ``device``."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, logs and pictures."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto", timeout_s: float = 600.0) -> Context:
    """Joins the process group when launched by torchrun and picks this process's device.

    ``device``: "auto" (CUDA when available, else CPU), "cpu" or "cuda". Under torchrun with CUDA each process takes
    GPU ``LOCAL_RANK``. A collective that waits longer than ``timeout_s`` fails instead of hanging.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device (use --device cpu or auto)")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Context(0, 1, torch.device("cuda" if use_cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=dev if use_cuda else None)
    return Context(dist.get_rank(), dist.get_world_size(), dev)


def teardown() -> None:
    """Leaves the process group (if one was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()


def all_reduce_mean(ctx: Context, values: dict[str, Tensor]) -> dict[str, float]:
    """The mean over ranks of 0-dim tensors (one collective for all of them), as Python floats."""
    names = sorted(values)
    if not names:
        return {}
    stacked = torch.stack([values[n].detach().float().reshape(()) for n in names]).to(ctx.device)
    if ctx.distributed:
        dist.all_reduce(stacked)
        stacked /= ctx.world_size
    return dict(zip(names, stacked.tolist()))


def all_reduce_sum(ctx: Context, tensor: Tensor) -> Tensor:
    """The sum over ranks of ``tensor`` (a new tensor; ``tensor`` itself is unchanged)."""
    total = tensor.detach().clone()
    if ctx.distributed:
        dist.all_reduce(total)
    return total


class ResumableSampler(DistributedSampler):
    """torch's DistributedSampler (shuffled, reseeded per epoch by ``set_epoch``, trimmed to a multiple of the
    world size) that can start inside an epoch: ``set_epoch(epoch, skip)`` drops this rank's first ``skip`` indices.

    Rank r takes positions r, r + W, r + 2W, ... of the epoch's permutation, so the global batch t (the per-rank
    batches t of all ranks together) is always positions [t*B, (t+1)*B) for global batch size B, whatever the
    number of processes: a run resumed with another world size sees the same data in the same order.
    """

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self) -> int:
        return self.num_samples - self.skip
