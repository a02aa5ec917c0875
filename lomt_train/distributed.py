"""Data-parallel training with PyTorch's own engine (``torchrun`` + DistributedDataParallel).

Under ``torchrun`` (``WORLD_SIZE > 1`` in the environment) each process joins the default
process group (NCCL on CUDA, gloo on the CPU) and trains on its own slice of every batch; DDP
averages the gradients, so a step equals a single-process step on the global batch, except
that BatchNorm normalises each rank's slice (on CUDA we convert to SyncBatchNorm, which
restores single-process statistics; gloo has no SyncBatchNorm on the CPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Dataset, Subset


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: ``rank`` of ``world_size``, on ``device``."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, writes checkpoints and reports."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """Sum ``t`` over ranks, in place (a no-op in a single process)."""
        if self.enabled:
            dist.all_reduce(t)
        return t


def init_distributed(device: torch.device) -> DistContext:
    """Join the process group ``torchrun`` describes, or stay single-process without one.

    ``device`` is the device asked for; under ``torchrun`` on CUDA each rank takes
    ``cuda:LOCAL_RANK``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(device=device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device)


def shard(dataset: Dataset, ctx: DistContext) -> Dataset:
    """Rank ``r``'s share of an evaluation split: items ``r, r + W, r + 2W, ...``.

    Unlike DistributedSampler this pads nothing, so split-level metrics summed over ranks
    count every item exactly once.
    """
    if not ctx.enabled:
        return dataset
    return Subset(dataset, range(ctx.rank, len(dataset), ctx.world_size))
