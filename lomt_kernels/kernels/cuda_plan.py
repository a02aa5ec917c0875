r"""The work plan of the ``"cuda"`` backend's step: each tensor's tile, and the blocks of each launch.

A pure function of the tensors' layouts and proxes (no GPU needed), so that tests check on the
CPU what the kernels in ``csrc/group_prox_adam_cuda.cu`` will do. Each tensor, read as
``[A, B, K]`` (:class:`~lomt_kernels.grouping.GroupLayout`), gets one :class:`TensorTile`: a
block owns ``ba`` rows of ``bg`` neighbouring groups, ``bk`` columns of each.

* ``"none"`` and ``"l1"`` tensors are one ``[1, 1, numel]`` row cut in :data:`CHUNK` tiles.
* A grouped tensor whose tile of whole groups fits in shared memory is **one-pass**: Adam, the
  group sums and the prox in one block.
* Otherwise (a group bigger than shared memory, or for ``"group"`` runs shorter than
  :data:`MIN_RUN` because few tall groups fit) it takes **two phases**: launch 1 writes ``z`` into
  ``p`` (and for ``"group"`` per-tile partial sums), launch 2 gives each group a block that
  finds its statistic, launch 3 writes ``p = prox(z)`` over the same tiles.

So a step is at most three launches (:attr:`CudaPlan.launches`) whatever the number of tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from ..grouping import GroupLayout

#: Threads per block (``kThreads`` in the .cu).
THREADS = 512
#: At most this many groups per one-pass tile (``kMaxGroupsPerTile``: their statistics sit in
#: shared memory in front of the staged tile).
MAX_GROUPS_PER_TILE = 64
#: Shared memory a block may use without opting in to more.
SHARED_MEMORY = 48 * 1024
#: Bytes of the staged tiles: the rest after the per-group statistics.
STAGING_BYTES = SHARED_MEMORY - MAX_GROUPS_PER_TILE * 4
#: One-pass tiles take groups until they hold this many elements.
TARGET_TILE = 4096
#: Elements of an elementwise tile and of a two-phase tile.
CHUNK = 4096
#: Groups per tile are raised until a row run holds this many elements (128 bytes of float32).
MIN_RUN = 32
#: Prox codes of the kernels.
PROX_CODE = {"none": 0, "group": 1, "group_weighted": 2, "l1": 3}


class TensorTile(NamedTuple):
    """A tensor's tile: ``ba`` rows, ``bg`` groups, ``bk`` columns per group, shared-memory row
    length ``pitch`` (the run rounded up to odd, so a warp reading down a column hits 32 banks);
    whether it is one pass; and the dynamic shared memory its launch-1 blocks need (bytes)."""

    ba: int
    bg: int
    bk: int
    pitch: int
    one_pass: bool
    smem_bytes: int

    def count(self, layout: GroupLayout) -> int:
        """Tiles over ``layout``."""
        A, B, K = layout
        return -(-B // self.bg) * -(-A // self.ba) * -(-K // self.bk)


def tensor_tile(layout: GroupLayout, prox: str) -> TensorTile:
    """The tile of a tensor with this layout and prox (``prox`` as the tensor takes it:
    :func:`~lomt_kernels.kernels.prepare.tensor_prox`)."""
    A, B, K = layout
    if prox in ("none", "l1"):
        return TensorTile(1, 1, CHUNK, CHUNK, True, 0)
    arrays = 2 if prox == "group_weighted" else 1  # z, and d for the weighted prox
    capacity = STAGING_BYTES // (4 * arrays)  # floats per staged array
    min_groups = min(B, MAX_GROUPS_PER_TILE, -(-MIN_RUN // K))
    if A * (K | 1) <= capacity:
        # Whole groups: enough for TARGET_TILE elements or MIN_RUN-long rows, as many as fit.
        fit = max(1, (capacity // A - 1) // K)
        want = max(min_groups, TARGET_TILE // (A * K))
        nb = max(1, min(want, fit, B, MAX_GROUPS_PER_TILE))
        # Tall groups leave room for few: "group" then takes two phases rather than short rows; the
        # weighted prox keeps them, since its two-phase solve reads each group alone, strided.
        if prox == "group_weighted" or nb >= min_groups:
            pitch = (nb * K) | 1
            return TensorTile(A, nb, K, pitch, True, 4 * MAX_GROUPS_PER_TILE + arrays * 4 * A * pitch)
    # Two phases: CHUNK-element tiles of rows (and of K, one group at a time, if K is long).
    bk = min(K, CHUNK)
    bg = 1 if bk < K else min_groups
    ba = max(1, CHUNK // (bg * bk))
    pitch = (bg * bk) | 1
    # "group" stages z to reduce each group's partial sum; the weighted prox only writes z.
    return TensorTile(ba, bg, bk, pitch, False, 4 * MAX_GROUPS_PER_TILE + 4 * ba * pitch if prox == "group" else 0)


@dataclass(frozen=True)
class CudaPlan:
    """The tiles of one launch group's tensors and the blocks of its (at most) three launches.

    ``blocks[k]`` lists the blocks of launch ``k + 1`` as ``(tensor, tile)`` (launches 1 and 3)
    or ``(tensor, group)`` (launch 2). A two-phase tensor's ``"group"`` partial sums take
    ``tiles * bg`` floats from ``partial_offsets[t]`` (slot ``tile * bg + group % bg``); its
    groups' statistics ``B`` floats from ``stat_offsets[t]``. ``tensor_blocks[t]`` counts the
    tensor's blocks over all launches (its last one stores the new step count).
    """

    tiles: tuple[TensorTile, ...]
    proxes: tuple[str, ...]
    blocks: tuple[tuple[tuple[int, int], ...], ...]
    partial_offsets: tuple[int, ...]
    stat_offsets: tuple[int, ...]
    partials: int
    stats: int
    tensor_blocks: tuple[int, ...]
    smem_bytes: int

    @property
    def launches(self) -> int:
        """Kernel launches of a step: the non-empty block lists."""
        return sum(1 for blocks in self.blocks if blocks)


def build_plan(layouts: list[GroupLayout], proxes: list[str]) -> CudaPlan:
    """The plan of one launch group over tensors with these layouts and (per-tensor) proxes.

    Launch 1 runs every tensor's tiles, grouped tensors first (the heaviest blocks) and
    elementwise ones last; launches 2 and 3 cover only the two-phase tensors.
    """
    tiles = [tensor_tile(layout, prox) for layout, prox in zip(layouts, proxes)]
    partial_offsets, stat_offsets = [], []
    partials = stats = 0
    first: list[tuple[int, int]] = []
    last: list[tuple[int, int]] = []
    group_blocks: list[tuple[int, int]] = []
    shrink_blocks: list[tuple[int, int]] = []
    tensor_blocks = []
    for t, (layout, prox, tile) in enumerate(zip(layouts, proxes, tiles)):
        n = tile.count(layout)
        partial_offsets.append(partials)
        stat_offsets.append(stats)
        own = [(t, j) for j in range(n)]
        (last if prox in ("none", "l1") else first).extend(own)
        blocks = n
        if not tile.one_pass:
            if prox == "group":
                partials += n * tile.bg
            stats += layout.groups
            group_blocks.extend((t, b) for b in range(layout.groups))
            shrink_blocks.extend(own)
            blocks += layout.groups + n
        tensor_blocks.append(blocks)
    return CudaPlan(
        tuple(tiles), tuple(proxes), (tuple(first + last), tuple(group_blocks), tuple(shrink_blocks)),
        tuple(partial_offsets), tuple(stat_offsets), partials, stats, tuple(tensor_blocks),
        max([tile.smem_bytes for tile in tiles], default=0),
    )


def tile_offsets(layout: GroupLayout, tile: TensorTile, index: int) -> list[tuple[int, int]]:
    """``(storage offset, group)`` of every element of tile ``index``, in the kernels' order
    (``TileCoords`` in the .cu; for tests and planning, not for the step)."""
    A, B, K = layout
    tiles_k, tiles_a = -(-K // tile.bk), -(-A // tile.ba)
    tk, ta, tb = index % tiles_k, (index // tiles_k) % tiles_a, index // (tiles_k * tiles_a)
    a0, b0, k0 = ta * tile.ba, tb * tile.bg, tk * tile.bk
    na, nb, nk = min(tile.ba, A - a0), min(tile.bg, B - b0), min(tile.bk, K - k0)
    col0 = b0 * K + k0
    return [((a0 + row) * B * K + col0 + col, b0 + col // nk) for row in range(na) for col in range(nb * nk)]


def group_partial_slots(layout: GroupLayout, tile: TensorTile, group: int) -> list[int]:
    """The partial-sum slots launch 1 writes for ``group`` and launch 2 adds, in that order."""
    A, _, K = layout
    per_row_block = -(-A // tile.ba) * -(-K // tile.bk)
    first = (group // tile.bg) * per_row_block
    return [(first + j) * tile.bg + group % tile.bg for j in range(per_row_block)]
