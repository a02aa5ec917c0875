"""The host path shared by the GPU backends (``"triton"`` and ``"cuda"``): cached launches over
device tables, and a step with no host sync.

A step's cost on the host is what makes or breaks a fused optimizer on a GPU, so :func:`step`
does per step only what it must:

* it recognises the tensors of a known step by their data pointers (one ``data_ptr()`` per
  tensor, compared as a list) and reuses that step's launches: their device tables, scratch and
  counters are built once;
* gradients may move between steps (``zero_grad(set_to_none=True)`` frees them): their column of
  the :class:`TensorTable` is then rewritten and copied to the device asynchronously, from a
  pinned staging buffer that no copy in flight still reads; nothing else is rebuilt;
* the step counts, bias corrections, ``lr`` (a float or a device tensor), ``grad_scale`` and
  ``found_inf`` are read by the kernels, so a step never waits for the device and can be
  captured in a CUDA graph once its launches are built.

Tensors the kernels cannot address in place (storage with no group layout, or a grad whose strides
differ from its param's) take a slower path through contiguous copies, and float64 params the
reference. A backend supplies only its :class:`Launch` (the plan, the kernel tables beyond the
shared columns, and the kernel call) through a :class:`Backend` record.
"""

from __future__ import annotations

import math
import struct
from collections import Counter, OrderedDict
from typing import Callable, NamedTuple, Protocol

import torch
from torch import Tensor

from .. import reference
from ..contract import AdamHyper, Prox, StepTensors
from ..grouping import GroupLayout, group_layout
from .prepare import check_dtypes, is_dense, tensor_prox, work_tensors, write_back

#: Launch plans kept per process (a model has one or a few param groups and dtypes).
CACHE_SIZE = 32
#: Bytes per element of a vectorised access (``ld.global.v4.b32``).
VECTOR_BYTES = 16
#: What the host path did, for tests and :mod:`benchmarks.host_overhead`: ``launches`` (kernel
#: launches), ``builds`` (launch plans built, each with its tables copied to the device) and
#: ``grad_refreshes`` (a grads' column rewritten, with one asynchronous copy on a GPU).
COUNTS: Counter[str] = Counter()

#: The shared columns of every tensor table: element offsets of ``p``, ``g``, ``m``, ``v`` and the
#: step count from their anchors, and whether ``p, g, m, v`` all start on a vector boundary. A
#: backend's own columns follow.
P, G, M, V, STEP, ALIGNED = range(6)
SHARED_FIELDS = 6

#: One tensor of a launch: ``(p, m, v, step, layout, prox)``.
Entry = tuple[Tensor, Tensor, Tensor, Tensor, GroupLayout, str]


class PlanKey(NamedTuple):
    """The hyperparameters a plan is built for; the rest are launch arguments."""

    prox: str
    grouping: str
    lambda_zero: bool
    beta1: float
    beta2: float


def float_bits(x: float) -> int:
    """The float64 bit pattern of ``x`` as a signed int64 (for the int64 tables)."""
    return struct.unpack("<q", struct.pack("<d", x))[0]


def log_beta(beta: float) -> float:
    """``log(beta)``, ``-inf`` for 0: the kernels take ``1 - beta^t`` as ``1 - exp(t log beta)``."""
    return math.log(beta) if beta > 0 else -math.inf


