"""Inference latency, measured the same way for every model we compare."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn


@torch.no_grad()
def measure_latency(
    module: nn.Module,
    *,
    batch_size: int,
    image_size: int,
    device: torch.device,
    warmup: int = 3,
    repeats: int = 10,
) -> dict[str, Any]:
    """Median wall-clock time of ``module(x)`` for a random ``[batch_size, 3, S, S]`` batch.

    The module runs in eval mode; ``warmup`` untimed calls come first, and on CUDA each call
    is synchronised so the time covers the kernels, not just their launch.
    """
    was_training = module.training
    module.eval()
    x = torch.randn(batch_size, 3, image_size, image_size, device=device)
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        module(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    module.train(was_training)
    return {
        "batch_size": batch_size,
        "image_size": image_size,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "warmup": warmup,
        "repeats": repeats,
        "median_ms": 1000 * statistics.median(times),
        "min_ms": 1000 * min(times),
    }
