"""Training steps whose loss or gradient is not finite are skipped, counted and reported.

One inf or NaN that reaches the optimizer stays in Adam's moments for good, and a prox would
read the poisoned channels as sparse; so, as :class:`torch.amp.GradScaler` does for fp16
overflow, such a step is not taken. Many in a row mean the data or the learning rate is wrong,
and the run stops with a message that names the batch and the task.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import Tensor


class NonFiniteError(RuntimeError):
    """Too many training steps in a row had a non-finite loss or gradient."""


def all_finite(total: Tensor, params: Iterable[Tensor]) -> Tensor:
    """A bool scalar on ``total``'s device: the loss and every gradient of ``params`` are finite.

    Computed on the device, with no host sync, so that it can be all-reduced first under DDP.
    """
    flags = [total.detach().isfinite()] + [p.grad.isfinite().all() for p in params if p.grad is not None]
    return torch.stack(flags).all()


class NonFiniteGuard:
    """Counts skipped steps; raises :class:`NonFiniteError` after ``max_consecutive`` in a row.

    ``log`` receives one line per skipped step.
    """

    def __init__(self, max_consecutive: int, log: Callable[[str], None] = print) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive={max_consecutive}: it must be >= 1")
        self.max_consecutive = max_consecutive
        self.log = log
        self.skipped = 0
        self.consecutive = 0

    def update(self, finite: bool, losses: dict[str, Tensor], where: str) -> None:
        """Record one step; ``where`` names the batch (epoch, step, items) for the messages."""
        if finite:
            self.consecutive = 0
            return
        self.skipped += 1
        self.consecutive += 1
        bad = [name for name, loss in losses.items() if not math.isfinite(loss.item())]
        cause = f"loss of task {', '.join(bad)}" if bad else "gradient (every task's loss is finite)"
        message = f"{where}: non-finite {cause}; step skipped ({self.consecutive} in a row, {self.skipped} in all)"
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"{message}; stopping after {self.max_consecutive} skipped steps in a row: check these items' "
                "files and the learning rate (the limit is --max-nonfinite-steps)"
            )
        self.log(message)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = int(state["skipped"])
        self.consecutive = int(state["consecutive"])
