"""The host path of the ``"triton"`` backend: cached launch plans, one launch per dtype pair.

A step's cost on the host is what makes or breaks a fused optimizer on a GPU, so this module does
per step only what it must:

* it recognises the tensors of a known step by their data pointers (one ``data_ptr()`` per
  tensor, compared as a list) and reuses that step's :class:`Launch`: its device tables, scratch
  and counters are built once;
* gradients may move between steps (``zero_grad(set_to_none=True)`` frees them): their column of
  the tensor table is then rewritten and copied to the device asynchronously, from a pinned
  staging buffer that no copy in flight still reads; nothing else is rebuilt;
* the step counts, bias corrections, ``lr`` (a float or a device tensor), ``grad_scale`` and
  ``found_inf`` are read by the kernel, so a step never waits for the device and can be captured
  in a CUDA graph once its launch is built.

Tensors the kernel cannot address in place (storage with no group layout, or a grad whose strides
differ from its param's) take a slower path through contiguous copies.
"""

from __future__ import annotations

import math
import struct
from collections import Counter, OrderedDict
from typing import NamedTuple

import torch
import triton
from torch import Tensor

from ... import reference
from ...grouping import GroupLayout, group_layout
from ..prepare import check_dtypes, is_dense, tensor_prox, work_tensors, write_back
from . import kernel as k
from .plan import VECTOR_BYTES, Plan, TileShape, build_plan, finisher_lag, geometry_is_vectorisable

#: Launch plans kept per process (a model has one or a few param groups and dtypes).
CACHE_SIZE = 32
#: Warps per program: a 1,024-element tile is 4 elements a thread, which keeps every variant in
#: registers (no spills) at two programs per SM.
NUM_WARPS = 8
#: What the host path did, for tests and :mod:`benchmarks.host_overhead`: ``launches``, ``builds``
#: (launch plans built, each with its tables copied to the device) and ``grad_refreshes`` (a
#: grads' column rewritten, with one asynchronous copy on a GPU).
COUNTS: Counter[str] = Counter()


class Hyper(NamedTuple):
    """The hyperparameters a plan is built for; the rest are launch arguments."""

    prox: str
    grouping: str
    lambda_zero: bool
    beta1: float
    beta2: float


def _bits(x: float) -> int:
    """The float64 bit pattern of ``x`` as a signed int64 (for the int64 tables)."""
    return struct.unpack("<q", struct.pack("<d", x))[0]