class TensorTable:
    """The int64 table of one launch's tensors, on the host (pinned) and on the device.

    Every data pointer is an element offset from an *anchor* of its dtype (16-byte aligned, so
    offsets that are multiples of the vector width give aligned vector accesses): ``p``, ``m`` and
    ``v`` from :attr:`p_anchor`, ``g`` from :attr:`g_anchor`, the step count from
    :attr:`step_anchor`. Row ``i`` is the shared columns then ``extra[i]``. The grads' column is
    set by :meth:`set_grads` before each run.
    """

    def __init__(self, entries: list[Entry], g_dtype: torch.dtype, extra: list[list[int]], backend: str) -> None:
        p_dtype, device = entries[0][0].dtype, entries[0][0].device
        self.backend = backend
        self.device = device
        self.strides = [p.stride() for p, *_ in entries]
        self.p_anchor = torch.empty(16, dtype=p_dtype, device=device)
        self.g_anchor = torch.empty(16, dtype=g_dtype, device=device)
        self.step_anchor = torch.empty(16, dtype=torch.float32, device=device)
        vec = max(1, VECTOR_BYTES // p_dtype.itemsize)
        self.g_vec = max(1, VECTOR_BYTES // g_dtype.itemsize)
        rows = []
        for (p, m, v, step, *_), own in zip(entries, extra):
            if step.dtype != torch.float32 or step.device != device or step.numel() != 1:
                raise ValueError(
                    f"the {backend} backend keeps each step count in a one-element float32 tensor on the "
                    f"params' device {device}; got {step.dtype} {tuple(step.shape)} on {step.device}"
                )
            offsets = [element_offset(t, self.p_anchor) for t in (p, m, v)]
            rows.append([offsets[0], 0, offsets[1], offsets[2], element_offset(step, self.step_anchor), 0, *own])
        self.data_aligned = torch.tensor([all(row[c] % vec == 0 for c in (P, M, V)) for row in rows])
        self.host = torch.tensor(rows, dtype=torch.int64)
        if device.type == "cuda":
            self.host = self.host.pin_memory()
        self.table = self.host.to(device)
        self.grad_ptrs: list[int] = []
        self._staging: list[tuple[Tensor, torch.cuda.Event]] = []

    def accepts(self, grads: list[Tensor], ptrs: list[int]) -> bool:
        """Whether ``grads`` (at ``ptrs``) can be read where they are: the known ones, or new ones
        of the expected dtype with their params' strides."""
        if ptrs == self.grad_ptrs:
            return True
        dtype = self.g_anchor.dtype
        return [g.stride() for g in grads] == self.strides and all([g.dtype == dtype for g in grads])

    def set_grads(self, grads: list[Tensor], ptrs: list[int]) -> None:
        """Point the table at ``grads`` (whose data pointers are ``ptrs``)."""
        if ptrs == self.grad_ptrs:
            return
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"the {self.backend} backend rewrites its table when the gradients move; run one step with "
                "the gradients the CUDA graph will read before capturing it"
            )
        delta = torch.tensor(ptrs, dtype=torch.int64) - self.g_anchor.data_ptr()
        itemsize = self.g_anchor.element_size()
        if bool((delta % itemsize).any()):
            raise ValueError(f"a gradient is not aligned to its {itemsize}-byte elements")
        offsets = delta // itemsize
        host = self._staging_buffer()
        host[:, G] = offsets
        host[:, ALIGNED] = (self.data_aligned & (offsets % self.g_vec == 0)).long()
        self.table.copy_(host, non_blocking=True)
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
            self._staging.append((host, event))
        self.grad_ptrs = ptrs
        COUNTS["grad_refreshes"] += 1

    def _staging_buffer(self) -> Tensor:
        """A host copy of the table that no asynchronous copy still reads."""
        if self.device.type != "cuda":
            return self.host
        for i, (buffer, event) in enumerate(self._staging):
            if event.query():
                del self._staging[i]
                return buffer
        return self.host.clone().pin_memory()


class Launch(Protocol):
    """What a backend builds per ``(param dtype, grad dtype)`` of a set of tensors: ``index`` says
    which of a step's tensors it covers, ``table`` holds them; :meth:`run` launches its kernels
    (at most three) over them."""

    index: list[int]
    table: TensorTable

    def run(self, *, lr: float | Tensor, beta1: float, beta2: float, eps: float, weight_decay: float,
            lambda_: float, maximize: bool, decoupled_weight_decay: bool, grad_scale: Tensor | None,
            found_inf: Tensor | None) -> None: ...


class Backend(NamedTuple):
    """A GPU backend of :func:`step`: its name (for messages and the cache), how it builds a
    :class:`Launch` from ``(index, entries, grad dtype, hyper)``, and whether its kernels read
    only grads of the param's dtype (others are then cast on the copies path)."""

    name: str
    launch: Callable[[list[int], list[Entry], torch.dtype, PlanKey], Launch]
    grads_of_param_dtype: bool


def element_offset(t: Tensor, anchor: Tensor) -> int:
    """``t``'s data pointer as an element offset from ``anchor``'s."""
    delta = t.data_ptr() - anchor.data_ptr()
    if delta % t.element_size():
        raise ValueError(f"a tensor at address {t.data_ptr():#x} is not aligned to its {t.element_size()}-byte elements")
    return delta // t.element_size()


def layout_and_prox(p: Tensor, hyper: PlanKey) -> tuple[GroupLayout | None, str]:
    """The layout the kernels read ``p`` in and the prox ``p`` takes
    (:func:`~lomt_kernels.kernels.prepare.tensor_prox`); ``layout`` is ``None`` for a grouped
    tensor without one."""
    prox = tensor_prox(p, hyper.prox, hyper.lambda_zero)
    if Prox(prox).grouped:
        return group_layout(p, hyper.grouping), prox
    return GroupLayout(1, 1, p.numel()), prox


_CACHE: OrderedDict[tuple, "_Launches"] = OrderedDict()


def _in_place(p: Tensor, g: Tensor, m: Tensor, v: Tensor) -> bool:
    """Whether the kernels can work on these tensors where they are."""
    return is_dense(p) and g.stride() == p.stride() and m.stride() == p.stride() and v.stride() == p.stride()


class _Launches(NamedTuple):
    in_place: list[Launch]
    copied: list[int]  # tensors that take dense copies (see _step_copies)
    wide: list[int]  # float64 tensors, stepped by the reference (see _step_float64)


def step(backend: Backend, tensors: StepTensors, hyper: AdamHyper, lr: float | Tensor) -> None:
    """One fused step over the float32 and 16-bit params of one device with ``backend``'s kernels,
    with the semantics of :mod:`lomt_kernels.contract` (the kernels add one to the step counts and
    read ``lr``, ``grad_scale`` and ``found_inf`` on the device): one :class:`Launch` per
    ``(param dtype, grad dtype)``, from a plan cached for these tensors."""
    params, grads, exp_avgs, exp_avg_sqs, state_steps = tensors.lists()
    if not params:
        return
    if isinstance(lr, Tensor) and lr.device != params[0].device:
        lr = float(lr)  # a CPU tensor: reading it does not wait for the device
    key_hyper = PlanKey(hyper.prox.value, hyper.grouping, hyper.lambda_ == 0, float(hyper.beta1), float(hyper.beta2))
    key = (backend.name, key_hyper, *(tuple(map(Tensor.data_ptr, ts)) for ts in (params, exp_avgs, exp_avg_sqs, state_steps)))
    launches = _CACHE.get(key)
    chosen = [] if launches is None else [[grads[i] for i in launch.index] for launch in launches.in_place]
    ptrs = [list(map(Tensor.data_ptr, gs)) for gs in chosen]
    if launches is None or not all(launch.table.accepts(gs, ps) for launch, gs, ps in zip(launches.in_place, chosen, ptrs)):
        launches = _build(backend, params, grads, exp_avgs, exp_avg_sqs, state_steps, key_hyper)
        chosen = [[grads[i] for i in launch.index] for launch in launches.in_place]
        ptrs = [list(map(Tensor.data_ptr, gs)) for gs in chosen]
        _CACHE[key] = launches
        if len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    run = dict(
        lr=lr, beta1=hyper.beta1, beta2=hyper.beta2, eps=hyper.eps, weight_decay=hyper.weight_decay,
        lambda_=hyper.lambda_, maximize=hyper.maximize, decoupled_weight_decay=hyper.decoupled_weight_decay,
        grad_scale=tensors.grad_scale, found_inf=tensors.found_inf,
    )
    for launch, gs, ps in zip(launches.in_place, chosen, ptrs):
        launch.table.set_grads(gs, ps)
        launch.run(**run)
    if launches.copied:
        _step_copies(backend, params, grads, exp_avgs, exp_avg_sqs, state_steps, launches.copied, key_hyper, run)
    if launches.wide:
        _step_float64([[ts[i] for i in launches.wide] for ts in (params, grads, exp_avgs, exp_avg_sqs, state_steps)],
                      hyper, run)
    # Empty params are in no launch; their counts still go up, on the device.
    if not all(map(Tensor.numel, params)):  # the usual case is checked at C speed
        empty = [s for p, s in zip(params, state_steps) if p.numel() == 0]
        found_inf = tensors.found_inf
        torch._foreach_add_(empty, 1 if found_inf is None else (found_inf == 0).to(empty[0].dtype))


def _groups_of(backend: Backend, params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
               exp_avg_sqs: list[Tensor], hyper: PlanKey) -> tuple[dict[tuple, list[int]], list[int], list[int]]:
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
        readable = g.dtype == p.dtype or not backend.grads_of_param_dtype
        if readable and _in_place(p, g, m, v) and layout_and_prox(p, hyper)[0] is not None:
            groups.setdefault((p.dtype, g.dtype), []).append(i)
        else:
            copied.append(i)
    return groups, copied, wide


def _build(backend: Backend, params, grads, exp_avgs, exp_avg_sqs, steps, hyper: PlanKey) -> _Launches:
    if params[0].device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"the {backend.name} backend builds its launch plan on the first step with a given set of "
            "tensors; run one step before capturing the CUDA graph (the usual warm-up)"
        )
    groups, copied, wide = _groups_of(backend, params, grads, exp_avgs, exp_avg_sqs, hyper)
    in_place = []
    for (_, g_dtype), index in groups.items():
        entries = [(params[i], exp_avgs[i], exp_avg_sqs[i], steps[i], *layout_and_prox(params[i], hyper)) for i in index]
        in_place.append(backend.launch(index, entries, g_dtype, hyper))
    COUNTS["builds"] += len(in_place)
    return _Launches(in_place, copied, wide)


