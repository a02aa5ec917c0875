r"""Learn λ while training: drive a model's group sparsity or compute to a target.

:class:`LambdaController` treats the sparsity strength ``lambda_`` of some
:class:`~lomt_kernels.FusedGroupProxAdam` param groups as a controlled variable. It is called
at a fixed interval of the user's own loop (after every epoch, or every ``k`` steps),
``total_updates`` times in a run; each call measures a *figure* and sets the groups' ``lambda_``
for the next interval:

* :class:`ZeroGroupFraction` (the default): the fraction of the controlled params' groups that
  are exactly zero. It grows with λ.
* :class:`~lomt_kernels.MacFraction`: a module's MACs per example with its zero channels
  removed, over its dense MACs. It shrinks as λ grows.

Write ``x`` for the figure turned into a sparsity (``x = f``, or ``x = 1 - f`` for a figure
that shrinks with λ) and ``x_T`` for the target so turned. Call ``n`` (counted from 1) sets the
λ of interval ``n + 1``:

1. **Warm-up**, ``n <= warmup``: λ stays at its initial value (for the first ``warmup + 1``
   intervals); the prox starts the path alone.
2. **Control**, ``warmup < n < total_updates - healing``: the goal follows a cubic ramp from
   the figure ``x_W`` measured at the first control call to the target, reached after a fraction
   ``ramp`` of the control stretch and held after it,

   .. math::

       x^*(n) = x_W + (x_T - x_W)\,\bigl(1 - (1 - r)^3\bigr), \qquad
       r = \min\Bigl(1, \frac{n - \text{warmup}}{\text{ramp}\,(\text{total} - \text{healing} - \text{warmup})}\Bigr),

   and λ moves multiplicatively on the gap,

   .. math::

       \log\lambda \leftarrow \operatorname{clip}_{[\log\lambda_\min, \log\lambda_\max]}
       \Bigl(\log\lambda + \operatorname{clip}_{[-s, s]}\bigl(k\,(x^*(n) - x)\bigr)\Bigr)

   with gain ``k`` and largest step ``s`` (``max_step``).
3. **Healing**, ``n >= total_updates - healing``: the groups that are zero at the first healing
   call are frozen (:class:`~lomt_kernels.FrozenGroups`, attached to the optimizer) and λ is
   set to 0, so the rest fine-tunes without the prox and the figure no longer moves. The
   figure that is frozen is the one the run ends with. It jitters from step to step around
   the goal (groups near the threshold leave and rejoin zero), so healing may start up to
   ``settle`` calls early, at the first of those calls where the figure is within
   ``tolerance`` of the target.

Why this is stable. The figure rises monotonically with λ, and responds within a step or two
(a group whose norm is near the threshold reaches zero at the next prox). The update is an
integral controller on ``log λ``: in log space the gain is independent of λ's scale, which
spans decades between data sets and learning rates, and a gap of ``Δ`` changes λ by the factor
``exp(kΔ)`` whatever λ is. Near the goal the loop gain per call is ``k · dx/dlog λ``; an
integral loop with a one-call delay rings when that exceeds one and diverges past two. The
default ``k = 0.5`` keeps it below one for any figure that moves by less than twice its range
per e-fold of λ (on the synthetic NYU data the zero-group fraction moves by about 0.2 and the
MAC fraction by up to 0.7), so the loop settles without ringing. A gain that suits one call per
step is small for one call per epoch (raise ``gain`` and ``max_step`` there, at the price of
that margin). The per-call step is capped (``max_step``, about 10%) so a large gap early on
cannot throw λ far past the equilibrium, and the bounds stop integral wind-up when a target
cannot be reached. The ramp keeps the gap small throughout, since a group that has reached zero
comes back only when its gradient outgrows the threshold, so overshoot is slow to undo. As the learning rate decays
the prox threshold ``lr · λ`` shrinks; the integral term absorbs that by raising λ.

Under ``torch.distributed`` (DDP) rank 0's figure is broadcast at each call and every rank
computes λ from it and the same state, so that every rank uses the same λ. The figures read
whole tensors: FSDP-sharded (DTensor) params are not supported.
:meth:`LambdaController.state_dict` holds everything the next call depends on, so a run
resumed from a checkpoint continues exactly.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Protocol

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from .distributed import is_dtensor
from .healing import FrozenGroups
from .sparsity import group_sparsity

PHASES = ("warmup", "control", "healing")


class Figure(Protocol):
    """A measurement in ``[0, 1]`` of the model's sparsity or compute, read when called."""

    decreases_with_lambda: bool

    def __call__(self) -> float: ...


