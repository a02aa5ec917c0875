r"""The proximal Adam step on DTensor parameters: FSDP2 (``fully_shard``) and tensor parallel.

A DTensor parameter is a global tensor laid out over a device mesh; each rank holds a local
shard (:meth:`DTensor.to_local`). The Adam part of the step is elementwise, so every rank runs
it on its own shard. The prox works on groups (see :mod:`lomt_kernels.grouping`), and whether
a group lies wholly on one rank depends on the placements:

* ``Replicate()`` on a mesh dimension: every rank has the whole tensor along it; nothing to do.
* ``Shard(k)`` with ``k`` the group dimension (``Shard(0)`` with ``grouping="out_channel"``,
  ``Shard(1)`` with ``"in_channel"``): each group is on one rank, whole.
* ``Shard(k)`` along any other dimension, above all FSDP2's ``Shard(0)`` with
  ``grouping="in_channel"``: group ``W[:, c]`` is split across the ranks of that mesh
  dimension. Its norm is the square root of the sum of the ranks' partial sums of squares.

Where every group is whole on its rank the local shards go to the param group's own backend
(the fused kernels included), with no communication: the unsharded step, shard by shard. Otherwise
the group proxes (``"group"``, ``"group_weighted"``) run the reference maths
(:func:`lomt_kernels.reference.group_prox_adam_tensor`) with a ``reduce`` hook that all-reduces
the per-group partial sums (``[groups, 2]`` numbers) over those mesh dimensions' process
groups: one all-reduce per tensor for the group shrink; for the weighted prox one, then one per
Newton iteration (a handful). That is correct but not fused: the fused kernels cannot reduce
across ranks. ``"l1"`` and ``"none"`` are elementwise and never communicate. Either way the
result equals the unsharded optimizer's up to summation order (and the weighted prox's Newton
stopping tolerance, tested per tensor on whatever groups a rank holds).

Optimizer state is created as ``torch.optim.Adam`` creates it: ``exp_avg`` and ``exp_avg_sq``
are ``zeros_like(param)``, DTensors with the parameter's mesh and placements, and ``step`` is a
plain scalar tensor. ``torch.distributed.checkpoint`` saves and loads it through
``get_optimizer_state_dict`` / ``set_optimizer_state_dict``; a one-process state dict (full
plain tensors) loaded with ``load_state_dict`` is sharded on the next step (:func:`align_state`).

Every rank must call ``step()`` with the same parameters having gradients (as FSDP2 ensures):
the reductions are collectives, issued in parameter order.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor

from . import backends
from .contract import AdamHyper, StepTensors
from .grouping import group_dim, is_grouped
from .reference import GroupReduce, group_prox_adam_tensor


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a DTensor.

    No DTensor can exist before ``torch.distributed.tensor`` is imported, so this looks the
    class up rather than importing it (about a second, and absent from builds without
    ``torch.distributed``).
    """
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def sharded_dims(param: Tensor) -> list[int | None]:
    """The tensor dimension each mesh dimension shards DTensor ``param`` along (``None``: replicated)."""
    dims: list[int | None] = []
    for placement in param.placements:
        dim = getattr(placement, "dim", None)  # Shard and _StridedShard (FSDP2 + TP) both have one
        if placement.is_replicate():
            dims.append(None)
        elif isinstance(dim, int) and not placement.is_partial():
            dims.append(dim % max(param.dim(), 1))
        else:
            raise ValueError(
                f"FusedGroupProxAdam: a parameter with placement {placement!r} is not supported; "
                "parameters must be Shard(dim) or Replicate() on each mesh dimension"
            )
    return dims


def group_reduce(param: Tensor, grouping: str) -> GroupReduce | None:
    """The hook that sums per-group partial sums across the ranks ``param``'s groups span.

    ``None`` when every group of ``param`` (a DTensor) lies wholly on each rank: no dimension
    other than the group dimension is sharded.
    """
    if not is_grouped(param):
        return None
    gdim = group_dim(grouping)
    mesh = param.device_mesh
    process_groups = [
        mesh.get_group(mesh_dim)
        for mesh_dim, dim in enumerate(sharded_dims(param))
        if dim not in (None, gdim)
    ]
    if not process_groups:
        return None

    def reduce(partial_sums: Tensor) -> Tensor:
        total = partial_sums.contiguous()
        for pg in process_groups:
            torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM, group=pg)
        return total

    return reduce


def align_state(param: Tensor, value: Tensor) -> Tensor:
    """``value`` (an ``exp_avg``-like state tensor) laid out as DTensor ``param`` is.

    State made by the optimizer already is. State loaded with plain ``load_state_dict`` may
    not be: a full (unsharded) tensor, identical on every rank, is sharded; a DTensor with
    other placements is redistributed. Both are collectives, taken by every rank alike.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(value, DTensor):
        if value.device_mesh == param.device_mesh and value.placements == param.placements:
            return value
        return value.redistribute(param.device_mesh, param.placements)
    if value.shape != param.shape:
        raise ValueError(
            f"optimizer state of shape {tuple(value.shape)} does not match the DTensor "
            f"parameter's global shape {tuple(param.shape)}"
        )
    local = param.to_local()
    return distribute_tensor(
        value.to(device=local.device, dtype=local.dtype), param.device_mesh, param.placements
    )


@torch.no_grad()
def sharded_step(tensors: StepTensors, hyper: AdamHyper, lr: float, *, backend: str) -> None:
    """One proximal Adam step, in place, for DTensor params, grads and moments, with the
    semantics of :mod:`lomt_kernels.contract` (the step counts go up by one unless ``found_inf``
    is nonzero, which is read on the host).

    ``backend`` (the name in the param group) steps the local shards of tensors that need no
    communication. Grads with other placements than their param (``Partial()`` from a
    hand-written loop) are redistributed to the param's first.
    """
    if tensors.skipped():
        return
    group_prox = hyper.prox.grouped and hyper.lambda_ != 0
    local: dict[torch.device, list[tuple[Tensor, ...]]] = {}
    counted = []  # the steps not handed to a backend, which counts its own
    for p, g, m, v, step_t in zip(*tensors.lists()):
        sharded_dims(p)  # validates the placements, whatever the prox
        if p.device_mesh.get_coordinate() is None or p.numel() == 0:
            counted.append(step_t)
            continue  # this rank holds no part of p, or p is empty on every rank
        if not is_dtensor(g):
            raise TypeError(f"the gradient of a DTensor parameter must be a DTensor, got {type(g).__name__}")
        if g.placements != p.placements:
            g = g.redistribute(p.device_mesh, p.placements)
        shards = (p.to_local(), g.to_local(), m.to_local(), v.to_local(), step_t)
        reduce = group_reduce(p, hyper.grouping) if group_prox else None
        if reduce is None:
            if shards[0].numel() != 0:
                local.setdefault(shards[0].device, []).append(shards)
            else:
                counted.append(step_t)
            continue
        step_t += 1
        scale = None if tensors.grad_scale is None else tensors.grad_scale.to(shards[0].device)
        gdim = group_dim(hyper.grouping)
        group_prox_adam_tensor(
            *shards, hyper, lr, grad_scale=scale, group_size=p.numel() // p.shape[gdim], reduce=reduce
        )
    if counted:
        torch._foreach_add_(counted, 1)
    for device, rows in local.items():
        _, step_backend = backends.resolve(backend, device)
        scale = None if tensors.grad_scale is None else tensors.grad_scale.to(device)
        step_backend.step(StepTensors(*(list(column) for column in zip(*rows)), grad_scale=scale), hyper, lr)
