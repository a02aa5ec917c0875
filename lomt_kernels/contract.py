r"""The contract between :class:`~lomt_kernels.FusedGroupProxAdam` and its backends.

A backend (``"torch"``, the reference; ``"cpu"``; ``"triton"``; ``"cuda"``) is a module that
implements :class:`Backend` in full:

* ``step(tensors, hyper, lr)`` takes one proximal Adam step, in place, for the tensors of one
  device (:class:`StepTensors`) with the hyperparameters of one param group (:class:`AdamHyper`);
* ``unavailable_reason(device)`` is ``None`` when it can run on ``device``, else what is missing;
* ``capturable`` says whether its steps make no host sync (so a CUDA graph can capture them).

Every backend gives the same result up to rounding, with the same step semantics:

* ``state_steps`` hold the counts *before* this step, and the backend adds one to each;
* ``grad_scale`` (a 0-d tensor, as :class:`torch.amp.GradScaler` sets it) divides the grads;
* a nonzero ``found_inf`` leaves params, moments and step counts unchanged;
* ``lr`` is a float or a 0-d tensor.

``lr`` is passed beside the record rather than in it: it is the one value that may be a device
tensor (read by a capturable kernel, never on the host), which would make a frozen record of plain
scalars neither hashable nor cheap to compare, and it changes on every step under a scheduler.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Protocol

import torch
from torch import Tensor

from .grouping import GROUPINGS


class Prox(enum.StrEnum):
    """The proximal step after Adam's (see :mod:`lomt_kernels.reference` for the maths).

    A ``str`` enum, so ``Prox.GROUP == "group"`` and a param group's ``prox="group"`` stay valid.
    """

    NONE = "none"
    GROUP = "group"
    GROUP_WEIGHTED = "group_weighted"
    L1 = "l1"

    @property
    def grouped(self) -> bool:
        """Whether the prox acts on whole groups (and so needs each group's sums)."""
        return self in (Prox.GROUP, Prox.GROUP_WEIGHTED)

    @property
    def code(self) -> int:
        """The prox's number in the fused kernels (Triton's ``S_PROX`` column, the CUDA op's codes)."""
        return _CODES[self]


_CODES = {Prox.NONE: 0, Prox.GROUP: 1, Prox.GROUP_WEIGHTED: 2, Prox.L1: 3}


@dataclasses.dataclass(frozen=True)
class AdamHyper:
    """One param group's hyperparameters, less ``lr`` (see the module docstring for why).

    ``prox`` may be given as its name; it is stored as a :class:`Prox`. Values are checked by
    :class:`~lomt_kernels.FusedGroupProxAdam`, which names the bad one; this record checks only
    the names, which every layer below it relies on.
    """

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled_weight_decay: bool = False
    maximize: bool = False
    lambda_: float = 0.0
    prox: Prox = Prox.GROUP
    grouping: str = "in_channel"

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "prox", Prox(self.prox))
        except ValueError:
            raise ValueError(f"unknown prox={self.prox!r}: expected one of {[p.value for p in Prox]}") from None
        if self.grouping not in GROUPINGS:
            raise ValueError(f"unknown grouping={self.grouping!r}: expected one of {GROUPINGS}")


@dataclasses.dataclass
class StepTensors:
    """The tensors of one step on one device: equal-length lists, entry ``i`` for param ``i``.

    ``state_steps`` are one-element float32 tensors (the counts before this step; the backend
    adds one), ``exp_avgs`` and ``exp_avg_sqs`` have their param's shape, strides and dtype.
    ``grad_scale`` divides the grads; a nonzero ``found_inf`` skips the step.
    """

    params: list[Tensor]
    grads: list[Tensor]
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    state_steps: list[Tensor]
    grad_scale: Tensor | None = None
    found_inf: Tensor | None = None

    def lists(self) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """``(params, grads, exp_avgs, exp_avg_sqs, state_steps)``."""
        return self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.state_steps

    def select(self, index: list[int]) -> StepTensors:
        """The entries at ``index``, with the same ``grad_scale`` and ``found_inf``."""
        return StepTensors(*([ts[i] for i in index] for ts in self.lists()), self.grad_scale, self.found_inf)

    def skipped(self) -> bool:
        """Whether ``found_inf`` says to skip this step (read on the host: a sync on a GPU)."""
        return self.found_inf is not None and bool(self.found_inf)

    def count_step(self) -> None:
        """Add one to every step count (host-side backends, after :meth:`skipped` said no)."""
        if self.state_steps:
            torch._foreach_add_(self.state_steps, 1)


class Backend(Protocol):
    """What every backend module provides (see the module docstring)."""

    #: Whether a step makes no host sync (after a first step with the same tensors).
    capturable: bool

    def step(self, tensors: StepTensors, hyper: AdamHyper, lr: float | Tensor) -> None:
        """One proximal Adam step, in place, with the semantics of the module docstring."""
        ...

    def unavailable_reason(self, device: torch.device) -> str | None:
        """``None`` if this backend can step params on ``device``, else what is missing."""
        ...