class Launch:
    """One launch over fixed tensors: the plan, its device tables, scratch and counters.

    ``index`` says which of a step's tensors it covers; ``entries`` are their
    ``(p, m, v, step, layout, prox)``. The grads are set with :meth:`set_grads` before each run.
    """

    def __init__(self, index: list[int], entries: list[tuple[Tensor, Tensor, Tensor, Tensor, GroupLayout, str]],
                 g_dtype: torch.dtype, hyper: Hyper) -> None:
        p_dtype, device = entries[0][0].dtype, entries[0][0].device
        self.index = index
        self.device = device
        self.strides = [p.stride() for p, *_ in entries]
        self.tile = TileShape.for_itemsize(p_dtype.itemsize)
        self.g_vec = max(1, VECTOR_BYTES // g_dtype.itemsize)
        sm_count = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        self.plan = plan_launch([(layout, prox) for *_, layout, prox in entries], self.tile, hyper, sm_count)
        # Anchors: every data pointer is an element offset from one of these (16-byte aligned).
        self.p_anchor = torch.empty(16, dtype=p_dtype, device=device)
        self.g_anchor = torch.empty(16, dtype=g_dtype, device=device)
        self.step_anchor = torch.empty(16, dtype=torch.float32, device=device)
        log_betas = [_bits(math.log(beta) if beta > 0 else -math.inf) for beta in (hyper.beta1, hyper.beta2)]
        rows = []
        for (p, m, v, step, layout, _), items in zip(entries, self.plan.tensor_items):
            if step.dtype != torch.float32 or step.device != device or step.numel() != 1:
                raise ValueError(
                    f"the triton backend keeps each step count in a one-element float32 tensor on the params' "
                    f"device {device}; got {step.dtype} {tuple(step.shape)} on {step.device}"
                )
            rows.append([
                _offset(p, self.p_anchor), 0, _offset(m, self.p_anchor), _offset(v, self.p_anchor),
                _offset(step, self.step_anchor), 0, items, *log_betas, layout.group_size, 0, 0,
            ])
        # 16-bit params keep z (and d) in float32 scratch between a slab's items (kernel._waiting_z).
        self.z_in_p = p_dtype == torch.float32
        waiting = 0
        if not self.z_in_p:
            multi = {slab.tensor for s, slab in enumerate(self.plan.slabs) if self.plan.partial_items(s)}
            for t in sorted(multi):
                size = -(-entries[t][0].numel() // self.tile.vec) * self.tile.vec
                rows[t][k.T_Z.value], rows[t][k.T_D.value] = waiting, waiting + size
                waiting += size * (2 if hyper.prox == "group_weighted" else 1)
        self.z_anchor = torch.empty(max(16, waiting), dtype=torch.float32, device=device)
        self.data_aligned = torch.tensor(
            [all(row[c] % self.tile.vec == 0 for c in (k.T_P.value, k.T_M.value, k.T_V.value)) for row in rows]
        )
        self.tensor_host = torch.tensor(rows, dtype=torch.int64)
        if device.type == "cuda":
            self.tensor_host = self.tensor_host.pin_memory()
        self.tensors = self.tensor_host.to(device)
        self.slabs = torch.tensor([
            [*slab[:9], int(geometry_is_vectorisable(slab, self.tile)), self.plan.partial_offsets[s],
             self.plan.stat_offsets[s], self.plan.partial_items(s), slab.col_tiles]
            for s, slab in enumerate(self.plan.slabs)
        ], dtype=torch.int64).to(device)
        self.items = torch.tensor([list(map(int, item)) for item in self.plan.items], dtype=torch.int32).to(device)
        self.counters = torch.zeros(1 + 2 * len(self.plan.slabs) + len(entries), dtype=torch.int64, device=device)
        self.partials = torch.empty(max(1, self.plan.partials), dtype=torch.float32, device=device)
        self.stats = torch.empty(max(1, self.plan.stats), dtype=torch.float32, device=device)
        self.grad_ptrs: list[int] = []
        self._staging: list[tuple[Tensor, torch.cuda.Event]] = []
        COUNTS["builds"] += 1

    def accepts(self, grads: list[Tensor], ptrs: list[int]) -> bool:
        """Whether ``grads`` (at ``ptrs``) can be read where they are: the known ones, or new ones
        of the expected dtype with their params' strides."""
        if ptrs == self.grad_ptrs:
            return True
        dtype = self.g_anchor.dtype
        return [g.stride() for g in grads] == self.strides and all([g.dtype == dtype for g in grads])

    def set_grads(self, grads: list[Tensor], ptrs: list[int]) -> None:
        """Point the tensor table at ``grads`` (whose data pointers are ``ptrs``)."""
        if ptrs == self.grad_ptrs:
            return
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "the triton backend rewrites its table when the gradients move; run one step with the "
                "gradients the CUDA graph will read before capturing it"
            )
        delta = torch.tensor(ptrs, dtype=torch.int64) - self.g_anchor.data_ptr()
        itemsize = self.g_anchor.element_size()
        if bool((delta % itemsize).any()):
            raise ValueError(f"a gradient is not aligned to its {itemsize}-byte elements")
        offsets = delta // itemsize
        host = self._staging_buffer()
        host[:, k.T_G.value] = offsets
        host[:, k.T_ALIGNED.value] = (self.data_aligned & (offsets % self.g_vec == 0)).long()
        self.tensors.copy_(host, non_blocking=True)
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
            self._staging.append((host, event))
        self.grad_ptrs = ptrs
        COUNTS["grad_refreshes"] += 1

    def _staging_buffer(self) -> Tensor:
        """A host copy of the tensor table that no asynchronous copy still reads."""
        if self.device.type != "cuda":
            return self.tensor_host
        for i, (buffer, event) in enumerate(self._staging):
            if event.query():
                del self._staging[i]
                return buffer
        return self.tensor_host.clone().pin_memory()

    def run(self, *, lr: float | Tensor, beta1: float, beta2: float, eps: float, weight_decay: float,
            lambda_: float, maximize: bool, decoupled_weight_decay: bool, grad_scale: Tensor | None,
            found_inf: Tensor | None, increment_step: bool) -> None:
        """Launch the kernel once over the plan."""
        lr_ptr = lr if isinstance(lr, Tensor) else None
        COUNTS["launches"] += 1
        k.step_kernel[(len(self.plan.items),)](
            self.items, self.slabs, self.tensors, self.counters, self.partials, self.stats,
            self.p_anchor, self.g_anchor, self.z_anchor, self.step_anchor, lr_ptr, grad_scale, found_inf,
            len(self.plan.items), len(self.plan.slabs), 0.0 if lr_ptr is not None else float(lr),
            1.0 - beta1, float(beta2), 1.0 - beta2, float(eps), float(weight_decay), float(lambda_),
            reference.WEIGHTED_PROX_RTOL[torch.float32],
            HAS_LR_PTR=lr_ptr is not None, HAS_GRAD_SCALE=grad_scale is not None,
            HAS_FOUND_INF=found_inf is not None, MAXIMIZE=maximize, DECOUPLED=decoupled_weight_decay,
            INCREMENT_STEP=increment_step, MAX_ITER=reference.WEIGHTED_PROX_MAX_ITER,
            BLOCK_R=self.tile.block_r, BLOCK_C=self.tile.block_c, VEC=self.tile.vec, Z_IN_P=self.z_in_p, SPIN=not INTERPRETED,
            num_warps=NUM_WARPS,
        )


def plan_launch(tensors: list[tuple[GroupLayout, str]], tile: TileShape, hyper: Hyper, sm_count: int) -> Plan:
    """The plan of one launch over tensors with these layouts and proxes, on a GPU of ``sm_count`` SMs."""
    return build_plan(
        [layout for layout, _ in tensors], [k.PROX_CODE[prox] for _, prox in tensors],
        [prox in ("group", "group_weighted") for _, prox in tensors], tile, finisher_lag(sm_count),
        sums=2 if hyper.prox == "group_weighted" else 1,
    )


def layout_and_prox(p: Tensor, hyper: Hyper) -> tuple[GroupLayout | None, str]:
    """The layout the kernel reads ``p`` in and the prox ``p`` takes
    (:func:`~lomt_kernels.kernels.prepare.tensor_prox`); ``layout`` is ``None`` for a grouped
    tensor without one."""
    prox = tensor_prox(p, hyper.prox, hyper.lambda_zero)
    if prox in ("group", "group_weighted"):
        return group_layout(p, hyper.grouping), prox
    return GroupLayout(1, 1, p.numel()), prox


def _offset(t: Tensor, anchor: Tensor) -> int:
    """``t``'s data pointer as an element offset from ``anchor``'s."""
    delta = t.data_ptr() - anchor.data_ptr()
    if delta % t.element_size():
        raise ValueError(f"a tensor at address {t.data_ptr():#x} is not aligned to its {t.element_size()}-byte elements")
    return delta // t.element_size()


#: Whether the kernels run in Triton's interpreter (decided when this module was imported).
INTERPRETED = not isinstance(k.step_kernel, triton.runtime.JITFunction)

_CACHE: OrderedDict[tuple, Launch] = OrderedDict()


def _in_place(p: Tensor, g: Tensor, m: Tensor, v: Tensor) -> bool:
    """Whether the kernel can work on these tensors where they are."""
    return is_dense(p) and g.stride() == p.stride() and m.stride() == p.stride() and v.stride() == p.stride()


class _Launches(NamedTuple):
    in_place: list[Launch]
    copied: list[int]  # tensors that take dense copies (see _step_copies)
    wide: list[int]  # float64 tensors, stepped by the reference (see _step_float64)


def step(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor], *, prox: str, grouping: str, lambda_: float, beta1: float, beta2: float,
    **scalars: object,
) -> None:
    """One fused step over float32 and 16-bit params of one device (see
    :func:`~lomt_kernels.kernels.triton_group_adam.group_prox_adam`): one launch per
    ``(param dtype, grad dtype)``, from a plan cached for these tensors."""
    hyper = Hyper(prox, grouping, lambda_ == 0, float(beta1), float(beta2))
    key = (hyper, *(tuple(map(Tensor.data_ptr, ts)) for ts in (params, exp_avgs, exp_avg_sqs, state_steps)))
    launches = _CACHE.get(key)
    chosen = [] if launches is None else [[grads[i] for i in launch.index] for launch in launches.in_place]
    ptrs = [list(map(Tensor.data_ptr, gs)) for gs in chosen]
    if launches is None or not all(map(Launch.accepts, launches.in_place, chosen, ptrs)):
        launches = _build(params, grads, exp_avgs, exp_avg_sqs, state_steps, hyper)
        chosen = [[grads[i] for i in launch.index] for launch in launches.in_place]
        ptrs = [list(map(Tensor.data_ptr, gs)) for gs in chosen]
        _CACHE[key] = launches
        if len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    run = dict(scalars, beta1=beta1, beta2=beta2, lambda_=lambda_)
    for launch, gs, ps in zip(launches.in_place, chosen, ptrs):
        launch.set_grads(gs, ps)
        launch.run(**run)
    if launches.copied:
        _step_copies(params, grads, exp_avgs, exp_avg_sqs, state_steps, launches.copied, hyper, run)
    if launches.wide:
        _step_float64([[ts[i] for i in launches.wide] for ts in (params, grads, exp_avgs, exp_avg_sqs, state_steps)],
                      hyper, run)


