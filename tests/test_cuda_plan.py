"""The ``"cuda"`` backend's plan and host path, on the CPU (no GPU, no build).

:mod:`lomt_kernels.kernels.cuda_plan` decides every block of every launch, and the kernels in
``csrc/group_prox_adam_cuda.cu`` only follow it (their ``TileCoords`` is :func:`cuda_plan.tile_offsets`),
so these tests check here what the GPU will do: every element is stepped once in launch 1, every
two-phase element shrunk once in launch 3, every two-phase group solved once in launch 2, partial
sums written and read at the same slots, at most three launches, shared memory within the limit;
and the tables the host path hands the extension point at the right tensors, step after step.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from benchmarks.params import resnet50_conv_shapes
from lomt_kernels.contract import AdamHyper, StepTensors
from lomt_kernels.grouping import GroupLayout
from lomt_kernels.kernels import cuda, cuda_plan, device_table

SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "group_prox_adam_cuda.cu"

#: Layouts of every class the tiler treats differently: K in {1, 9, 49} with ragged A and B; K = 1
#: tall and short (1x1 and channels-last convs); a group wider than a chunk (K > 4096, A = 1); tall
#: groups that leave "group" too few per tile (two phases by run length); groups bigger than
#: shared memory (two phases by size), for K = 1 and K = 9.
LAYOUTS = [
    GroupLayout(37, 70, 1), GroupLayout(5, 13, 9), GroupLayout(3, 3, 49), GroupLayout(40, 2, 300),
    GroupLayout(1, 5, 1000), GroupLayout(2048, 40, 1), GroupLayout(1, 3, 9000), GroupLayout(13000, 5, 1),
    GroupLayout(1500, 3, 9), GroupLayout(7, 101, 1),
]
#: Elementwise tensors (biases, and every tensor under "l1"/"none"): around a chunk's size.
ELEMENTWISE = [GroupLayout(1, 1, n) for n in (1, 6, 4096, 4097, 10000)]


def plan_for(prox: str, layouts: list[GroupLayout] = LAYOUTS) -> tuple[list[GroupLayout], cuda_plan.CudaPlan]:
    """A plan over ``layouts`` taking ``prox`` (elementwise under "l1"/"none") and the elementwise tensors."""
    all_layouts = list(layouts) + ELEMENTWISE
    proxes = [prox] * len(layouts) + ["none"] * len(ELEMENTWISE)
    if prox in ("none", "l1"):
        all_layouts = [GroupLayout(1, 1, math.prod(layout)) for layout in all_layouts]
    return all_layouts, cuda_plan.build_plan(all_layouts, proxes)


@pytest.mark.parametrize("prox", ["group", "group_weighted", "l1", "none"])
def test_every_element_stepped_once_and_every_two_phase_element_shrunk_once(prox):
    layouts, plan = plan_for(prox)
    assert plan.launches <= 3 and len(plan.blocks) == 3
    stepped = [torch.zeros(math.prod(layout), dtype=torch.int64) for layout in layouts]
    shrunk = [torch.zeros(math.prod(layout), dtype=torch.int64) for layout in layouts]
    for counts, blocks in ((stepped, plan.blocks[0]), (shrunk, plan.blocks[2])):
        for t, tile in blocks:
            offsets = [offset for offset, _ in cuda_plan.tile_offsets(layouts[t], plan.tiles[t], tile)]
            assert offsets, (layouts[t], tile)
            counts[t][torch.tensor(offsets)] += 1
    for layout, tile, once, twice in zip(layouts, plan.tiles, stepped, shrunk):
        assert bool((once == 1).all()), layout
        assert bool((twice == (0 if tile.one_pass else 1)).all()), layout


@pytest.mark.parametrize("prox", ["group", "group_weighted"])
def test_groups_whole_in_one_pass_tiles_and_solved_once_in_two(prox):
    """A one-pass tile holds each of its groups whole; a two-phase tensor's groups each get one
    block of launch 2; and its "group" partial sums are written (launch 1) at distinct slots,
    exactly the ones launch 2 adds for that group."""
    layouts, plan = plan_for(prox)
    two_phase = {t for t, tile in enumerate(plan.tiles) if not tile.one_pass}
    assert {t for t, _ in plan.blocks[1]} == two_phase and two_phase  # some of each kind
    assert len(two_phase) < len(LAYOUTS)
    assert sorted(plan.blocks[1]) == sorted((t, b) for t in two_phase for b in range(layouts[t].groups))
    written: dict[int, dict[int, set[int]]] = {t: {} for t in two_phase}
    for t, tile_index in plan.blocks[0]:
        layout, tile = layouts[t], plan.tiles[t]
        elements = cuda_plan.tile_offsets(layout, tile, tile_index)
        groups = {group for _, group in elements}
        assert len(groups) <= tile.bg <= cuda_plan.MAX_GROUPS_PER_TILE
        if tile.one_pass and layout.groups > 1 and layout.outer * layout.inner > 1:
            for group in groups:
                assert sum(g == group for _, g in elements) == layout.outer * layout.inner
        if t in two_phase:
            first = min(groups)
            assert first % tile.bg == 0
            for group in groups:
                written[t].setdefault(group, set()).add(tile_index * tile.bg + group - first)
    for t in two_phase:
        layout, tile = layouts[t], plan.tiles[t]
        slots = [slot for group in range(layout.groups) for slot in written[t][group]]
        assert len(slots) == len(set(slots))
        assert max(slots) < tile.count(layout) * tile.bg
        for group in range(layout.groups):
            assert written[t][group] == set(cuda_plan.group_partial_slots(layout, tile, group))
    if prox == "group":
        assert plan.partials == sum(plan.tiles[t].count(layouts[t]) * plan.tiles[t].bg for t in two_phase)
    assert plan.stats == sum(layouts[t].groups for t in two_phase)


@pytest.mark.parametrize("prox", ["group", "group_weighted", "l1"])
def test_block_table_consistent(prox):
    """Each tensor's block count (its last block stores the step) is its blocks over the three
    launches; tiles fit shared memory; staged rows are odd and hold a tile's run."""
    layouts, plan = plan_for(prox)
    for t, blocks in enumerate(plan.tensor_blocks):
        assert blocks == sum(1 for launch in plan.blocks for tensor, _ in launch if tensor == t)
    assert plan.smem_bytes == max(tile.smem_bytes for tile in plan.tiles) <= cuda_plan.SHARED_MEMORY
    for layout, tile in zip(layouts, plan.tiles):
        if not tile.smem_bytes:
            continue  # nothing staged: elementwise, or the weighted prox's two-phase launch 1
        assert tile.pitch % 2 == 1 and tile.pitch >= tile.bg * min(tile.bk, layout.inner)
        if tile.one_pass:
            arrays = 2 if prox == "group_weighted" else 1
            assert tile.ba == layout.outer and tile.bk == layout.inner
            assert tile.smem_bytes == 4 * cuda_plan.MAX_GROUPS_PER_TILE + arrays * 4 * tile.ba * tile.pitch
    stats_ends = [o + layouts[t].groups for t, o in enumerate(plan.stat_offsets) if not plan.tiles[t].one_pass]
    assert max(stats_ends, default=0) <= plan.stats


