"""What the Python-driven fused backends (Triton, CUDA) do before and after their kernels: pick
each tensor's prox and memory layout, make dense copies where the strides have no layout, and
copy results back. (The C++ CPU op does the same itself, see ``csrc/group_prox_adam_cpu.cpp``.)"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..contract import Prox
from ..grouping import GroupLayout, group_layout, is_grouped

#: The dtypes the float32-arithmetic kernels take.
HALF_AND_FLOAT = (torch.float32, torch.float16, torch.bfloat16)


def is_dense(t: Tensor) -> bool:
    """Whether ``t``'s storage is exactly its ``numel`` elements (any dimension order)."""
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


class WorkTensors(NamedTuple):
    """What a kernel works on for one param: ``p, g, m, v`` in one dense layout, the layout,
    and the prox this tensor takes."""

    p: Tensor
    g: Tensor
    m: Tensor
    v: Tensor
    layout: GroupLayout
    prox: str


def check_dtypes(p: Tensor, m: Tensor, v: Tensor) -> None:
    """Raise ``TypeError`` unless the float32-arithmetic kernels take ``p`` and its state."""
    if p.dtype not in HALF_AND_FLOAT or m.dtype != p.dtype or v.dtype != p.dtype:
        raise TypeError(
            f"the fused kernels take {', '.join(map(str, HALF_AND_FLOAT))} params with exp_avg and "
            f"exp_avg_sq of the param's dtype; got {p.dtype}, {m.dtype} and {v.dtype}"
        )


def tensor_prox(p: Tensor, prox: str, lambda_zero: bool) -> str:
    """The prox ``p`` takes: ``prox``, or ``"none"`` when ``lambda_`` is 0 or ``p`` has fewer
    than two dims."""
    return prox if prox != "none" and not lambda_zero and is_grouped(p) else "none"


#: What :func:`work_tensors` does with a grad whose dtype is not its param's.
GRAD_DTYPE_POLICIES = ("keep", "cast")


def work_tensors(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], *,
    prox: str, lambda_: float, grouping: str, grad_dtype: str = "keep",
) -> dict[int, WorkTensors]:
    """:class:`WorkTensors` for every non-empty float32, float16 and bfloat16 param, by index.

    A tensor's prox is ``"none"`` when ``lambda_ == 0`` or it has fewer than two dims. Group
    proxes need a :func:`~lomt_kernels.grouping.group_layout` (``[A, B, K]``); ``none`` and
    ``l1`` are elementwise and need dense storage (``[1, 1, numel]``). A tensor without one is
    replaced by a contiguous copy; ``g``, ``m`` and ``v`` are copied unless they share ``p``'s
    strides, which they normally do (``m`` and ``v`` are created with ``preserve_format``,
    autograd matches grads to their param). :func:`write_back` copies results back. A grad of
    another dtype than its param is kept or cast to the param's dtype, as ``grad_dtype`` says.
    float64 params are left out: the callers step them on the reference (these kernels compute
    in float32).

    This runs on every step for every param, so it reads each tensor's strides once and does
    nothing more for the usual case, a dense param whose grad and state share its strides.
    """
    if grad_dtype not in GRAD_DTYPE_POLICIES:
        raise ValueError(f"unknown grad_dtype={grad_dtype!r}: expected one of {GRAD_DTYPE_POLICIES}")
    group_prox = Prox(prox).grouped
    works = {}
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        dtype = p.dtype
        if p.numel() == 0 or dtype == torch.float64:
            continue
        check_dtypes(p, m, v)
        g_dtype = dtype if grad_dtype == "cast" else g.dtype
        own_prox = tensor_prox(p, prox, lambda_ == 0)
        grouped = group_prox and own_prox != "none"
        layout = group_layout(p, grouping) if grouped else GroupLayout(1, 1, p.numel()) if is_dense(p) else None
        if layout is None:
            p = p.contiguous()
            layout = group_layout(p, grouping) if grouped else GroupLayout(1, 1, p.numel())
        stride = p.stride()
        if g.stride() != stride or g.dtype != g_dtype:
            g = torch.empty_like(p, dtype=g_dtype).copy_(g)
        if m.stride() != stride:
            m = torch.empty_like(p).copy_(m)
        if v.stride() != stride:
            v = torch.empty_like(p).copy_(v)
        works[i] = WorkTensors(p, g, m, v, layout, own_prox)
    return works


def write_back(params: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
               works: dict[int, WorkTensors]) -> None:
    """Copy the results of the tensors :func:`work_tensors` had to copy back into place."""
    for i, work in works.items():
        for target, result in ((params[i], work.p), (exp_avgs[i], work.m), (exp_avg_sqs[i], work.v)):
            if result is not target:
                target.copy_(result)
