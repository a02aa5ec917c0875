r"""The work plan of one fused step: which program does what, in which order.

Every tensor of a launch is cut into **slabs**, and every slab into **items** of at most
``block_r x block_c`` elements (one program each, ``block_c`` elements being 256 bytes):

* A tensor that takes an elementwise step (plain Adam, ``l1``, fewer than two dims) is one slab:
  its storage read as rows of ``block_c`` elements.
* A tensor that takes a group prox, with the ``[A, B, K]`` layout of
  :class:`~lomt_kernels.grouping.GroupLayout`, is cut into slabs of *whole groups*: when a group's
  row run ``K`` fits in ``block_c``, a slab is ``block_c // K`` neighbouring groups over all ``A``
  rows, so each row of the slab is one contiguous run of up to 256 bytes; a group wider than
  ``block_c`` is a slab of its own, tiled in columns too (read as rows of ``block_c`` when
  ``A == 1``, where a group is contiguous).

A grouped slab that fits in one item is finished by that item: Adam, the group's sums and the prox
in registers (``FUSED``). A larger one takes two kinds of items. ``PARTIAL`` items do Adam, store
``z`` into ``p`` and their per-group partial sums into a slot of their own; the last of a slab's
``PARTIAL`` items to finish adds the slots in a fixed order (deterministic, no float atomics) and
stores each group's statistic (for ``group_weighted`` after the Newton solve, streaming the slab's
``z`` and ``v`` from L2). ``FINISH`` items, one per ``PARTIAL`` item, wait for that statistic,
re-read ``z`` and write ``p``.

Programs take items in **ticket order** (an atomic counter), so an item only ever waits for items
with lower tickets, which are already running: no deadlock. The finishers of a slab come
:func:`finisher_lag` items after its last ``PARTIAL`` item, about one wave of resident programs,
so that ``z`` is still in L2 when they re-read it and the final ``p`` lands in the line ``z``
dirtied: DRAM then sees one read of ``p, g, m, v`` and one write of ``p, m, v`` per element.
:mod:`benchmarks.traffic_model` predicts the bytes from this plan.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple

from ...grouping import GroupLayout
from ..device_table import VECTOR_BYTES

#: Bytes of a tile's row (one slab row): two 128-byte lines.
ROW_BYTES = 256
#: Elements of an item (a tile of ``block_r x block_c``).
ITEM_ELEMENTS = 1024
#: Estimated programs resident per SM; with the SM count it sets the finisher lag (one wave).
PROGRAMS_PER_SM = 2


class ItemKind(enum.IntEnum):
    """What one program does (the ``KIND`` column of the item table)."""

    ELEMENTWISE = 0  #: Adam, then ``l1`` or nothing
    FUSED = 1  #: Adam and a group prox, the whole slab in one tile
    PARTIAL = 2  #: Adam, ``z`` into ``p``, per-group partial sums (the slab's last one reduces them)
    FINISH = 3  #: wait for the slab's statistics, then ``p = prox(z)``


class TileShape(NamedTuple):
    """A launch's tile: ``block_r`` rows of ``block_c`` elements."""

    block_r: int
    block_c: int
    vec: int  # elements per vectorised access

    @classmethod
    def for_itemsize(cls, itemsize: int) -> "TileShape":
        block_c = ROW_BYTES // itemsize
        return cls(ITEM_ELEMENTS // block_c, block_c, VECTOR_BYTES // itemsize)


class Slab(NamedTuple):
    """A slab: rows ``r < rows`` of ``width`` elements at ``base + r * stride`` in its tensor,
    elements whose offset from ``base`` is at least ``limit`` left out. Column ``c`` belongs to
    the slab's group ``c // group_width``."""

    tensor: int
    base: int
    rows: int
    stride: int
    width: int
    limit: int
    group_width: int
    groups: int  # 0 for an elementwise slab
    prox: int  # the kernel's prox code
    col_tiles: int

    def items(self, tile: TileShape) -> int:
        return -(-self.rows // tile.block_r) * self.col_tiles

    def aligned(self, vec: int) -> bool:
        """Whether every row run starts and ends on a ``vec``-element boundary."""
        return all(x % vec == 0 for x in (self.base, self.stride, self.width, self.limit))


def tensor_slabs(tensor: int, layout: GroupLayout, prox: int, grouped: bool, tile: TileShape) -> list[Slab]:
    """The slabs of one tensor (``grouped``: it takes a group prox)."""
    A, B, K = layout
    numel = A * B * K
    c = tile.block_c
    if not grouped:
        rows = -(-numel // c)
        return [Slab(tensor, 0, rows, c, c, numel, c, 0, prox, 1)]
    if K <= c:
        per_slab = max(1, min(B, c // K))
        return [
            Slab(tensor, b * K, A, B * K, min(per_slab, B - b) * K, numel, K, min(per_slab, B - b), prox, 1)
            for b in range(0, B, per_slab)
        ]
    if A == 1:  # a group is contiguous: read it as rows of block_c
        return [Slab(tensor, b * K, -(-K // c), c, c, K, K, 1, prox, 1) for b in range(B)]
    return [Slab(tensor, b * K, A, B * K, K, numel, K, 1, prox, -(-K // c)) for b in range(B)]


class Item(NamedTuple):
    kind: ItemKind
    slab: int
    row0: int
    col0: int
    slot: int  # the item's index among its slab's PARTIAL items


@dataclass(frozen=True)
class Plan:
    """The slabs and items of one launch, items in ticket order."""

    tile: TileShape
    slabs: tuple[Slab, ...]
    items: tuple[Item, ...]
    #: Per slab: offset of its partial-sum slots (``sums`` per group per PARTIAL item) and of its
    #: per-group statistics.
    partial_offsets: tuple[int, ...]
    stat_offsets: tuple[int, ...]
    partials: int
    stats: int
    #: Items of each tensor (its step count is written by the last of them).
    tensor_items: tuple[int, ...]

    def partial_items(self, slab: int) -> int:
        s = self.slabs[slab]
        return s.items(self.tile) if s.groups and s.items(self.tile) > 1 else 0


def finisher_lag(sm_count: int) -> int:
    """Items from a slab's last ``PARTIAL`` item to its finishers: about one wave of resident
    programs, so those ``PARTIAL`` items are done when the finishers start, while ``z`` is still in L2."""
    return max(1, sm_count * PROGRAMS_PER_SM)


def build_plan(
    layouts: list[GroupLayout], proxes: list[int], grouped: list[bool], tile: TileShape, lag: int, sums: int,
) -> Plan:
    """The plan of one launch over tensors with these layouts and prox codes.

    ``sums`` is the number of per-group partial sums a ``PARTIAL`` item stores (1 for
    ``group``, 2 for ``group_weighted``; the larger is used for every slab). Grouped slabs come
    first, the largest first, so that the tail of the launch is small; elementwise items come
    last, where they keep the GPU busy while the last finishers wait.
    """
    slabs: list[Slab] = []
    for t, (layout, prox, is_grouped) in enumerate(zip(layouts, proxes, grouped)):
        slabs.extend(tensor_slabs(t, layout, prox, is_grouped, tile))
    order = sorted(range(len(slabs)), key=lambda s: (not slabs[s].groups, -slabs[s].items(tile), s))
    slabs = [slabs[s] for s in order]

    partial_offsets, stat_offsets = [], []
    partials = stats = 0
    stream: list[Item] = []  # everything but the finishers, in ticket order
    release: dict[int, list[Item]] = {}  # finishers, by the stream position they follow
    tensor_items = [0] * len(layouts)
    for s, slab in enumerate(slabs):
        n = slab.items(tile)
        multi = slab.groups > 0 and n > 1
        partial_offsets.append(partials)
        stat_offsets.append(stats)
        if multi:
            partials += sums * n * slab.groups
            stats += slab.groups
        kind = ItemKind.PARTIAL if multi else ItemKind.FUSED if slab.groups else ItemKind.ELEMENTWISE
        tiles = [((j // slab.col_tiles) * tile.block_r, (j % slab.col_tiles) * tile.block_c) for j in range(n)]
        stream.extend(Item(kind, s, r0, c0, j) for j, (r0, c0) in enumerate(tiles))
        tensor_items[slab.tensor] += 2 * n if multi else n
        if multi:
            release.setdefault(len(stream) - 1 + lag, []).extend(
                Item(ItemKind.FINISH, s, r0, c0, j) for j, (r0, c0) in enumerate(tiles)
            )
    items: list[Item] = []
    for position, item in enumerate(stream):
        items.append(item)
        items.extend(release.pop(position, ()))
    for position in sorted(release):
        items.extend(release[position])
    return Plan(
        tile, tuple(slabs), tuple(items), tuple(partial_offsets), tuple(stat_offsets), partials, stats,
        tuple(tensor_items),
    )


def element_offsets(slab: Slab, item: Item, tile: TileShape) -> list[int]:
    """The tensor offsets an item covers (for tests and the traffic model; the kernel computes
    the same in ``_tile``)."""
    out = []
    for r in range(item.row0, min(item.row0 + tile.block_r, slab.rows)):
        for c in range(item.col0, min(item.col0 + tile.block_c, slab.width)):
            local = r * slab.stride + c
            if local < slab.limit:
                out.append(slab.base + local)
    return out


def item_elements(slab: Slab, item: Item, tile: TileShape) -> int:
    """How many elements an item covers, without listing them."""
    if slab.limit >= slab.rows * slab.stride:
        rows = min(tile.block_r, slab.rows - item.row0)
        return rows * min(tile.block_c, slab.width - item.col0)
    return len(element_offsets(slab, item, tile))


def geometry_is_vectorisable(slab: Slab, tile: TileShape) -> bool:
    """Whether a slab's geometry allows vectorised accesses (the data pointers must agree too)."""
    return tile.block_c % tile.vec == 0 and slab.aligned(tile.vec)

