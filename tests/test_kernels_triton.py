"""The ``"triton"`` backend: what the parity suite (``tests/test_parity.py``) does not reach.

Slabs of several items (with the plan's constants patched small), the plan's coverage, the
host path's caching, compilation for real GPUs (PTX, ptxas), ``torch.compile``, and on a GPU the
no-sync, graph-capture and real-size checks. Problems, tolerances and the step check are the
shared ones of ``tests/parity.py``.

Without a GPU the kernels run in Triton's interpreter on CPU tensors: ``TRITON_INTERPRET=1``
must be set before :mod:`lomt_kernels.kernels.triton_group_adam` is first imported (the
``@triton.jit`` decorators read it then; ``tests/conftest.py`` sets it for the whole session when
there is no GPU). With a GPU the same tests run the compiled kernels on CUDA tensors.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import pytest
import torch

from lomt_kernels import reference
from lomt_kernels.contract import StepTensors
from lomt_kernels.grouping import GROUPINGS, GroupLayout, group_layout
from parity import (
    LR, NONFINITE_CASES, PROX_NAMES, STEPS, TOLERANCES, State, assert_close,
    assert_some_groups_zero_and_some_not, check_found_inf, check_step, hyper, resnet50_shapes, run_graph_capture,
    run_nonfinite, run_steady_state_without_sync, run_steps, run_ten_repeats, zero_groups,
)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton_backend = pytest.importorskip("lomt_kernels.kernels.triton_group_adam")
from lomt_kernels.kernels.triton_group_adam import launch, plan  # noqa: E402

DEVICE = torch.device("cpu" if triton_backend.INTERPRETED else "cuda")
_REASON = triton_backend.unavailable_reason(DEVICE)
pytestmark = [
    pytest.mark.skipif(_REASON is not None, reason=f"triton backend unavailable: {_REASON}"),
    # The interpreter evaluates both sides of tl.where, so padding lanes and zeroed groups
    # warn about divisions by zero whose results are discarded.
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]
cuda_only = pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a CUDA device (and no TRITON_INTERPRET)")

#: Small tensors (by shape and memory format), whose slabs span several items once
#: :func:`small_items` patches the plan's constants; the shared ones would take the interpreter
#: many times longer.
CONV3X3 = ((6, 5, 3, 3), "contiguous")
CONV1X1 = ((6, 5, 1, 1), "contiguous")
LINEAR = ((7, 5), "contiguous")
BIAS = ((6,), "contiguous")
CONV3X3_CHANNELS_LAST = ((6, 5, 3, 3), "channels_last")


@pytest.fixture
def small_items(monkeypatch):
    """Items of 64 elements in rows of 32 bytes, so the test tensors' slabs take several items:
    PARTIAL items, the reduction by the last of them and FINISH items, as large tensors do."""
    monkeypatch.setattr(plan, "ITEM_ELEMENTS", 64)
    monkeypatch.setattr(plan, "ROW_BYTES", 32)
    launch._CACHE.clear()
    yield
    launch._CACHE.clear()


def multi_item(p: torch.Tensor, grouping: str) -> bool:
    """Whether one of ``p``'s slabs spans several items."""
    layout = group_layout(p, grouping)
    tile = plan.TileShape.for_itemsize(p.element_size())
    return layout is not None and p.numel() > 0 and any(s.items(tile) > 1 for s in plan.tensor_slabs(0, layout, 1, True, tile))


