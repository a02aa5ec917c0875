"""Healing: hold the zero groups of a group-sparse model at exactly zero while the rest fine-tunes."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from .grouping import as_groups, group_dim, is_grouped


class FrozenGroups:
    """The groups of some tensors that are zero now, kept at zero after every optimizer step.

    ``FrozenGroups(pairs)`` takes ``(tensor, grouping)`` pairs and records, per tensor, which
    groups (see :mod:`lomt_kernels.grouping`) are exactly zero. :meth:`apply` multiplies each
    tensor in place by its keep mask, a ``{0, 1}`` tensor with one entry per group shaped to
    broadcast along the group dimension (``[1, C, 1, 1]`` for a conv's input channels): the
    frozen groups become exactly zero again, whatever the step did to them, and every other
    element is multiplied by one, so it is unchanged. The masks hold one number per group;
    no copy of the weights is kept.

    :meth:`attach` makes ``optimizer.step()`` call :meth:`apply` after every step (a step
    post-hook), so that no zero group grows back. The optimizer and its kernels are not
    changed; the step still moves the frozen groups' Adam moments, which is harmless because
    their weights are reset after it.
    """

    def __init__(self, pairs: Iterable[tuple[Tensor, str]]) -> None:
        self.tensors: list[Tensor] = []
        self.masks: list[Tensor] = []
        for t, grouping in pairs:
            if not is_grouped(t):
                continue
            dim = group_dim(grouping)
            keep = (as_groups(t.detach(), grouping) != 0).any(dim=1)
            shape = [1] * t.dim()
            shape[dim] = t.shape[dim]
            self.tensors.append(t)
            self.masks.append(keep.to(t.dtype).reshape(shape))

    @classmethod
    def from_param_groups(cls, groups: Iterable[dict[str, Any]]) -> "FrozenGroups":
        """The zero groups of every grouped param of these optimizer param groups, by each group's ``grouping``."""
        return cls((p, g["grouping"]) for g in groups for p in g["params"])

    @property
    def frozen(self) -> int:
        """How many groups are held at zero."""
        return sum(int((m == 0).sum()) for m in self.masks)

    @torch.no_grad()
    def apply(self) -> None:
        """Set every frozen group back to exactly zero (in place)."""
        for t, mask in zip(self.tensors, self.masks):
            t.mul_(mask)

    def attach(self, optimizer: Optimizer) -> RemovableHandle:
        """Call :meth:`apply` after every ``optimizer.step()``; ``handle.remove()`` stops it."""
        return optimizer.register_step_post_hook(lambda *_: self.apply())

    def state_dict(self) -> dict[str, Any]:
        """The keep masks, one flat bool tensor per tensor, in order."""
        return {"keep": [mask.flatten().bool().cpu() for mask in self.masks]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore masks saved by :meth:`state_dict` for the same tensors."""
        keep = state["keep"]
        if len(keep) != len(self.masks):
            raise ValueError(f"FrozenGroups: the state holds {len(keep)} masks for {len(self.masks)} tensors")
        for i, (mask, saved) in enumerate(zip(self.masks, keep)):
            if saved.shape != (mask.numel(),):
                raise ValueError(f"FrozenGroups: mask {i} has {saved.numel()} groups, the tensor {mask.numel()}")
            self.masks[i] = saved.to(device=mask.device, dtype=mask.dtype).reshape(mask.shape)
