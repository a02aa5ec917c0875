"""The ``"triton"`` backend's launch: its plan, its tables beyond the shared ones, and the kernel call.

The host path itself (launches cached per set of tensors, the grads' column refreshed
asynchronously, step counts, ``lr``, ``grad_scale`` and ``found_inf`` read on the device, the
copies and float64 paths) is :mod:`lomt_kernels.kernels.device_table`, shared with the ``"cuda"``
backend; :data:`BACKEND` plugs this module's :class:`Launch` into it.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from ... import reference
from ...contract import Prox
from ...grouping import GroupLayout
from ..device_table import _CACHE, COUNTS, Backend, Entry, PlanKey, TensorTable, float_bits, layout_and_prox, log_beta
from . import kernel as k
from .plan import Plan, TileShape, build_plan, finisher_lag, geometry_is_vectorisable

__all__ = ["BACKEND", "COUNTS", "PlanKey", "INTERPRETED", "Launch", "layout_and_prox", "plan_launch", "_CACHE"]

#: Warps per program: a 1,024-element tile is 4 elements a thread, which keeps every variant in
#: registers (no spills) at two programs per SM.
NUM_WARPS = 8


class Launch:
    """One launch over fixed tensors: the plan, its tables, scratch and counters.

    ``index`` says which of a step's tensors it covers; ``entries`` are their
    ``(p, m, v, step, layout, prox)``. The grads are set with ``table.set_grads`` before each run.
    """

    def __init__(self, index: list[int], entries: list[Entry], g_dtype: torch.dtype, hyper: PlanKey) -> None:
        p_dtype, device = entries[0][0].dtype, entries[0][0].device
        self.index = index
        self.tile = TileShape.for_itemsize(p_dtype.itemsize)
        sm_count = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        self.plan = plan_launch([(layout, prox) for *_, layout, prox in entries], self.tile, hyper, sm_count)
        log_betas = [float_bits(log_beta(beta)) for beta in (hyper.beta1, hyper.beta2)]
        # The columns after the shared ones (kernel.T_ITEMS on).
        extra = [[items, *log_betas, layout.group_size, 0, 0]
                 for (*_, layout, _), items in zip(entries, self.plan.tensor_items)]
        # 16-bit params keep z (and d) in float32 scratch between a slab's items (kernel._waiting_z).
        self.z_in_p = p_dtype == torch.float32
        waiting = 0
        if not self.z_in_p:
            multi = {slab.tensor for s, slab in enumerate(self.plan.slabs) if self.plan.partial_items(s)}
            z_column = k.T_Z.value - k.T_ITEMS.value
            for t in sorted(multi):
                size = -(-entries[t][0].numel() // self.tile.vec) * self.tile.vec
                extra[t][z_column], extra[t][z_column + 1] = waiting, waiting + size
                waiting += size * (2 if hyper.prox == "group_weighted" else 1)
        self.table = TensorTable(entries, g_dtype, extra, "triton")
        self.z_anchor = torch.empty(max(16, waiting), dtype=torch.float32, device=device)
        self.slabs = torch.tensor([
            [*slab[:9], int(geometry_is_vectorisable(slab, self.tile)), self.plan.partial_offsets[s],
             self.plan.stat_offsets[s], self.plan.partial_items(s), slab.col_tiles]
            for s, slab in enumerate(self.plan.slabs)
        ], dtype=torch.int64).to(device)
        self.items = torch.tensor([list(map(int, item)) for item in self.plan.items], dtype=torch.int32).to(device)
        self.counters = torch.zeros(1 + 2 * len(self.plan.slabs) + len(entries), dtype=torch.int64, device=device)
        self.partials = torch.empty(max(1, self.plan.partials), dtype=torch.float32, device=device)
        self.stats = torch.empty(max(1, self.plan.stats), dtype=torch.float32, device=device)

    def run(self, *, lr: float | Tensor, beta1: float, beta2: float, eps: float, weight_decay: float,
            lambda_: float, maximize: bool, decoupled_weight_decay: bool, grad_scale: Tensor | None,
            found_inf: Tensor | None) -> None:
        """Launch the kernel once over the plan."""
        lr_ptr = lr if isinstance(lr, Tensor) else None
        COUNTS["launches"] += 1
        k.step_kernel[(len(self.plan.items),)](
            self.items, self.slabs, self.table.table, self.counters, self.partials, self.stats,
            self.table.p_anchor, self.table.g_anchor, self.z_anchor, self.table.step_anchor, lr_ptr, grad_scale,
            found_inf,
            len(self.plan.items), len(self.plan.slabs), 0.0 if lr_ptr is not None else float(lr),
            1.0 - beta1, float(beta2), 1.0 - beta2, float(eps), float(weight_decay), float(lambda_),
            reference.WEIGHTED_PROX_RTOL[torch.float32],
            HAS_LR_PTR=lr_ptr is not None, HAS_GRAD_SCALE=grad_scale is not None,
            HAS_FOUND_INF=found_inf is not None, MAXIMIZE=maximize, DECOUPLED=decoupled_weight_decay,
            MAX_ITER=reference.WEIGHTED_PROX_MAX_ITER,
            BLOCK_R=self.tile.block_r, BLOCK_C=self.tile.block_c, VEC=self.tile.vec, Z_IN_P=self.z_in_p, SPIN=not INTERPRETED,
            num_warps=NUM_WARPS,
        )


def plan_launch(tensors: list[tuple[GroupLayout, str]], tile: TileShape, hyper: PlanKey, sm_count: int) -> Plan:
    """The plan of one launch over tensors with these layouts and proxes, on a GPU of ``sm_count`` SMs."""
    return build_plan(
        [layout for layout, _ in tensors], [k.PROX_CODE[prox] for _, prox in tensors],
        [Prox(prox).grouped for _, prox in tensors], tile, finisher_lag(sm_count),
        sums=2 if hyper.prox == "group_weighted" else 1,
    )


#: Whether the kernels run in Triton's interpreter (decided when this module was imported).
INTERPRETED = not isinstance(k.step_kernel, triton.runtime.JITFunction)

#: The triton backend of the shared host path.
BACKEND = Backend("triton", Launch, grads_of_param_dtype=False)