@pytest.mark.parametrize("prox", ["group", "group_weighted", "l1"])
@pytest.mark.parametrize("grouping", ["in_channel", "out_channel"])
def test_resnet50_and_channels_last_in_three_launches(prox, grouping):
    """The ResNet-50 convs (contiguous and channels-last) with biases, as the host path lays them out."""
    hyper = device_table.PlanKey(prox, grouping, False, 0.9, 0.999)
    tensors = [torch.empty(shape, device="meta") for shape in sorted(set(resnet50_conv_shapes()))]
    tensors += [t.to(memory_format=torch.channels_last) for t in tensors] + [torch.empty(64, device="meta")]
    layouts, proxes = zip(*(device_table.layout_and_prox(t, hyper) for t in tensors))
    assert all(layout is not None for layout in layouts)
    plan = cuda_plan.build_plan(list(layouts), list(proxes))
    assert plan.launches <= 3 and plan.smem_bytes <= cuda_plan.SHARED_MEMORY
    assert len(plan.blocks[0]) == sum(tile.count(layout) for layout, tile in zip(layouts, plan.tiles))


def test_kernel_constants_and_columns_match_the_source():
    """The .cu's block size, per-tile group limit and table columns are the plan's."""
    source = SOURCE.read_text()
    assert int(re.search(r"constexpr int kThreads = (\d+);", source).group(1)) == cuda_plan.THREADS
    assert int(re.search(r"constexpr int kMaxGroupsPerTile = (\d+);", source).group(1)) == cuda_plan.MAX_GROUPS_PER_TILE
    enum = re.search(r"enum Column : int \{(.*?)\};", source, re.S).group(1)
    names = [name.strip().split("=")[0].strip() for name in enum.replace("\n", " ").split(",") if name.strip()]
    assert names[-1] == "kFields" and len(names) - 1 == device_table.SHARED_FIELDS + len(cuda.TENSOR_COLUMNS)
    assert names[device_table.SHARED_FIELDS:-1] == ["kA", "kB", "kK", "kTileA", "kTileG", "kTileK", "kPitch", "kProx",
                                                    "kOnePass", "kPartial0", "kStat0", "kBlocks"]
    assert len(cuda.TENSOR_COLUMNS) == 12


