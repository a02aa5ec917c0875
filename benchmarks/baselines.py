r"""The methods the benchmarks compare: the unfused ways to get a proximal Adam step, and ours.

Each method takes one optimizer step over a :class:`~benchmarks.params.ParamSet`, from the
set's warm state (:meth:`Method.restore` puts it back before every timed round):

* **floor** -- ``torch.optim.Adam(fused=True)`` and ``(foreach=True)``, no prox: the cost of
  Adam alone.
* **traffic** -- a yardstick for the weighted prox: ``Adam(fused=True)`` and then the memory
  traffic that an exact weighted prox adds to it at the least, as torch's streaming ops with no
  arithmetic (:func:`weighted_prox_traffic_`). Where memory is the bottleneck, a weighted step
  can come near it but, short of cache reuse, not below it.
* **unfused** -- what a user writes by hand: ``Adam(fused=True)`` and then the prox as separate
  tensor ops per tensor (:func:`group_prox_ops_`, :func:`l1_prox_ops_`); and the published
  approach to the adaptive (weighted) prox, ``Adam(fused=True)`` and then, layer by layer, a fixed
  number of plain Newton iterations per group (:func:`published_weighted_prox_`).
* **fused** -- :class:`lomt_kernels.FusedGroupProxAdam` with a named backend.
* **peer** -- torchao's pruning-aware training (``torchao.prototype.pat``, ``pip install -e
  ".[peers]"``): its ``PruneOptimizer`` over ``Adam(fused=True)`` with ``ProxGroupLasso``, which
  keeps a latent copy of the weights, takes Adam's step on it and writes the prox of it into
  the weights. PAT has no grouper for a conv's input channels: ``Dim1Grouper`` groups the
  columns ``W[:, c, i, j]`` of the ``[N, C*kh*kw]`` view, and its ``zeroed`` figure counts the
  input channels all of whose columns it zeroed.

All hyperparameters come from :mod:`benchmarks.params`; groups are input channels.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lomt_kernels import FusedGroupProxAdam
from lomt_kernels.backends import BACKENDS, unavailable_reason
from lomt_kernels.contract import Prox

from .params import BETAS, EPS, LR, ParamSet
from .timing import fused_adam

#: Newton iterations of the published weighted prox (a fixed count, no convergence test).
PUBLISHED_NEWTON_ITERS = 10
#: The proxes benchmarked: all but ``none``, which is Adam.
PROXES = tuple(p.value for p in Prox if p is not Prox.NONE)


@dataclass(frozen=True)
class MethodSpec:
    """What to run: ``kind`` is ``"floor"``, ``"traffic"``, ``"unfused"`` or ``"fused"``."""

    key: str
    label: str
    kind: str
    prox: str
    backend: str | None = None


FLOOR = (
    MethodSpec("adam-fused", "torch.optim.Adam(fused=True)", "floor", "none"),
    MethodSpec("adam-foreach", "torch.optim.Adam(foreach=True)", "floor", "none"),
)
WEIGHTED_TRAFFIC = MethodSpec(
    "weighted-traffic", "Adam(fused) + the least traffic of an exact weighted prox", "traffic", "none"
)
UNFUSED = (
    MethodSpec("unfused-group", "Adam(fused) + group prox as tensor ops", "unfused", "group"),
    MethodSpec("unfused-l1", "Adam(fused) + l1 prox as tensor ops", "unfused", "l1"),
    MethodSpec(
        "published-weighted",
        f"Adam(fused) + weighted prox, {PUBLISHED_NEWTON_ITERS} Newton its/layer (published)",
        "unfused", "group_weighted",
    ),
)
PAT = MethodSpec(
    "pat-group", "torchao PAT: PruneOptimizer(Adam(fused)) + ProxGroupLasso, Dim1Grouper", "peer", "group"
)
#: The unfused method each fused prox is compared (and, in small mode, checked) against.
UNFUSED_FOR = {"group": "unfused-group", "l1": "unfused-l1", "group_weighted": "published-weighted"}


def fused_spec(backend: str, prox: str) -> MethodSpec:
    return MethodSpec(f"fused-{backend}-{prox}", f"FusedGroupProxAdam[{backend}] {prox}", "fused", prox, backend)


def all_specs(backends: tuple[str, ...] = BACKENDS) -> list[MethodSpec]:
    """Every method, floors first, then each unfused prox and its fused versions.

    The weighted prox's traffic bound comes just before the weighted methods.
    """
    specs = list(FLOOR)
    for prox in PROXES:
        if prox == "group_weighted":
            specs.append(WEIGHTED_TRAFFIC)
        specs.append(next(s for s in UNFUSED if s.key == UNFUSED_FOR[prox]))
        specs.extend(fused_spec(b, prox) for b in backends)
        if prox == "group":
            specs.append(PAT)
    return specs


def error_summary(exc: BaseException) -> str:
    """``Type: first line of its message``: a failed method's reason, for a log line or a table."""
    first = str(exc).splitlines()[:1]
    return f"{type(exc).__name__}: {first[0]}" if first else type(exc).__name__


