"""Per-task losses and the weightings that combine them into one training loss.

Shapes follow the data contract: ``B`` images of ``H x W`` pixels; predictions are the
model's raw outputs (logits, metres, unnormalised normals).

Every dense loss is a mean over the *valid* pixels of the batch and is 0 (still attached to
the graph) when a batch has none, so a batch without labels neither produces NaN nor steps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import IGNORE_INDEX

DEPTH_LOSS_MODES = ("mse", "l1")


def _check_same_shape(pred: Tensor, target: Tensor, what: str) -> None:
    # Elementwise losses would silently broadcast e.g. [B, 1, H, W] against [B, H, W].
    if pred.shape != target.shape:
        raise ValueError(f"{what}: prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask``; 0 when the mask is empty."""
    # torch.where, not a product: a non-finite value at an invalid pixel must not leak in.
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp_min(1)


def seg_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy of logits ``pred`` ``[B, C, H, W]`` against labels ``target`` ``[B, H, W]``.

    Mean over the pixels whose label is not 255 (ignore); 0 when every pixel is ignored.
    """
    total = F.cross_entropy(pred, target, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (target != IGNORE_INDEX).sum().clamp_min(1)


def depth_loss(pred: Tensor, target: Tensor, *, mode: str = "mse") -> Tensor:
    """Depth regression loss on valid pixels (``target > 0``); ``pred``, ``target`` ``[B, 1, H, W]`` metres.

    ``mode="mse"`` (the papers'): mean of ``(pred - target)^2``; ``mode="l1"``: mean of
    ``|pred - target|``.
    """
    if mode not in DEPTH_LOSS_MODES:
        raise ValueError(f"unknown depth loss mode {mode!r}; expected one of {DEPTH_LOSS_MODES}")
    _check_same_shape(pred, target, "depth")
    diff = pred - target
    return _masked_mean(diff.square() if mode == "mse" else diff.abs(), target > 0)


def normal_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Surface-normal loss: mean of ``1 - cos(pred, target)`` over valid pixels.

    ``pred`` and ``target`` are ``[B, 3, H, W]``; a pixel is valid when its target is not the
    zero vector. The cosine normalises both vectors, so the head's raw output is used as is.
    """
    _check_same_shape(pred, target, "normal")
    cos = F.cosine_similarity(pred, target, dim=1)
    return _masked_mean(1.0 - cos, target.ne(0).any(dim=1))


def binary_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Binary cross-entropy of logits ``pred`` against ``target`` in {0, 1}, mean over elements.

    Used for edges (``[B, 1, H, W]``) and attributes (``[B]``).
    """
    _check_same_shape(pred, target, "binary")
    return F.binary_cross_entropy_with_logits(pred, target)


class LossWeighting(nn.Module):
    """Combines ``{task: scalar loss}`` into the scalar to back-propagate.

    Subclasses implement :meth:`combine` over the losses stacked in ``task_names`` order, and
    :meth:`weights`. Weightings with parameters must have them given to the optimizer.
    """

    def __init__(self, task_names: Sequence[str]) -> None:
        super().__init__()
        names = tuple(task_names)
        if not names or len(set(names)) != len(names):
            raise ValueError(f"task_names must be non-empty and distinct, got {list(names)}")
        self.task_names = names

    def forward(self, losses: Mapping[str, Tensor]) -> Tensor:
        if set(losses) != set(self.task_names):
            raise ValueError(f"losses for {sorted(losses)} given; this weighting combines {list(self.task_names)}")
        return self.combine(torch.stack([losses[name] for name in self.task_names]))

    def combine(self, losses: Tensor) -> Tensor:
        """The total loss from the task losses ``[T]`` in ``task_names`` order."""
        raise NotImplementedError

    def weights(self) -> dict[str, float]:
        """The current weight of each task's loss, for logging."""
        raise NotImplementedError


class EqualWeighting(LossWeighting):
    """``total = sum_t L_t``."""

    def combine(self, losses: Tensor) -> Tensor:
        return losses.sum()

    def weights(self) -> dict[str, float]:
        return dict.fromkeys(self.task_names, 1.0)


class UncertaintyWeighting(LossWeighting):
    """Homoscedastic-uncertainty weighting (Kendall, Gal and Cipolla, CVPR 2018).

    With one learnable log-variance ``s_t = log sigma_t^2`` per task (initialised to 0)::

        total = sum_t exp(-s_t) * L_t + s_t

    This is the form without Kendall's 1/2 factors (``1/(2 sigma^2) L + log sigma`` is half of
    it for regression tasks), used for every task kind alike, as in the papers' code. At the
    optimum ``s_t = log L_t``, i.e. each task's weight ``exp(-s_t)`` tends to ``1 / L_t``.
    ``log_vars`` must be given to the optimizer (the published code left them out, so they
    never moved); they carry no weight decay or sparsity penalty.
    """

    def __init__(self, task_names: Sequence[str]) -> None:
        super().__init__(task_names)
        self.log_vars = nn.Parameter(torch.zeros(len(self.task_names)))

    def combine(self, losses: Tensor) -> Tensor:
        return (torch.exp(-self.log_vars) * losses + self.log_vars).sum()

    def weights(self) -> dict[str, float]:
        return dict(zip(self.task_names, torch.exp(-self.log_vars.detach()).tolist()))


# Adding a weighting is one entry.
WEIGHTINGS: dict[str, type[LossWeighting]] = {"uncertainty": UncertaintyWeighting, "equal": EqualWeighting}


def build_weighting(name: str, task_names: Sequence[str]) -> LossWeighting:
    """The weighting ``name`` (a key of :data:`WEIGHTINGS`) over ``task_names``."""
    if name not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {name!r}; valid weightings are {sorted(WEIGHTINGS)}")
    return WEIGHTINGS[name](task_names)