class RecordingExtension:
    """Stands in for the built extension: records what each step hands the kernels."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def group_prox_adam(self, p_anchor, g_anchor, step_anchor, tensors, blocks, counters, partials, stats,
                        launch_blocks, smem_bytes, prox, lr_tensor, grad_scale, found_inf, *scalars) -> None:
        self.calls.append(dict(anchors=(p_anchor, g_anchor, step_anchor), tensors=tensors.clone(), blocks=blocks,
                               launch_blocks=launch_blocks, smem_bytes=smem_bytes, prox=prox, lr_tensor=lr_tensor,
                               found_inf=found_inf, scalars=scalars))


def test_host_path_tables_point_at_the_tensors_and_follow_moving_grads(monkeypatch):
    """Three steps with fresh gradients each (as ``zero_grad(set_to_none=True)``): one build, one
    call a step with at most three launches, the grads' column rewritten each step, every
    offset decoding to its tensor's data pointer; a grad of another dtype goes to the copies path."""
    extension = RecordingExtension()
    monkeypatch.setattr(cuda, "build", lambda: extension)
    shapes = [(64, 32, 3, 3), (256, 64, 1, 1), (64,), (10, 64), (3000, 20)]
    params = [torch.randn(shape) for shape in shapes]
    params[0] = params[0].contiguous(memory_format=torch.channels_last)
    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    steps = [torch.tensor(0.0) for _ in params]
    lr = torch.tensor(1e-3)
    hyper = AdamHyper(lambda_=1e-3, prox="group", grouping="in_channel")
    device_table._CACHE.clear()
    before = dict(device_table.COUNTS)
    for step in range(3):
        grads = [torch.randn_like(p) for p in params]
        cuda.step(StepTensors(params, grads, exp_avgs, exp_avg_sqs, steps), hyper, lr)
        call = extension.calls[-1]
        p_anchor, g_anchor, step_anchor = call["anchors"]
        rows = call["tensors"]
        for i, row in enumerate(rows.tolist()):
            item = p_anchor.element_size()
            assert p_anchor.data_ptr() + row[device_table.P] * item == params[i].data_ptr()
            assert p_anchor.data_ptr() + row[device_table.M] * item == exp_avgs[i].data_ptr()
            assert p_anchor.data_ptr() + row[device_table.V] * item == exp_avg_sqs[i].data_ptr()
            assert g_anchor.data_ptr() + row[device_table.G] * item == grads[i].data_ptr()
            assert step_anchor.data_ptr() + row[device_table.STEP] * 4 == steps[i].data_ptr()
        assert sum(call["launch_blocks"]) == call["blocks"].shape[0] and call["lr_tensor"] is lr
    counts = {key: device_table.COUNTS[key] - before.get(key, 0) for key in ("builds", "grad_refreshes")}
    assert counts == {"builds": 1, "grad_refreshes": 3} and len(extension.calls) == 3
    launches = [n for n in extension.calls[-1]["launch_blocks"] if n]
    assert len(launches) == 3  # the (3000, 20) Linear grouped by input takes two phases
    assert [float(s) for s in steps] == [0.0] * len(steps)  # the recorder does not step

    # A bfloat16 grad of a float32 param is cast on a copy, with a launch of its own.
    grads = [torch.randn_like(p) for p in params]
    grads[3] = grads[3].bfloat16()
    cuda.step(StepTensors(params, grads, exp_avgs, exp_avg_sqs, steps), hyper, lr)
    assert len(extension.calls) == 5 and extension.calls[-1]["tensors"].shape[0] == 1