def _groups_of(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
               hyper: Hyper) -> tuple[dict[tuple, list[int]], list[int], list[int]]:
    """The indices of the tensors that launch in place, by ``(p dtype, g dtype)``; of those that
    take dense copies; and of the float64 ones."""
    groups: dict[tuple, list[int]] = {}
    copied, wide = [], []
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        if p.numel() == 0:
            continue
        if p.dtype == torch.float64:
            wide.append(i)
            continue
        check_dtypes(p, m, v)
        if _in_place(p, g, m, v) and layout_and_prox(p, hyper)[0] is not None:
            groups.setdefault((p.dtype, g.dtype), []).append(i)
        else:
            copied.append(i)
    return groups, copied, wide


def _build(params, grads, exp_avgs, exp_avg_sqs, steps, hyper: Hyper) -> _Launches:
    if params and params[0].device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "the triton backend builds its launch plan on the first step with a given set of tensors; "
            "run one step before capturing the CUDA graph (the usual warm-up)"
        )
    groups, copied, wide = _groups_of(params, grads, exp_avgs, exp_avg_sqs, hyper)
    in_place = []
    for (_, g_dtype), index in groups.items():
        entries = []
        for i in index:
            entries.append((params[i], exp_avgs[i], exp_avg_sqs[i], steps[i], *layout_and_prox(params[i], hyper)))
        in_place.append(Launch(index, entries, g_dtype, hyper))
    return _Launches(in_place, copied, wide)


