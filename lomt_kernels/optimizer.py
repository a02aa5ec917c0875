"""``FusedGroupProxAdam``: Adam followed by a group-sparsity prox, fused into one pass."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import backends, distributed
from .contract import AdamHyper, Prox, StepTensors
from .grouping import GROUPINGS

# Keys our param groups add to torch.optim.Adam's, with their defaults: filled in when a
# state dict saved by torch.optim.Adam (or an older lomt) is loaded.
_GROUP_DEFAULTS: dict[str, Any] = {
    "lambda_": 0.0,
    "prox": "group",
    "grouping": "in_channel",
    "decoupled_weight_decay": False,
    "maximize": False,
    "backend": "auto",
    "capturable": False,
}
# torch.optim.Adam's keys that this optimizer accepts in a loaded state dict, with the only
# value it supports (None: any value, the key only picks an implementation).
_ADAM_OPTIONS: dict[str, Any] = {"amsgrad": False, "differentiable": False, "foreach": None, "fused": None}
# Keys that LR schedulers add to param groups.
_SCHEDULER_KEYS = ("initial_lr", "max_lr", "min_lr", "base_lr", "base_momentum", "max_momentum")
_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")
_PROX_NAMES = tuple(p.value for p in Prox)


def _check_params(params: Iterable[Tensor]) -> None:
    """Only real floating-point tensors can take an Adam step and a prox."""
    for i, p in enumerate(params):
        if p.is_complex():
            raise ValueError(
                f"param {i} is complex ({p.dtype}): the group norms and the prox are defined for real tensors; "
                "optimize torch.view_as_real(p) instead"
            )
        if not p.is_floating_point():
            raise ValueError(f"param {i} has dtype {p.dtype}: only floating-point params can be optimized")


def _check_state_dict(state_dict: dict[str, Any]) -> None:
    """Refuse a state dict this optimizer cannot continue from, naming what is wrong: another
    optimizer's keys, an Adam option it does not implement, or per-param state other than Adam's."""
    groups = state_dict.get("param_groups")
    if not isinstance(groups, list) or not isinstance(state_dict.get("state"), dict):
        raise ValueError("not an optimizer state dict: expected the keys 'state' and 'param_groups'")
    known = {"params", "lr", "betas", "eps", "weight_decay", *_GROUP_DEFAULTS, *_ADAM_OPTIONS, *_SCHEDULER_KEYS}
    for i, group in enumerate(groups):
        missing = [key for key in ("params", "lr", "betas", "eps", "weight_decay") if key not in group]
        if missing:
            raise ValueError(
                f"param group {i} of the loaded state lacks {missing}: it is not an Adam state (another optimizer's?)"
            )
        unknown = sorted(set(group) - known)
        if unknown:
            raise ValueError(
                f"param group {i} of the loaded state has keys {unknown} that neither FusedGroupProxAdam nor "
                "torch.optim.Adam has: is it another optimizer's state?"
            )
        for key, supported in _ADAM_OPTIONS.items():
            if supported is not None and group.get(key, supported) != supported:
                raise ValueError(
                    f"param group {i} of the loaded state has {key}={group[key]!r}, which FusedGroupProxAdam "
                    "does not support"
                )
    for index, p_state in state_dict["state"].items():
        if p_state and set(p_state) != set(_STATE_KEYS):
            raise ValueError(
                f"the loaded state of param {index} has keys {sorted(p_state)}, not Adam's {list(_STATE_KEYS)}: "
                "is it another optimizer's state?"
            )


def _check_hyperparameters(
    lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
    lambda_: float, prox: str, grouping: str, backend: str,
) -> None:
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"a tensor lr must have one element, got shape {tuple(lr.shape)}")
        lr = float(lr)
    if not lr >= 0.0:
        raise ValueError(f"invalid learning rate lr={lr}: it must be >= 0")
    if not eps >= 0.0:
        raise ValueError(f"invalid eps={eps}: it must be >= 0")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"invalid betas[{i}]={beta}: each beta must lie in [0, 1)")
    if not weight_decay >= 0.0:
        raise ValueError(f"invalid weight_decay={weight_decay}: it must be >= 0")
    if not lambda_ >= 0.0:
        raise ValueError(f"invalid lambda_={lambda_}: the sparsity strength must be >= 0")
    if prox not in _PROX_NAMES:
        raise ValueError(f"unknown prox={prox!r}: expected one of {_PROX_NAMES}")
    if grouping not in GROUPINGS:
        raise ValueError(f"unknown grouping={grouping!r}: expected one of {GROUPINGS}")
    if backend != "auto" and backend not in backends.BACKENDS:
        raise ValueError(f"unknown backend={backend!r}: expected 'auto' or one of {backends.BACKENDS}")


def _check_group(group: dict[str, Any]) -> None:
    _check_hyperparameters(
        group["lr"], group["betas"], group["eps"], group["weight_decay"],
        group["lambda_"], group["prox"], group["grouping"], group["backend"],
    )


def _hyper(group: dict[str, Any]) -> AdamHyper:
    """The backend contract's record of a param group's hyperparameters."""
    beta1, beta2 = group["betas"]
    return AdamHyper(
        beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
        decoupled_weight_decay=group["decoupled_weight_decay"], maximize=group["maximize"],
        lambda_=group["lambda_"], prox=group["prox"], grouping=group["grouping"],
    )


def _on(device: torch.device, t: Tensor | None) -> Tensor | None:
    """``t`` on ``device`` (GradScaler keeps its scale on the device of the first grads it saw)."""
    return None if t is None else t.to(device, non_blocking=True)


class FusedGroupProxAdam(Optimizer):
    r"""Adam (or AdamW) followed by a proximal step for group sparsity, fused per tensor.

    For each parameter ``p`` with gradient ``g`` and Adam state ``m, v, t``:

    .. math::

        m &\leftarrow \beta_1 m + (1-\beta_1) g, \qquad
        v \leftarrow \beta_2 v + (1-\beta_2) g^2, \\
        d &= \sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon, \qquad
        z = p - \frac{\mathrm{lr}}{1-\beta_1^t} \frac{m}{d}, \\
        p &\leftarrow \operatorname{prox}(z)

    (``g`` is negated for ``maximize``; ``weight_decay`` adds ``wd * p`` to ``g``, or with
    ``decoupled_weight_decay`` scales ``p`` by ``1 - lr * wd`` first, as AdamW.) The prox acts
    on each group ``G`` of ``n_G`` elements with ``tau = lr * lambda_ * sqrt(n_G)``:

    * ``"group"``: :math:`p_G = \max(0, 1 - \tau/\|z_G\|)\, z_G` (the group-lasso prox);
    * ``"group_weighted"``: :math:`p_G = \arg\min_x \frac12 \|x - z_G\|^2_{\mathrm{diag}(d_G)}
      + \tau \|x\|`, the prox in Adam's own metric (Deleu & Bengio, 2021);
    * ``"l1"``: :math:`p = \mathrm{sign}(z) \max(|z| - \mathrm{lr}\,\lambda, 0)`;
    * ``"none"``: plain Adam.

    Groups are input channels (``grouping="in_channel"``: ``W[:, c]`` of a conv or Linear
    weight) or output channels (``"out_channel"``: ``W[n]``). Tensors with fewer than two
    dimensions always take the plain Adam step.

    Non-finite values, on every backend: the prox acts only where its statistics are finite.
    A group whose :math:`\|z_G\|` (``"group"``), or :math:`\|D z_G\|` or
    :math:`\sum_j d_j^3 z_j^2` (``"group_weighted"``, :math:`D = \mathrm{diag}(d_G)`), is NaN
    or infinite, and for ``"l1"`` an element whose ``z`` is, is passed through: ``p_G = z_G``,
    what plain Adam gives. A NaN or inf anywhere in ``z_G`` (or, for the weighted prox, in
    ``d_G``) makes these so, as does an overflow of the sums. So a NaN gradient element leaves
    one NaN element, as in :class:`torch.optim.Adam`, and is never turned into exact zeros that
    would read as sparsity; finite groups are unaffected.

    Args:
        params: tensors or param-group dicts; a group may override every keyword below.
        lr, betas, eps, weight_decay: as :class:`torch.optim.Adam`.
        lambda_: sparsity strength (``0`` gives exactly Adam).
        prox: ``"group"``, ``"group_weighted"``, ``"l1"`` or ``"none"``.
        grouping: ``"in_channel"`` or ``"out_channel"``.
        decoupled_weight_decay: AdamW-style decay.
        maximize: ascend instead of descend.
        backend: ``"torch"`` (reference), ``"cpu"`` (fused C++), ``"triton"``, ``"cuda"`` or
            ``"auto"`` (fastest available for the params' device).
        capturable: insist that ``step()`` makes no host sync, so that it can be captured in a
            CUDA graph: only a backend that declares itself capturable (Triton and CUDA: their steps are, once
            one step with the same tensors has built the launch plan) may then run the group;
            any other is an error.

    The state dict has :class:`torch.optim.Adam`'s schema (``step``, ``exp_avg``,
    ``exp_avg_sq``; each step count a float32 tensor on its param's device, as torch's fused
    Adam keeps it), so checkpoints load in either direction. With :class:`torch.amp.GradScaler`
    the step unscales the gradients itself and is skipped when the scaler found an inf or NaN
    (on the device, for the Triton backend). DTensor params (FSDP2's ``fully_shard``) are supported: see
    :mod:`lomt_kernels.distributed`.
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        lambda_: float = 0.0,
        prox: str = "group",
        grouping: str = "in_channel",
        decoupled_weight_decay: bool = False,
        maximize: bool = False,
        backend: str = "auto",
        capturable: bool = False,
    ) -> None:
        _check_hyperparameters(lr, betas, eps, weight_decay, lambda_, prox, grouping, backend)
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, lambda_=lambda_, prox=prox,
            grouping=grouping, decoupled_weight_decay=decoupled_weight_decay,
            maximize=maximize, backend=backend, capturable=capturable,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _check_params(group["params"])
            _check_group(group)
        except ValueError:
            self.param_groups.pop()
            raise
        group["prox"] = Prox(group["prox"]).value  # a plain str, so state dicts load with weights_only

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As :meth:`torch.optim.Optimizer.load_state_dict`, after checking the state with the
        constructor's checks (a saved state is untrusted input)."""
        _check_state_dict(state_dict)
        for i, group in enumerate(state_dict["param_groups"]):
            filled = {**_GROUP_DEFAULTS, **{k: v for k, v in self.defaults.items() if k in _GROUP_DEFAULTS}, **group}
            try:
                _check_group(filled)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"param group {i} of the loaded state: {exc}") from exc
        super().load_state_dict(state_dict)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in _GROUP_DEFAULTS.items():
                group.setdefault(key, self.defaults.get(key, value))
            for p in group["params"]:
                p_state = self.state.get(p, {})
                if p_state:
                    p_state["step"] = torch.as_tensor(p_state["step"], dtype=torch.float32).to(p.device)

    def _init_group(
        self, group: dict[str, Any]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor], set[int]]:
        """The group's params that have grads, with their grads, ``exp_avg``, ``exp_avg_sq`` and
        ``step`` (created on first use), and the positions of the DTensors among them."""
        params, grads, exp_avgs, exp_avg_sqs, steps, sharded = [], [], [], [], [], set()
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise ValueError(
                    "FusedGroupProxAdam does not support sparse gradients; use "
                    "torch.optim.SparseAdam for embeddings with sparse=True"
                )
            state = self.state[p]
            dtensor = distributed.is_dtensor(p)
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif dtensor:
                # A plain load_state_dict may have left full tensors or other placements.
                for key in ("exp_avg", "exp_avg_sq"):
                    state[key] = distributed.align_state(p, state[key])
            if dtensor:
                sharded.add(len(params))
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        return params, grads, exp_avgs, exp_avg_sqs, steps, sharded

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """Perform one optimisation step. ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # Set by torch.amp.GradScaler (see _step_supports_amp_scaling).
        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        found_inf: Tensor | None = getattr(self, "found_inf", None)
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, steps, sharded = self._init_group(group)
            if not params:
                continue
            hyper = _hyper(group)
            by_device: dict[torch.device, list[int]] = {}
            for i, p in enumerate(params):
                if i not in sharded:
                    by_device.setdefault(p.device, []).append(i)
            tensors = StepTensors(params, grads, exp_avgs, exp_avg_sqs, steps)
            for device, idx in by_device.items():
                name, backend = backends.resolve(group["backend"], device)
                if group["capturable"] and not backend.capturable:
                    raise RuntimeError(
                        f"capturable=True needs a backend whose steps make no host sync (triton or cuda); this group "
                        f"resolved to {name!r}, which is not capturable"
                    )
                # Usually one device holds the whole group: no lists to rebuild (host time every step).
                on_device = tensors if len(idx) == len(params) else tensors.select(idx)
                on_device.grad_scale, on_device.found_inf = _on(device, grad_scale), _on(device, found_inf)
                backend.step(on_device, hyper, group["lr"])
            if sharded:
                # DTensor params (FSDP2, tensor parallel): local shards, with cross-rank group norms.
                on_mesh = tensors.select(sorted(sharded))
                on_mesh.grad_scale, on_mesh.found_inf = grad_scale, found_inf
                distributed.sharded_step(on_mesh, hyper, float(group["lr"]), backend=group["backend"])
        return loss