def skip_reason(spec: MethodSpec, device: torch.device | str) -> str | None:
    """Why ``spec`` cannot be benchmarked on ``device`` (``None`` if it can)."""
    device = torch.device(device)
    if spec.kind == "peer":
        try:
            import torchao.prototype.pat  # noqa: F401
        except ImportError as exc:
            return f"torchao is not installed ({exc}); pip install -e \".[peers]\""
    if spec.kind != "fused":
        if device.type == "cuda" and not torch.cuda.is_available():
            return "no CUDA device"
        return None
    reason = unavailable_reason(spec.backend, device)
    if reason is not None:
        return f"backend {spec.backend!r} unavailable on {device}: {reason}"
    if spec.backend == "triton" and device.type == "cpu":
        return "backend 'triton' on the CPU is Triton's interpreter (TRITON_INTERPRET=1), a debugging tool, not a benchmark"
    return None


# --- the prox as a user writes it: separate tensor ops per tensor --------------------------

def _group_dims(p: Tensor) -> tuple[int, ...]:
    """The dims a group spans for in-channel groups: all but dim 1."""
    return tuple(d for d in range(p.dim()) if d != 1)


def group_prox_ops_(p: Tensor, tau: float) -> None:
    """``p_G *= max(0, 1 - tau/||p_G||)`` per input channel: a norm, a clamp and a mul."""
    norm = torch.linalg.vector_norm(p, dim=_group_dims(p), keepdim=True)
    p.mul_((1 - tau / norm).clamp_(min=0))


def l1_prox_ops_(p: Tensor, threshold: float) -> None:
    """Soft thresholding: ``p = softshrink(p, threshold)``."""
    p.copy_(torch.nn.functional.softshrink(p, threshold))


def published_weighted_prox_(p: Tensor, v: Tensor, step: float, tau: float, iters: int) -> None:
    r"""The weighted group prox as published: a fixed number of plain Newton iterations.

    With ``d = sqrt(v)/sqrt(1 - beta2^t) + eps`` and ``a = tau/d``, a group is zero when
    ``||d z|| <= tau``; otherwise ``theta = ||x||`` solves
    :math:`f(\theta) = \sum_j z_j^2/(\theta + a_j)^2 - 1 = 0`, here by ``iters`` Newton steps
    on ``f`` itself from ``theta = 0``, with no safeguard and no convergence test, and
    ``x_j = d_j theta z_j/(d_j theta + tau)``. Vectorised over the groups of one layer only.
    """
    dims = _group_dims(p)
    d = v.sqrt().div_(math.sqrt(1 - BETAS[1] ** step)).add_(EPS)
    z = p
    active = torch.linalg.vector_norm(z * d, dim=dims, keepdim=True) > tau
    a = tau / d
    theta = torch.zeros_like(active, dtype=p.dtype)
    for _ in range(iters):
        r = theta + a
        q2 = (z / r) ** 2
        f = q2.sum(dims, keepdim=True) - 1
        fprime = -2 * (q2 / r).sum(dims, keepdim=True)
        theta = theta - f / fprime
    x = d * theta * z / (d * theta + tau)
    p.copy_(torch.where(active, x, torch.zeros_like(x)))