def _step_copies(params, grads, exp_avgs, exp_avg_sqs, steps, index: list[int], hyper: Hyper, run: dict) -> None:
    """The tensors the kernel cannot address in place, on dense copies with a launch built for this
    step (rare: a transposed weight, a grad with strides of its own)."""
    chosen = [[ts[i] for i in index] for ts in (params, grads, exp_avgs, exp_avg_sqs)]
    works = work_tensors(*chosen, prox=hyper.prox, lambda_=run["lambda_"], grouping=hyper.grouping)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for j, work in works.items():
        by_dtype.setdefault(work.g.dtype, []).append(j)
    for g_dtype, js in by_dtype.items():
        entries = [(works[j].p, works[j].m, works[j].v, steps[index[j]], works[j].layout, works[j].prox) for j in js]
        launch = Launch(js, entries, g_dtype, hyper)
        g = [works[j].g for j in js]
        launch.set_grads(g, list(map(Tensor.data_ptr, g)))
        launch.run(**run)
    write_back(chosen[0], chosen[2], chosen[3], works)


def _step_float64(tensors: list[list[Tensor]], hyper: Hyper, run: dict) -> None:
    """float64 params on :func:`lomt_kernels.reference.group_prox_adam` (the kernel computes in
    float32, which would lose their precision); this reads ``lr``, ``found_inf`` and the steps on
    the host."""
    found_inf = run["found_inf"]
    if found_inf is not None and bool(found_inf):
        return
    if run["increment_step"]:
        torch._foreach_add_(tensors[4], 1)
    lr = run["lr"]
    reference.group_prox_adam(
        *tensors, lr=float(lr) if isinstance(lr, Tensor) else lr, beta1=hyper.beta1, beta2=hyper.beta2,
        eps=run["eps"], weight_decay=run["weight_decay"], decoupled_weight_decay=run["decoupled_weight_decay"],
        maximize=run["maximize"], lambda_=run["lambda_"], prox=hyper.prox, grouping=hyper.grouping,
        grad_scale=run["grad_scale"],
    )