def _step_copies(backend: Backend, params, grads, exp_avgs, exp_avg_sqs, steps, index: list[int], hyper: PlanKey,
                 run: dict) -> None:
    """The tensors the kernels cannot address in place, on dense copies with launches built for
    this step (rare: a transposed weight, a grad with strides or a dtype of its own)."""
    chosen = [[ts[i] for i in index] for ts in (params, grads, exp_avgs, exp_avg_sqs)]
    works = work_tensors(*chosen, prox=hyper.prox, lambda_=run["lambda_"], grouping=hyper.grouping,
                         grad_dtype="cast" if backend.grads_of_param_dtype else "keep")
    by_dtype: dict[torch.dtype, list[int]] = {}
    for j, work in works.items():
        by_dtype.setdefault(work.g.dtype, []).append(j)
    for g_dtype, js in by_dtype.items():
        entries = [(works[j].p, works[j].m, works[j].v, steps[index[j]], works[j].layout, works[j].prox) for j in js]
        launch = backend.launch(js, entries, g_dtype, hyper)
        COUNTS["builds"] += 1
        g = [works[j].g for j in js]
        launch.table.set_grads(g, list(map(Tensor.data_ptr, g)))
        launch.run(**run)
    write_back(chosen[0], chosen[2], chosen[3], works)


def _step_float64(tensors: list[list[Tensor]], hyper: AdamHyper, run: dict) -> None:
    """float64 params on :func:`lomt_kernels.reference.group_prox_adam` (the kernels compute in
    float32, which would lose their precision); this reads ``lr``, ``found_inf`` and the steps on
    the host."""
    found_inf = run["found_inf"]
    if found_inf is not None and bool(found_inf):
        return
    torch._foreach_add_(tensors[4], 1)
    lr = run["lr"]
    reference.group_prox_adam(*tensors, lr=float(lr), hyper=hyper, grad_scale=run["grad_scale"])