def weighted_prox_traffic_(p: Tensor, v: Tensor) -> None:
    """The memory traffic an exact weighted prox adds to the Adam step at the least, and no more.

    After the Adam update, ``p`` holds z and ``v`` gives d. Each group's ``theta`` is the root of
    an equation over all of the group's z and d, and the sums that the Adam pass itself can
    gather only give a first step towards it; so at least one more read of z and d (here of
    ``p`` and ``v``) evaluates the equation, and one more read of them, with a write of ``p``,
    applies the result. Each op here is one streaming pass of torch's.
    """
    torch.sum(p)  # the root evaluation: one read of z ...
    torch.sum(v)  # ... and of d's source
    p.mul_(v)  # the rescale: read z and d, write p


def _tau(p: Tensor, lambda_: float) -> float:
    return LR * lambda_ * math.sqrt(p.numel() // p.shape[1])


_FLUSH_BYTES = 256 << 20
_flush_buffers: dict[torch.device, Tensor] = {}


def flush_caches(device: torch.device) -> None:
    """Write a 256 MiB buffer on ``device``: more than any CPU L3 or GPU L2 holds."""
    buf = _flush_buffers.get(device)
    if buf is None:
        buf = _flush_buffers[device] = torch.empty(_FLUSH_BYTES // 4, dtype=torch.float32, device=device)
    buf.fill_(1.0)


# --- one runnable method ---------------------------------------------------------------

class Method:
    """One method's params, optimizer and state over a :class:`ParamSet`, ready to step.

    Params are copies of the set's; gradients are the set's own tensors (no method writes
    them). ``restore()`` copies the set's params and warm state back in, so each call of
    ``step()`` after it does the same work.
    """

    def __init__(self, spec: MethodSpec, pset: ParamSet, *, newton_iters: int = PUBLISHED_NEWTON_ITERS):
        self.spec = spec
        self.pset = pset
        self.newton_iters = newton_iters
        self.lambda_ = pset.lambdas.get(spec.prox, 0.0)
        self.params = [nn.Parameter(p.clone()) for p in pset.params]
        for p, g in zip(self.params, pset.grads):
            p.grad = g
        self.prox_params = [p for p, m in zip(self.params, pset.prox_mask) if m]
        self.prox_params_set = set(self.prox_params)
        # FusedGroupProxAdam and fused Adam keep step counts on the params' device, foreach Adam on the CPU.
        state_step_on_device = True
        if spec.kind == "fused":
            groups = [{"params": self.prox_params, "lambda_": self.lambda_, "prox": spec.prox}]
            rest = [p for p, m in zip(self.params, pset.prox_mask) if not m]
            if rest:
                groups.append({"params": rest, "lambda_": 0.0, "prox": "none"})
            self.optimizer: torch.optim.Optimizer = FusedGroupProxAdam(
                groups, lr=LR, betas=BETAS, eps=EPS, grouping="in_channel", backend=spec.backend
            )
        elif spec.kind == "peer":
            from torchao.prototype.pat import PruneOptimizer

            rest = [p for p, m in zip(self.params, pset.prox_mask) if not m]
            # PAT thresholds its latent weights by reg_lambda * gamma * sqrt(n_G), gamma the running
            # sum of the lr (pset.step * LR here): this reg_lambda gives our lr * lambda_ * sqrt(n_G).
            groups = [{"params": self.prox_params, "group_type": "Dim1Grouper", "prox_type": "ProxGroupLasso",
                       "reg_lambda": self.lambda_ / pset.step}]
            base = fused_adam(groups + ([{"params": rest}] if rest else []), lr=LR, betas=BETAS, eps=EPS)
            self.optimizer = PruneOptimizer(base, warmup_steps=0)
        else:
            foreach = spec.key == "adam-foreach"
            if foreach:
                self.optimizer = torch.optim.Adam(self.params, lr=LR, betas=BETAS, eps=EPS, foreach=True)
            else:
                self.optimizer = fused_adam(self.params, lr=LR, betas=BETAS, eps=EPS)
            state_step_on_device = not foreach
        for p, m, v in zip(self.params, pset.exp_avgs, pset.exp_avg_sqs):
            self.optimizer.state[p] = {
                "step": torch.tensor(0.0, dtype=torch.float32, device=p.device if state_step_on_device else "cpu"),
                "exp_avg": torch.empty_like(m),
                "exp_avg_sq": torch.empty_like(v),
            }
        self.restore()

    @torch.no_grad()
    def restore(self) -> None:
        """Put the set's params and warm Adam state back, then evict them from the caches.

        The eviction makes every round start cold, as a training step does after the forward
        and backward passes, even when the whole set fits in the last-level cache.
        """
        for p, p0, m0, v0 in zip(self.params, self.pset.params, self.pset.exp_avgs, self.pset.exp_avg_sqs):
            state = self.optimizer.state[p]
            p.copy_(p0)
            state["exp_avg"].copy_(m0)
            state["exp_avg_sq"].copy_(v0)
            state["step"].fill_(self.pset.step)
        if self.spec.kind == "peer":
            # PAT's step past its first: Adam on the latent copy (here the warm params), then the prox.
            for p, p0 in zip(self.params, self.pset.params):
                if p in self.prox_params_set:
                    self.optimizer.state[p]["latent"] = p0.clone()
            self.optimizer.num_steps = 1
            for group in self.optimizer.regularized_param_groups():
                group["gamma"] = self.pset.step * LR  # AProx's running sum of the lr, at the set's step
        flush_caches(self.pset.device)
        self.synchronize()

    def synchronize(self) -> None:
        if self.pset.device.type == "cuda":
            torch.cuda.synchronize(self.pset.device)

    @torch.no_grad()
    def step(self) -> None:
        """One step; on CUDA it returns when the device has finished."""
        self.optimizer.step()
        prox = self.spec.prox if self.spec.kind == "unfused" else "none"
        if self.spec.kind == "traffic":
            for p in self.prox_params:
                weighted_prox_traffic_(p, self.optimizer.state[p]["exp_avg_sq"])
        elif prox == "group":
            for p in self.prox_params:
                group_prox_ops_(p, _tau(p, self.lambda_))
        elif prox == "l1":
            for p in self.prox_params:
                l1_prox_ops_(p, LR * self.lambda_)
        elif prox == "group_weighted":
            step = self.pset.step + 1  # the state's step after this step's increment
            for p in self.prox_params:
                v = self.optimizer.state[p]["exp_avg_sq"]
                published_weighted_prox_(p, v, step, _tau(p, self.lambda_), self.newton_iters)
        self.synchronize()

    def timed_step(self) -> float:
        """Seconds of one :meth:`step` from the restored warm state (the restore is not timed)."""
        self.restore()
        start = time.perf_counter()
        self.step()
        return time.perf_counter() - start

    @torch.no_grad()
    def zero_group_fraction(self) -> float:
        """Fraction of the prox tensors' groups (elements, for ``l1``) that are exactly zero."""
        zero = total = 0
        for p in self.prox_params:
            if self.spec.prox == "l1":
                zero += int((p == 0).sum())
                total += p.numel()
            else:
                nonzero = torch.linalg.vector_norm(p, dim=_group_dims(p)) != 0
                zero += int((~nonzero).sum())
                total += nonzero.numel()
        return zero / total if total else 0.0

    def state_tensors(self) -> list[Tensor]:
        """Params, then ``exp_avg``s, then ``exp_avg_sq``s (for comparing methods)."""
        states = [self.optimizer.state[p] for p in self.params]
        return (
            [p.detach() for p in self.params]
            + [s["exp_avg"] for s in states]
            + [s["exp_avg_sq"] for s in states]
        )


def max_abs_diff(a: Method, b: Method) -> float:
    """The largest elementwise difference between two methods' params and states."""
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a.state_tensors(), b.state_tensors()))