@pytest.mark.parametrize("case", NONFINITE_CASES)
@pytest.mark.parametrize("prox", ["group", "group_weighted"])
def test_nonfinite_values_match_reference_in_multi_item_slabs(small_items, prox, case):
    """Slabs of several items: partial sums added across items, the weighted prox's Newton
    passes over the slab, and the finishers."""
    assert multi_item(torch.empty(CONV3X3[0]), "in_channel")
    run_nonfinite(triton_backend.step, [CONV3X3, LINEAR], prox, case, torch.float32, DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("prox", ["group", "group_weighted"])
def test_multi_item_slabs(small_items, prox, grouping, dtype):
    """Slabs of several items: partial sums, their fixed-order reduction (and the weighted
    prox's Newton passes over the slab), then the finishers; 16-bit params keep ``z`` in float32
    scratch meanwhile, so the tolerances are those of the one-item path."""
    names = [CONV3X3, CONV1X1, LINEAR, CONV3X3_CHANNELS_LAST, ((3, 37, 7, 7), "contiguous"), ((70, 37), "contiguous")]
    state = State(names, grouping, dtype, DEVICE)
    assert any(multi_item(p, grouping) for p in state.params)
    # Two steps: the second starts from the groups the first zeroed, the state of every later
    # step; a third repeats it, at the interpreter's cost per item.
    masks = run_steps(triton_backend.step, state, hyper(prox, grouping), steps=2)
    assert_some_groups_zero_and_some_not(masks)


#: Layouts the slab cutter treats differently: K = 1 (1x1 convs, channels-last), 9 and 49 with
#: ragged A and B, a group wider than a row (K > block_c), and contiguous groups (A = 1).
PLAN_LAYOUTS = [GroupLayout(37, 70, 1), GroupLayout(5, 13, 9), GroupLayout(3, 3, 49), GroupLayout(40, 2, 300),
                GroupLayout(1, 5, 1000), GroupLayout(1, 1, 333), GroupLayout(2048, 512, 1)]


@pytest.mark.parametrize("itemsize", [4, 2])
def test_plan_covers_every_element_once(itemsize):
    """Every element is in exactly one Adam item (ELEMENTWISE, FUSED or PARTIAL), every PARTIAL
    item has a FINISH item over the same elements, and a slab's finishers come after all its
    PARTIAL items in ticket order (the order the interpreter, and a GPU's tickets, run them in)."""
    tile = plan.TileShape.for_itemsize(itemsize)
    grouped = [layout.outer > 1 or layout.groups > 1 for layout in PLAN_LAYOUTS]
    work = plan.build_plan(PLAN_LAYOUTS, [1 if g else 0 for g in grouped], grouped, tile, lag=5, sums=2)
    seen = [torch.zeros(math.prod(layout), dtype=torch.int64) for layout in PLAN_LAYOUTS]
    unfinished = [torch.zeros(math.prod(layout), dtype=torch.int64) for layout in PLAN_LAYOUTS]
    last_partial: dict[int, int] = {}
    for ticket, item in enumerate(work.items):
        slab = work.slabs[item.slab]
        offsets = torch.tensor(plan.element_offsets(slab, item, tile), dtype=torch.int64)
        assert len(offsets) == plan.item_elements(slab, item, tile) > 0
        if item.kind == plan.ItemKind.FINISH:
            assert last_partial[item.slab] < ticket
            unfinished[slab.tensor][offsets] -= 1
        else:
            seen[slab.tensor][offsets] += 1
            if item.kind == plan.ItemKind.PARTIAL:
                last_partial[item.slab] = ticket
                unfinished[slab.tensor][offsets] += 1
    for layout, count, left in zip(PLAN_LAYOUTS, seen, unfinished):
        assert bool((count == 1).all()) and bool((left == 0).all()), layout


def test_resnet50_1x1_slabs_are_256_byte_vectorised_rows():
    """Every K = 1 slab of the ResNet-50 convs reads rows of 256 bytes that vectorise."""
    tile = plan.TileShape.for_itemsize(4)
    for shape, _ in resnet50_shapes():
        layout = group_layout(torch.empty(shape, device="meta"), "in_channel")
        if layout.inner == 1:
            for slab in plan.tensor_slabs(0, layout, 1, True, tile):
                assert slab.width * 4 == plan.ROW_BYTES and plan.geometry_is_vectorisable(slab, tile), (shape, slab)


@pytest.mark.parametrize("prox", PROX_NAMES)
def test_one_launch_per_step_and_nothing_rebuilt(prox):
    """Weights and biases, plain-Adam tensors included: one launch a step; the plan is built
    once; new gradients (as ``zero_grad(set_to_none=True)`` makes) only rewrite their column of
    the table, and the same gradients nothing."""
    state = State([CONV3X3, BIAS, CONV1X1, LINEAR] * 3, "in_channel", torch.float32, DEVICE)
    before = dict(triton_backend.COUNTS)
    run_steps(triton_backend.step, state, hyper(prox, "in_channel"), steps=3)
    counts = {key: triton_backend.COUNTS[key] - before.get(key, 0) for key in ("launches", "builds", "grad_refreshes")}
    assert counts == {"launches": 3, "builds": 1, "grad_refreshes": 3}
    check_step(triton_backend.step, state, hyper(prox, "in_channel"))
    assert triton_backend.COUNTS["grad_refreshes"] - before.get("grad_refreshes", 0) == 3


@pytest.mark.parametrize("prox", ["group", "group_weighted", "l1"])
def test_steps_counted_in_the_kernel(small_items, prox):
    """The kernel adds one to each step count, which may differ between tensors, in slabs of
    several items, and updates as the reference does with the incremented counts."""
    state = State([CONV3X3, BIAS, LINEAR], "in_channel", torch.float32, DEVICE)
    state.steps[1] += 4  # per-tensor counts differ
    run_steps(triton_backend.step, state, hyper(prox, "in_channel"))
    assert [float(s) for s in state.steps] == [10.0 + STEPS, 14.0 + STEPS, 10.0 + STEPS]


@pytest.mark.parametrize("found", [0.0, 1.0])
def test_found_inf_skips_the_step_in_multi_item_slabs(small_items, found):
    check_found_inf(triton_backend.step, found, DEVICE)


def test_repeats_are_bit_identical(small_items):
    """The partial sums are added in a fixed order: two runs from one state agree to the bit."""
    results = []
    for _ in range(2):
        state = State([CONV3X3, CONV1X1, LINEAR], "in_channel", torch.float32, DEVICE, seed=3)
        run_steps(triton_backend.step, state, hyper("group_weighted", "in_channel"))
        results.append(state.params)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_optimizer_on_the_triton_backend(small_items):
    """``FusedGroupProxAdam(backend="triton")`` on a small float32 net with two param groups (the
    prox on the convs, plain Adam elsewhere: one launch each), under ``GradScaler``: the kernel
    counts the steps, a step with an inf gradient is skipped on the device, and a state dict
    saved midway resumes; params as the reference backend gives them, within the parity bounds."""
    from lomt_kernels import FusedGroupProxAdam

    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 1),
                                   torch.nn.Flatten(), torch.nn.Linear(16 * 4, 5))

    def optimizer(model, backend):
        convs = [p for p in model.parameters() if p.dim() == 4]
        rest = [p for p in model.parameters() if p.dim() != 4]
        return FusedGroupProxAdam([{"params": convs, "lambda_": 2.0, "prox": "group_weighted"}, {"params": rest}],
                                  lr=5e-2, backend=backend)

    def train(model, opt, scaler, seeds):
        for seed in seeds:
            x = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
            opt.zero_grad(set_to_none=True)
            scaler.scale(model(x).square().mean()).backward()
            if seed == 2:
                model[0].weight.grad[0, 0, 0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()

    models = {backend: net() for backend in ("triton", "torch")}
    opts = {backend: optimizer(model, backend) for backend, model in models.items()}
    scalers = {backend: torch.amp.GradScaler("cpu", init_scale=256.0) for backend in models}
    for backend in models:
        train(models[backend], opts[backend], scalers[backend], [1, 2, 3])
    saved = (copy.deepcopy(models["triton"].state_dict()), copy.deepcopy(opts["triton"].state_dict()))
    resumed = net()
    resumed.load_state_dict(saved[0])
    opts["resumed"] = optimizer(resumed, "triton")
    opts["resumed"].load_state_dict(saved[1])
    models["resumed"], scalers["resumed"] = resumed, torch.amp.GradScaler("cpu", init_scale=scalers["triton"].get_scale())
    for backend in models:
        train(models[backend], opts[backend], scalers[backend], [4, 5])
    for name, (ours, theirs) in enumerate(zip(models["triton"].parameters(), models["torch"].parameters())):
        assert_close(ours.detach(), theirs.detach().double(), TOLERANCES[torch.float32], f"param {name}")
        assert float(opts["triton"].state[ours]["step"]) == 4  # the inf step was skipped
    for ours, again in zip(models["triton"].parameters(), models["resumed"].parameters()):
        assert torch.equal(ours, again)
    assert group_sparsity_of(models["triton"][0].weight) > 0


def group_sparsity_of(weight: torch.Tensor) -> float:
    return float(zero_groups(weight.detach(), "in_channel").float().mean())


def test_float64_takes_the_reference_path():
    state = State([CONV3X3, BIAS], "in_channel", torch.float64, DEVICE)
    state.new_grads()
    expected = state.clone()
    h = hyper("group_weighted", "in_channel")
    triton_backend.step(state.tensors(), h, LR)
    reference.step(expected.tensors(), h, LR)
    for a, b in zip(state.tensors().lists(), expected.tensors().lists()):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_torch_compile_sees_one_custom_op():
    state = State([CONV3X3, BIAS], "in_channel", torch.float32, DEVICE)
    state.new_grads()
    expected = state.clone()
    h = hyper("group", "in_channel")

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(params, grads, exp_avgs, exp_avg_sqs, steps):
        triton_backend.step(StepTensors(params, grads, exp_avgs, exp_avg_sqs, steps), h, LR)

    step(*state.tensors().lists())
    triton_backend.step(expected.tensors(), h, LR)
    for a, b in zip(state.tensors().lists(), expected.tensors().lists()):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


_PTX_CHECK = """
import json, re, sys
from lomt_kernels.kernels import triton_group_adam as backend
arch = int(sys.argv[1])
out = {}
for name, kernel in backend.compile_kernels(arch).items():
    ptx = kernel.asm["ptx"]
    out[name] = dict(backend.ptxas_report(ptx, arch), loads=sorted(set(re.findall(r"ld\\.global[.\\w]*", ptx))),
                     stores=sorted(set(re.findall(r"st\\.global[.\\w]*", ptx))))
print(json.dumps(out))
"""


def test_kernel_compiles_for_gpus_without_spills_and_with_vector_loads():
    """The real compiler (stricter than the interpreter) builds the kernel for sm_80 and sm_90, for
    float32 and bfloat16 params, with every option off and on. ptxas reports no spills; the PTX
    has vector loads and stores of a thread's four elements (the aligned items: K = 1 slabs,
    elementwise tensors), L2-only ``.cg`` vector loads of the waiting float32 ``z`` (what the
    finishers and the reduction read from other programs) and an acquire load (the finishers'
    wait)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    builds = {
        arch: subprocess.Popen([sys.executable, "-c", _PTX_CHECK, arch], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        for arch in ("80", "90")
    }
    for arch, build in builds.items():
        out, err = build.communicate(timeout=600)
        assert build.returncode == 0, err[-3000:]
        variants = json.loads(out)
        assert len(variants) == 4
        for name, report in variants.items():
            assert report["spill_stores"] == report["spill_loads"] == 0, (arch, name, report)
            # float32: four elements a thread in one 16-byte access; bfloat16: four in 8 bytes.
            vector = ".v4.b32" if name.startswith("float32") else ".v2.b32"
            assert f"ld.global{vector}" in report["loads"] and f"st.global{vector}" in report["stores"], (arch, name, report)
            assert "ld.global.cg.v4.b32" in report["loads"], (arch, name, report["loads"])  # float32 z
            assert any(".acquire" in load for load in report["loads"]), (arch, name, report["loads"])


@cuda_only
@pytest.mark.parametrize("prox", ["group", "group_weighted"])
def test_multi_item_slabs_at_real_sizes(prox):
    """Groups over many items without patching: a tall Linear grouped by input (K = 1, 6,000
    rows) and a wide one grouped by output (contiguous groups of 6,000)."""
    for grouping, shape in (("in_channel", (6000, 24)), ("out_channel", (12, 6000))):
        assert multi_item(torch.empty(shape), grouping)
        state = State([(shape, "contiguous")], grouping, torch.float32, DEVICE)
        masks = run_steps(triton_backend.step, state, hyper(prox, grouping))
        assert_some_groups_zero_and_some_not(masks)


@cuda_only
@pytest.mark.parametrize("prox", PROX_NAMES)
def test_steady_state_step_never_syncs(prox):
    run_steady_state_without_sync("triton", prox, [(64, 32, 3, 3), (256, 64, 1, 1), (64,), (10, 64)], DEVICE)


@cuda_only
@pytest.mark.parametrize("prox", ["group", "group_weighted"])
def test_ten_repeats_at_real_sizes_are_bit_identical(prox):
    run_ten_repeats(triton_backend.step, prox, resnet50_shapes(), DEVICE)


@cuda_only
@pytest.mark.parametrize("prox", ["group", "group_weighted"])
def test_resnet50_conv_shapes(prox):
    state = State(resnet50_shapes(), "in_channel", torch.float32, DEVICE)
    assert_some_groups_zero_and_some_not(run_steps(triton_backend.step, state, hyper(prox, "in_channel")))


@cuda_only
@pytest.mark.parametrize("prox", ["group", "group_weighted"])
def test_cuda_graph_capture(prox):
    run_graph_capture(triton_backend.step, prox, DEVICE)