class ZeroGroupFraction:
    """The fraction of groups that are exactly zero among the grouped params of some param groups."""

    decreases_with_lambda = False

    def __init__(self, groups: Iterable[dict[str, Any]]) -> None:
        self.groups = [(list(g["params"]), g["grouping"]) for g in groups]
        if any(is_dtensor(p) for params, _ in self.groups for p in params):
            raise ValueError("ZeroGroupFraction reads whole tensors; FSDP-sharded (DTensor) params are not supported")

    def __call__(self) -> float:
        reports = [group_sparsity(params, grouping) for params, grouping in self.groups]
        total = sum(r.groups for r in reports)
        return sum(r.zero_groups for r in reports) / total if total else 0.0


class LambdaController:
    """Sets ``lambda_`` of some optimizer param groups so that a figure reaches ``target`` by the end.

    The control law, its phases and why it is stable are in :mod:`lomt_kernels.lambda_control`.

    Args:
        optimizer: a :class:`~lomt_kernels.FusedGroupProxAdam` (any optimizer whose param
            groups carry ``lambda_`` and ``grouping``).
        target: the figure to end at, in ``(0, 1)``: the fraction of zero groups, or the MAC
            fraction with ``figure=MacFraction(...)``.
        total_updates: how many times :meth:`update` is called in the run.
        figure: what to measure; by default :class:`ZeroGroupFraction` of the controlled groups.
        groups: indices of the param groups to control; by default every group with a group
            prox (``"group"``, ``"group_weighted"``) and ``lambda_ > 0``. They all get one λ.
        initial: the starting λ; by default the first controlled group's ``lambda_``.
        warmup: calls that only measure before control starts (λ held at ``initial``).
        healing: calls at the end with the zero groups frozen and λ = 0 (0: no healing).
        settle: how many calls early healing may start, on the first call within ``tolerance``.
        tolerance: how near the target the figure must be to start healing early.
        ramp: fraction of the control stretch over which the goal ramps to the target.
        gain: ``k``, the change in ``log λ`` per unit gap.
        max_step: the largest change in ``log λ`` per call.
        bounds: ``(λ_min, λ_max)``; by default ``initial`` divided and multiplied by 1000.

    Call :meth:`update` at the end of every interval; it returns that call's record
    (also appended to :attr:`history`): ``{"update": n, "phase", "figure", "goal",
    "lambda_"}`` with ``lambda_`` the value set for the next interval.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        target: float,
        total_updates: int,
        *,
        figure: Figure | None = None,
        groups: Iterable[int] | None = None,
        initial: float | None = None,
        warmup: int = 1,
        healing: int = 0,
        settle: int = 0,
        tolerance: float = 0.01,
        ramp: float = 0.6,
        gain: float = 0.5,
        max_step: float = 0.1,
        bounds: tuple[float, float] | None = None,
    ) -> None:
        if groups is None:
            groups = [
                i for i, g in enumerate(optimizer.param_groups)
                if g.get("prox") in ("group", "group_weighted") and g.get("lambda_", 0.0) > 0
            ]
        self.group_indices = list(groups)
        if not self.group_indices:
            raise ValueError(
                "LambdaController: no param group to control; give groups=[...] or a group with "
                "prox='group' or 'group_weighted' and lambda_ > 0 (its starting value)"
            )
        self.optimizer = optimizer
        controlled = [optimizer.param_groups[i] for i in self.group_indices]
        initial = controlled[0]["lambda_"] if initial is None else initial
        if not 0.0 < target < 1.0:
            raise ValueError(f"LambdaController: target={target} must lie in (0, 1) (a fraction, not a percentage)")
        if not initial > 0:
            raise ValueError(f"LambdaController: the starting lambda_ is {initial}; it must be > 0 (pass initial=...)")
        if warmup < 0 or healing < 0 or warmup + healing + 1 >= total_updates:
            raise ValueError(
                f"LambdaController: warmup={warmup} and healing={healing} must be >= 0 and leave at least one "
                f"control call among total_updates={total_updates}"
            )
        if settle < 0 or settle > total_updates - healing - warmup - 1 or not tolerance >= 0:
            raise ValueError(
                f"LambdaController: settle={settle} must lie in [0, the control calls] and tolerance={tolerance} be >= 0"
            )
        if not 0.0 < ramp <= 1.0 or not gain > 0 or not max_step > 0:
            raise ValueError(f"LambdaController: need 0 < ramp <= 1 ({ramp}), gain > 0 ({gain}), max_step > 0 ({max_step})")
        low, high = bounds if bounds is not None else (initial / 1000.0, initial * 1000.0)
        if not 0.0 < low <= initial <= high:
            raise ValueError(f"LambdaController: bounds ({low}, {high}) must satisfy 0 < low <= initial ({initial}) <= high")
        self.figure: Figure = figure if figure is not None else ZeroGroupFraction(controlled)
        self.target = target
        self.total_updates = total_updates
        self.warmup, self.healing, self.ramp = warmup, healing, ramp
        self.settle, self.tolerance = settle, tolerance
        self.gain, self.max_step, self.bounds = gain, max_step, (low, high)
        self.updates = 0
        self.lambda_ = initial
        self.start: float | None = None  # the sparsity x_W the ramp starts from
        self.frozen: FrozenGroups | None = None
        self._hook = None
        self.history: list[dict[str, Any]] = []
        self._set_lambda(initial)

    @property
    def phase(self) -> str:
        """The phase of the interval now running: ``"warmup"``, ``"control"`` or ``"healing"``."""
        if self.frozen is not None:
            return "healing"
        return "warmup" if self.updates <= self.warmup else "control"

    def _sparsity(self, value: float) -> float:
        return 1.0 - value if self.figure.decreases_with_lambda else value

    def goal(self, n: int) -> float:
        """The figure the schedule asks for at call ``n`` (the target from the end of the ramp on)."""
        target = self._sparsity(self.target)
        start = target if self.start is None else self.start
        stretch = self.ramp * (self.total_updates - self.healing - self.warmup)
        r = min(max((n - self.warmup) / max(stretch, 1.0), 0.0), 1.0)
        return self._sparsity(start + (target - start) * (1.0 - (1.0 - r) ** 3))

    def _set_lambda(self, value: float) -> None:
        for i in self.group_indices:
            self.optimizer.param_groups[i]["lambda_"] = value

    def _agree(self, figure: float) -> float:
        """Rank 0's figure on every rank (itself without an initialised process group)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return figure
        device = self.optimizer.param_groups[self.group_indices[0]]["params"][0].device
        value = torch.tensor([figure], dtype=torch.float64, device=device)
        dist.broadcast(value, src=0)
        return float(value)

    def _freeze(self) -> None:
        if self._hook is not None:
            self._hook.remove()
        self._hook = self.frozen.attach(self.optimizer)
        self._set_lambda(0.0)

    def update(self) -> dict[str, Any]:
        """Measure the figure, set λ for the next interval, and return this call's record.

        Every rank computes λ from rank 0's figure and the same state, so all ranks agree.
        """
        n = self.updates + 1
        figure = self._agree(float(self.figure()))
        x = self._sparsity(figure)
        healing_at = self.total_updates - self.healing
        on_target = abs(figure - self.target) <= self.tolerance
        if self.healing and (self.frozen is not None or n >= healing_at or (n >= healing_at - self.settle and on_target)):
            phase = "healing"
            if self.frozen is None:
                controlled = [self.optimizer.param_groups[i] for i in self.group_indices]
                self.frozen = FrozenGroups.from_param_groups(controlled)
                self._freeze()
        elif n > self.warmup:
            phase = "control"
            if self.start is None:
                self.start = x
            step = self.gain * (self._sparsity(self.goal(n)) - x)
            step = min(max(step, -self.max_step), self.max_step)
            low, high = self.bounds
            self.lambda_ = min(max(math.exp(math.log(self.lambda_) + step), low), high)
            self._set_lambda(self.lambda_)
        else:
            phase = "warmup"
        self.updates = n
        record = {
            "update": n, "phase": phase, "figure": figure, "goal": self.goal(n),
            "lambda_": self.optimizer.param_groups[self.group_indices[0]]["lambda_"],
        }
        self.history.append(record)
        return record

    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`update` depends on, and the records so far."""
        return {
            "updates": self.updates, "lambda_": self.lambda_, "start": self.start,
            "frozen": None if self.frozen is None else self.frozen.state_dict(),
            "history": [dict(r) for r in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`: λ is set on the groups and, in healing, the frozen groups reattached."""
        self.updates, self.lambda_, self.start = int(state["updates"]), float(state["lambda_"]), state["start"]
        self.history = [dict(r) for r in state["history"]]
        if state["frozen"] is None:
            self.frozen = None
            if self._hook is not None:
                self._hook.remove()
                self._hook = None
            self._set_lambda(self.lambda_)
        else:
            controlled = [self.optimizer.param_groups[i] for i in self.group_indices]
            self.frozen = FrozenGroups.from_param_groups(controlled)
            self.frozen.load_state_dict(state["frozen"])
            self._freeze()
