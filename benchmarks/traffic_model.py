"""``python -m benchmarks.traffic_model``: the DRAM bytes per param that the Triton backend's plan
should move, and the step time that gives at the device's copy bandwidth: a prediction to hold
against a GPU's measurement (``ncu``'s ``dram__bytes_read.sum`` and ``dram__bytes_write.sum``).

The plan is the one the backend builds for the set (:func:`~lomt_kernels.kernels.
triton_group_adam.launch.plan_launch`, one launch per param group). Bytes are counted per item in
ticket order:

* every Adam item (``ELEMENTWISE``, ``FUSED``, ``PARTIAL``) reads ``p, g, m, v`` and writes
  ``m, v`` from and to DRAM; ``ELEMENTWISE`` and ``FUSED`` items also write ``p``;
* a ``PARTIAL`` tile's ``z`` (in ``p`` for float32 params) stays in L2 until its ``FINISH``
  item reads it if fewer than the L2's usable bytes were touched in between (LRU); then the final
  ``p`` lands in the same dirty lines and DRAM sees one write of ``p``. Otherwise ``z`` is
  written back and read again (and ``v`` read again for ``group_weighted``);
* the weighted prox's reduction streams the slab's ``z`` and ``v`` once per Newton pass
  (``--newton-passes``), from L2 under the same rule.

Fused Adam moves 28 bytes per float32 param, the floor for any Adam step.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from lomt_kernels.kernels.triton_group_adam import launch, plan

#: The H200 the earlier runs used: its SMs, L2 and measured copy bandwidth (RESULTS-h200.md).
H200 = dict(sms=132, l2_mb=50.0, copy_gbs=4186.0)


@dataclass
class Prediction:
    set: str
    prox: str
    params: int
    dram_bytes: float
    items: int
    slabs: int
    miss_fraction: float  # of the PARTIAL tiles whose z left L2 before its finisher came
    max_window_mb: float

    @property
    def bytes_per_param(self) -> float:
        return self.dram_bytes / self.params


def set_tensors(name: str) -> list[list[tuple[tuple[int, ...], bool]]]:
    """The set's param groups: ``(shape, takes the prox)`` per tensor, on the meta device."""
    from benchmarks.host_overhead import model_shapes

    shapes = model_shapes(name)
    return [[s for s in shapes if s[1]], [s for s in shapes if not s[1]]]


def predict(name: str, prox: str, sms: int, l2_bytes: float, newton_passes: int, itemsize: int = 4) -> Prediction:
    tile = plan.TileShape.for_itemsize(itemsize)
    dram = 0.0
    items = slabs = params = 0
    partial_tiles = missed = 0
    max_window = 0.0
    for group in set_tensors(name):
        if not group:
            continue
        hyper = launch.PlanKey(prox if group[0][1] else "none", "in_channel", False, 0.9, 0.999)
        tensors = [launch.layout_and_prox(torch.empty(shape, device="meta"), hyper) for shape, _ in group]
        work = launch.plan_launch(tensors, tile, hyper, sms)
        items += len(work.items)
        slabs += len(work.slabs)
        params += sum(layout.outer * layout.groups * layout.inner for layout, _ in tensors)
        sizes = [plan.item_elements(work.slabs[i.slab], i, tile) for i in work.items]
        # Bytes each item touches (DRAM or L2), for the reuse windows.
        touched = [n * (4 * itemsize if i.kind == plan.ItemKind.FINISH else 7 * itemsize) for n, i in zip(sizes, work.items)]
        prefix = [0]
        for t in touched:
            prefix.append(prefix[-1] + t)
        partial_at = {}
        for ticket, (item, n) in enumerate(zip(work.items, sizes)):
            if item.kind == plan.ItemKind.FINISH:
                start = partial_at[(item.slab, item.slot)]
                window = prefix[ticket] - prefix[start + 1]
                max_window = max(max_window, window)
                partial_tiles += 1
                hit = window <= l2_bytes
                missed += not hit
                dram += n * itemsize  # the final p
                if not hit:
                    dram += n * itemsize * (2 + (prox == "group_weighted"))  # z back and forth, v again
            else:
                dram += n * itemsize * (6 if item.kind == plan.ItemKind.PARTIAL else 7)
                if item.kind == plan.ItemKind.PARTIAL:
                    partial_at[(item.slab, item.slot)] = ticket
        if prox == "group_weighted":
            for s, slab in enumerate(work.slabs):
                n_partial = work.partial_items(s)
                if not n_partial:
                    continue
                slab_bytes = sum(plan.item_elements(slab, plan.Item(plan.ItemKind.PARTIAL, s, r, c, 0), tile)
                                 for r, c in _tiles(slab, tile)) * 2 * itemsize
                if slab_bytes * newton_passes > l2_bytes:  # the slab itself outgrows L2
                    dram += slab_bytes * newton_passes
    return Prediction(name, prox, params, dram, items, slabs, missed / max(1, partial_tiles), max_window / 1e6)


def _tiles(slab: plan.Slab, tile: plan.TileShape):
    for j in range(slab.items(tile)):
        yield (j // slab.col_tiles) * tile.block_r, (j % slab.col_tiles) * tile.block_c


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.traffic_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default="resnet50-convs,nyu-3task")
    parser.add_argument("--sms", type=int, default=H200["sms"])
    parser.add_argument("--l2-mb", type=float, default=H200["l2_mb"], help="the L2's size")
    parser.add_argument("--l2-usable", type=float, default=0.5,
                        help="the fraction of L2 that keeps a line for reuse (Hopper splits it in two partitions)")
    parser.add_argument("--copy-gbs", type=float, default=H200["copy_gbs"], help="device-to-device copy bandwidth")
    parser.add_argument("--newton-passes", type=int, default=2, help="streamed Newton passes per weighted slab")
    args = parser.parse_args(argv)
    l2_bytes = args.l2_mb * 1e6 * args.l2_usable
    print(f"device model: {args.sms} SMs, {args.l2_mb:g} MB L2 ({args.l2_usable:.0%} usable for reuse), "
          f"copy {args.copy_gbs:g} GB/s; finisher lag {plan.finisher_lag(args.sms)} items")
    print(f"{'set':<16} {'prox':<15} {'params':>10} {'items':>7} {'slabs':>6} {'window MB':>9} {'z misses':>8} "
          f"{'B/param':>8} {'pred. ms':>9} {'Adam ms':>8} {'ratio':>6}")
    worst = 0.0
    for name in args.sets.split(","):
        for prox in ("group", "group_weighted", "l1"):
            p = predict(name, prox, args.sms, l2_bytes, args.newton_passes)
            ms = p.dram_bytes / (args.copy_gbs * 1e9) * 1e3
            adam_ms = 28 * p.params / (args.copy_gbs * 1e9) * 1e3
            if prox != "l1":
                worst = max(worst, p.bytes_per_param)
            print(f"{p.set:<16} {p.prox:<15} {p.params:>10,} {p.items:>7} {p.slabs:>6} {p.max_window_mb:>9.1f} "
                  f"{p.miss_fraction:>8.1%} {p.bytes_per_param:>8.2f} {ms:>9.3f} {adam_ms:>8.3f} {ms / adam_ms:>6.2f}")
    print(f"worst predicted DRAM bytes per param, group and group_weighted: {worst:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
