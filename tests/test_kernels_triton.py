"""The ``"triton"`` backend against the float64 reference, step by step.

Without a GPU the kernels run in Triton's interpreter on CPU tensors: ``TRITON_INTERPRET=1``
must be set before :mod:`lomt_kernels.kernels.triton_group_adam` is first imported (the
``@triton.jit`` decorators read it then; ``tests/conftest.py`` sets it for the whole session when
there is no GPU). With a GPU the same tests run the compiled kernels on CUDA tensors.

**How results are compared.** Each step starts the kernel and the reference from the *same*
state (the kernel's, widened to float64), so the comparison measures one step's rounding and
never a drift between two trajectories; the state then evolves through several steps, so the
moments and the step count are checked too.

**Tolerances** (per tensor, ``|actual - expected| <= ATOL_SCALE * max|expected| + rtol * |expected|``):

* float32: ``rtol = ATOL_SCALE = 2**-18`` (64 half-ulps of float32, about 3.8e-6). The step
  rounds about ten times along any dependency chain (bias-corrected ``d``, ``m/d``,
  ``p - s m/d``, the group norm's tree sum, the shrink factor), and ``p - s m/d`` may cancel,
  so the error is a few half-ulps of the *operands*, which ``ATOL_SCALE * max|expected|`` covers
  for elements near zero. The weighted prox stops Newton at ``1 - phi <= 1e-6``; since phi is
  concave and increasing from below, that moves ``x_j`` by at most ``(1 - phi) |z_j|`` (about
  ``1e-6 max|z|``), inside the same bound. Observed errors are 2-3 half-ulps.
* bfloat16 (and float16): the kernel computes in float32 and rounds once; the reference is
  rounded once from float64, so the two differ by at most one ulp of the stored value,
  ``rtol = 2**-7`` for bfloat16 (``2**-10`` for float16), plus the float32 ``ATOL_SCALE`` for
  elements that cancel to near zero.
* Which groups are exactly zero must match exactly; the data spread the group norms over a
  decade around the threshold so that some groups are zeroed and some are not.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from typing import Callable

import pytest
import torch

from benchmarks.params import resnet50_conv_shapes
from lomt_kernels import reference
from lomt_kernels.grouping import GroupLayout, as_groups, group_dim, group_layout

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

PROXES = ("none", "group", "group_weighted", "l1")
GROUPINGS = ("in_channel", "out_channel")
ATOL_SCALE = 2.0**-18
RTOL = {torch.float32: 2.0**-18, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
STEPS = 3

#: The tensors of every parity test, by name: shape and memory format.
SHAPES: dict[str, tuple[tuple[int, ...], str]] = {
    "conv3x3": ((6, 5, 3, 3), "contiguous"),
    "conv1x1": ((6, 5, 1, 1), "contiguous"),
    "linear": ((7, 5), "contiguous"),
    "bias": ((6,), "contiguous"),
    "empty": ((0, 5), "contiguous"),
    "conv3x3_channels_last": ((6, 5, 3, 3), "channels_last"),
    "linear_transposed": ((7, 5), "transposed"),  # no group layout: the kernel works on a copy
}
#: Hyperparameters of the parity tests. With lr * lambda_ = 0.5 the group prox zeroes a group
#: whose elements' rms is below 0.5 and takes 0.5 off the rms of the others, each step; the
#: data put the groups' rms between 0.1 and 10, so some are zeroed and some stay for all steps.
#: The weighted prox measures groups in Adam's metric, where these data's norms are about twice
#: as large: it takes twice the lambda_ for the same split.
HYPER = dict(lr=0.05, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
             decoupled_weight_decay=False, maximize=False)
LAMBDA = {"none": 10.0, "group": 10.0, "group_weighted": 20.0, "l1": 10.0}


def hyper(prox: str, grouping: str, **overrides) -> dict:
    """The keyword arguments of a backend call."""
    return {**HYPER, "lambda_": LAMBDA[prox], "prox": prox, "grouping": grouping, **overrides}


class State:
    """Params, grads, moments and steps for tensors named in :data:`SHAPES` (or given as
    ``(shape, memory format)``), generated from a seed."""

    def __init__(
        self, tensors: list[str | tuple[tuple[int, ...], str]], grouping: str, dtype: torch.dtype,
        device: torch.device, seed: int = 0,
    ):
        self.gen = torch.Generator().manual_seed(seed)
        self.grouping = grouping
        self.layouts = [SHAPES[t] if isinstance(t, str) else t for t in tensors]
        # Group norms spread over two decades around the threshold.
        self.params = [self._tensor(shape, fmt, dtype, device, spread=True) for shape, fmt in self.layouts]
        self.exp_avgs = [0.1 * self._tensor(shape, fmt, dtype, device) for shape, fmt in self.layouts]
        # v over six decades, as Adam's second moments are: d = sqrt(v) spans three.
        self.exp_avg_sqs = [
            (10 ** (6 * self._tensor(shape, fmt, torch.float64, device).abs().clamp(max=1) - 6)).to(dtype)
            for shape, fmt in self.layouts
        ]
        self.steps = [torch.tensor(10.0) for _ in self.layouts]  # on the CPU, as FusedGroupProxAdam keeps them
        self.grads: list[torch.Tensor] = []

    def _tensor(self, shape, fmt, dtype, device, spread: bool = False) -> torch.Tensor:
        if fmt == "transposed":
            t = torch.randn(shape[::-1], generator=self.gen, dtype=torch.float64).t()
        else:
            t = torch.randn(shape, generator=self.gen, dtype=torch.float64)
        if spread and t.dim() >= 2:
            dim = group_dim(self.grouping)
            scale = torch.logspace(-1, 1, t.shape[dim], dtype=torch.float64)
            t = t * scale.reshape([-1 if i == dim else 1 for i in range(t.dim())])
        if fmt == "channels_last":
            t = t.contiguous(memory_format=torch.channels_last)
        return t.to(device=device, dtype=dtype)

    def new_grads(self) -> None:
        """Fresh gradients, with the params' strides."""
        self.grads = [
            self._tensor(shape, fmt, p.dtype, p.device) for (shape, fmt), p in zip(self.layouts, self.params)
        ]

    def tensors(self) -> tuple[list[torch.Tensor], ...]:
        return self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.steps


def zero_groups(t: torch.Tensor, grouping: str) -> torch.Tensor:
    return (as_groups(t, grouping) == 0).all(dim=1)


def assert_close_to_reference(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """``actual`` (float32 or 16-bit) against the float64 ``expected``, with the module's tolerances
    (the scale from the finite elements), and a NaN or inf exactly where ``expected`` has one."""
    finite = expected[expected.isfinite()]
    atol = ATOL_SCALE * float(finite.abs().max()) if finite.numel() else 0.0
    torch.testing.assert_close(
        actual.double(), expected.to(actual.dtype).double(), rtol=RTOL[actual.dtype], atol=atol,
        equal_nan=True, msg=lambda message: f"{name}: {message}",
    )


def check_step(step_fn: Callable[..., None], state: State, **kwargs) -> list[torch.Tensor | None]:
    """One step of ``step_fn`` against the reference from the same state; returns, per tensor,
    the mask of its exactly-zero groups (``None`` for tensors with fewer than two dims).

    ``state.steps`` must already hold this step's count when ``step_fn`` returns (a CUDA graph
    may increment them itself).
    """
    params, grads, exp_avgs, exp_avg_sqs, steps = state.tensors()
    expected = [[t.double() for t in ts] for ts in (params, grads, exp_avgs, exp_avg_sqs)]
    step_fn(params, grads, exp_avgs, exp_avg_sqs, steps, **kwargs)
    kwargs = {k: float(v) if k == "lr" else v for k, v in kwargs.items() if k != "capturable"}
    reference.group_prox_adam(*expected, [s.cpu() for s in steps], **kwargs)
    masks = []
    for i, (p, m, v) in enumerate(zip(params, exp_avgs, exp_avg_sqs)):
        for name, actual, want in zip("pmv", (p, m, v), (expected[0][i], expected[2][i], expected[3][i])):
            assert actual.stride() == want.stride() or actual.numel() == 0
            assert_close_to_reference(actual, want, f"tensor {i} {tuple(p.shape)} {name}")
        if p.dim() >= 2 and p.numel() > 0 and kwargs["prox"] != "l1":
            mask = zero_groups(p, kwargs["grouping"])
            expected_mask = zero_groups(expected[0][i], kwargs["grouping"])
            assert torch.equal(mask, expected_mask), f"tensor {i}: zero groups {mask} != {expected_mask}"
            masks.append(mask)
        else:
            masks.append(None)
    return masks


def run_steps(
    step_fn: Callable[..., None], state: State, steps: int = STEPS, **kwargs
) -> list[list[torch.Tensor | None]]:
    """``steps`` checked steps with fresh gradients; the zero-group masks of each."""
    masks = []
    for _ in range(steps):
        state.new_grads()
        for s in state.steps:
            s += 1
        masks.append(check_step(step_fn, state, **kwargs))
    return masks


def assert_some_groups_zero_and_some_not(masks: list[list[torch.Tensor | None]]) -> None:
    for step_masks in masks:
        grouped = [m for m in step_masks if m is not None]
        assert grouped
        for mask in grouped:
            assert mask.any() and not mask.all(), f"want zero groups and live ones, got {mask.tolist()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("prox", PROXES)
def test_parity_with_reference(prox, grouping, dtype):
    state = State(list(SHAPES), grouping, dtype, DEVICE)
    masks = run_steps(triton_backend.group_prox_adam, state, **hyper(prox, grouping))
    if prox in ("group", "group_weighted"):
        assert_some_groups_zero_and_some_not(masks)
    elif prox == "l1":
        p = state.params[0]
        assert (p == 0).any() and (p != 0).any()
    else:
        assert all((p != 0).all() for p in state.params)


#: The switches of the step, each against the reference (``grad_scale`` becomes a 0-d tensor).
OPTIONS = {
    "coupled_decay": {"weight_decay": 0.1},
    "decoupled_decay_maximize": {"weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True},
    "grad_scale": {"grad_scale": 8.0},
    "lambda_zero": {"lambda_": 0.0},
    "lr_zero": {"lr": 0.0},  # tau = 0: every prox is the identity
    # tau ~ 1e-16: the prox is nearly the identity; the weighted prox's sums at theta = 0 would
    # overflow float32, so its first Newton step is taken in closed form.
    "tiny_lambda": {"lambda_": 1e-15},
    "small_beta1_eps_zero": {"beta1": 0.3, "eps": 0.0},
}


def run_options(step_fn: Callable[..., None], prox: str, options: dict, device: torch.device) -> None:
    """:func:`run_steps` with ``options`` on a conv, a channels-last conv and a bias."""
    if "grad_scale" in options:
        options = dict(options, grad_scale=torch.tensor(options["grad_scale"], device=device))
    state = State(["conv3x3", "conv3x3_channels_last", "bias"], "in_channel", torch.float32, device)
    before = [p.clone() for p in state.params]
    run_steps(step_fn, state, **hyper(prox, "in_channel", **options))
    if options.get("lr") == 0.0:
        assert all(torch.equal(a, b) for a, b in zip(state.params, before))


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("prox", ["group", "group_weighted"])
def test_options(prox, options):
    run_options(triton_backend.group_prox_adam, prox, options, DEVICE)


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


#: Ways group 2 of a tensor becomes non-finite (see :func:`run_nonfinite`).
NONFINITE_CASES = ("nan_grad", "inf_grad", "inf_param", "zero_grads_eps0")


def run_nonfinite(step_fn: Callable[..., None], tensors: list, prox: str, case: str, device: torch.device) -> None:
    """:func:`run_steps` with group 2 (in-channel) of the first tensor made non-finite as ``case``
    says: a NaN or inf gradient element, or an inf param element, in the first step (the NaN
    stays in the moments); or zero gradients and moments with eps = 0 (Adam's z is 0/0). Each
    step matches the reference (NaN and inf included), which passes such a group through as
    plain Adam leaves it (reference.py): so it has NaNs (or infs) and, under a group prox, no
    exact zeros, while the other groups are still zeroed or kept by the prox."""
    state = State(tensors, "in_channel", torch.float32, device)
    kwargs = hyper(prox, "in_channel")
    group, element = (slice(None), 2), (1, 2) + (1,) * (state.params[0].dim() - 2)
    if case == "inf_param":
        state.params[0][element] = float("inf")
    elif case == "zero_grads_eps0":
        kwargs["eps"] = 0.0
        state.exp_avgs[0][group] = 0.0
        state.exp_avg_sqs[0][group] = 0.0
    masks = []
    for step in range(STEPS):
        state.new_grads()
        if case == "zero_grads_eps0":
            state.grads[0][group] = 0.0
        elif step == 0 and case in ("nan_grad", "inf_grad"):
            state.grads[0][element] = float("nan" if case == "nan_grad" else "inf")
        for s in state.steps:
            s += 1
        masks.append(check_step(step_fn, state, **kwargs))
    poisoned = state.params[0][group]
    assert not poisoned.isfinite().all()
    if prox in ("group", "group_weighted"):
        assert (poisoned != 0).all()
        assert_some_groups_zero_and_some_not(masks)


@pytest.mark.parametrize("case", NONFINITE_CASES)
@pytest.mark.parametrize("prox", PROXES)
def test_nonfinite_values_match_reference(prox, case):
    """Slabs in one item (FUSED, for the group proxes), and the elementwise items of l1 and none."""
    run_nonfinite(triton_backend.group_prox_adam, ["conv3x3", "linear"], prox, case, DEVICE)


@pytest.mark.parametrize("case", NONFINITE_CASES)
@pytest.mark.parametrize("prox", ["group", "group_weighted"])
def test_nonfinite_values_match_reference_in_multi_item_slabs(small_items, prox, case):
    """Slabs of several items: partial sums added across items, the weighted prox's Newton
    passes over the slab, and the finishers."""
    assert multi_item(torch.empty(SHAPES["conv3x3"][0]), "in_channel")
    run_nonfinite(triton_backend.group_prox_adam, ["conv3x3", "linear"], prox, case, DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("prox", ["group", "group_weighted"])
def test_multi_item_slabs(small_items, prox, grouping, dtype):
    """Slabs of several items: partial sums, their fixed-order reduction (and the weighted
    prox's Newton passes over the slab), then the finishers; 16-bit params keep ``z`` in float32
    scratch meanwhile, so the tolerances are those of the one-item path."""
    names = ["conv3x3", "conv1x1", "linear", "conv3x3_channels_last", ((3, 37, 7, 7), "contiguous"),
             ((70, 37), "contiguous")]
    state = State(names, grouping, dtype, DEVICE)
    assert any(multi_item(p, grouping) for p in state.params)
    masks = run_steps(triton_backend.group_prox_adam, state, **hyper(prox, grouping))
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
    for shape in resnet50_conv_shapes():
        layout = group_layout(torch.empty(shape, device="meta"), "in_channel")
        if layout.inner == 1:
            for slab in plan.tensor_slabs(0, layout, 1, True, tile):
                assert slab.width * 4 == plan.ROW_BYTES and plan.geometry_is_vectorisable(slab, tile), (shape, slab)


@pytest.mark.parametrize("prox", PROXES)
def test_one_launch_per_step_and_nothing_rebuilt(prox):
    """Weights and biases, plain-Adam tensors included: one launch a step; the plan is built
    once; new gradients (as ``zero_grad(set_to_none=True)`` makes) only rewrite their column of
    the table, and the same gradients nothing."""
    state = State(["conv3x3", "bias", "conv1x1", "linear"] * 3, "in_channel", torch.float32, DEVICE)
    before = dict(triton_backend.COUNTS)
    run_steps(triton_backend.group_prox_adam, state, steps=3, **hyper(prox, "in_channel"))
    counts = {key: triton_backend.COUNTS[key] - before.get(key, 0) for key in ("launches", "builds", "grad_refreshes")}
    assert counts == {"launches": 3, "builds": 1, "grad_refreshes": 3}
    for s in state.steps:
        s += 1
    check_step(triton_backend.group_prox_adam, state, **hyper(prox, "in_channel"))
    assert triton_backend.COUNTS["grad_refreshes"] - before.get("grad_refreshes", 0) == 3


@pytest.mark.parametrize("prox", ["group", "group_weighted", "l1"])
def test_steps_counted_in_the_kernel(small_items, prox):
    """``increment_steps``: the kernel adds one to each step count (passed before the step) and
    updates as the reference does with the incremented counts."""
    state = State(["conv3x3", "bias", "linear"], "in_channel", torch.float32, DEVICE)
    state.steps[1] += 4  # per-tensor counts differ

    def counted(params, grads, exp_avgs, exp_avg_sqs, steps, **kwargs):
        for s in steps:
            s -= 1
        triton_backend.group_prox_adam(params, grads, exp_avgs, exp_avg_sqs, steps, increment_steps=True, **kwargs)

    run_steps(counted, state, **hyper(prox, "in_channel"))
    assert [float(s) for s in state.steps] == [10.0 + STEPS, 14.0 + STEPS, 10.0 + STEPS]


def run_found_inf(step_fn: Callable[..., None], state: State, prox: str, found: float) -> None:
    """GradScaler's ``found_inf``: a nonzero one leaves params, moments and step counts as they
    were; zero changes nothing in the step (which counts the steps itself)."""
    state.new_grads()
    before = [[t.clone() for t in ts] for ts in state.tensors()]
    kwargs = hyper(prox, "in_channel")
    step_fn(*state.tensors(), **kwargs, found_inf=torch.tensor(found, device=state.params[0].device), increment_steps=True)
    unchanged = all(torch.equal(a, b) for ts, bs in zip(state.tensors(), before) for a, b in zip(ts, bs))
    assert unchanged == bool(found)
    if not found:
        expected = [[t.double() for t in ts] for ts in before[:4]]
        reference.group_prox_adam(*expected, [s.cpu() + 1 for s in before[4]], **kwargs)
        for i, (ours, theirs) in enumerate(zip(state.params, expected[0])):
            assert_close_to_reference(ours, theirs, f"tensor {i} p")


@pytest.mark.parametrize("found", [0.0, 1.0])
def test_found_inf_skips_the_step_on_the_device(small_items, found):
    state = State(["conv3x3", "bias", "conv1x1"], "in_channel", torch.float32, DEVICE)
    run_found_inf(triton_backend.group_prox_adam, state, "group_weighted", found)


def test_repeats_are_bit_identical(small_items):
    """The partial sums are added in a fixed order: two runs from one state agree to the bit."""
    results = []
    for _ in range(2):
        state = State(["conv3x3", "conv1x1", "linear"], "in_channel", torch.float32, DEVICE, seed=3)
        run_steps(triton_backend.group_prox_adam, state, **hyper("group_weighted", "in_channel"))
        results.append(state.params)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_lr_tensor_matches_host_scalars():
    """``lr`` as a 0-d tensor on the device (read by the kernel) gives the same bits as a float."""
    kwargs = hyper("group_weighted", "in_channel", weight_decay=0.1, decoupled_weight_decay=True)
    names = ["conv3x3", "linear", "bias"]
    host, on_device = (State(names, "in_channel", torch.float32, DEVICE) for _ in range(2))
    lr = torch.tensor(kwargs.pop("lr"), device=DEVICE)
    for _ in range(STEPS):
        for state in (host, on_device):
            state.new_grads()
            for s in state.steps:
                s += 1
        triton_backend.group_prox_adam(*host.tensors(), lr=float(lr), **kwargs)
        triton_backend.group_prox_adam(*on_device.tensors(), lr=lr, capturable=True, **kwargs)
        for name in ("params", "exp_avgs", "exp_avg_sqs"):
            for ours, theirs in zip(getattr(host, name), getattr(on_device, name)):
                assert torch.equal(ours, theirs), name


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
        assert_close_to_reference(ours.detach(), theirs.detach().double(), f"param {name}")
        assert float(opts["triton"].state[ours]["step"]) == 4  # the inf step was skipped
    for ours, again in zip(models["triton"].parameters(), models["resumed"].parameters()):
        assert torch.equal(ours, again)
    assert group_sparsity_of(models["triton"][0].weight) > 0


def group_sparsity_of(weight: torch.Tensor) -> float:
    return float(zero_groups(weight.detach(), "in_channel").float().mean())


def test_float64_takes_the_reference_path():
    state = State(["conv3x3", "bias"], "in_channel", torch.float64, DEVICE)
    state.new_grads()
    expected = [[t.clone() for t in ts] for ts in state.tensors()]
    kwargs = hyper("group_weighted", "in_channel")
    triton_backend.group_prox_adam(*state.tensors(), **kwargs)
    reference.group_prox_adam(*expected, **kwargs)
    for a, b in zip(state.params, expected[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_torch_compile_sees_one_custom_op():
    state = State(["conv3x3", "bias"], "in_channel", torch.float32, DEVICE)
    state.new_grads()
    expected = State(["conv3x3", "bias"], "in_channel", torch.float32, DEVICE)
    expected.grads = [g.clone() for g in state.grads]
    kwargs = hyper("group", "in_channel")

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(params, grads, exp_avgs, exp_avg_sqs, steps):
        triton_backend.group_prox_adam(params, grads, exp_avgs, exp_avg_sqs, steps, **kwargs)

    step(*state.tensors())
    triton_backend.group_prox_adam(*expected.tensors(), **kwargs)
    for a, b in zip(state.params, expected.params):
        assert torch.equal(a, b)


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
        state.steps = [s.to(DEVICE) for s in state.steps]
        masks = run_steps(triton_backend.group_prox_adam, state, **hyper(prox, grouping))
        assert_some_groups_zero_and_some_not(masks)


def run_steady_state_without_sync(backend: str, prox: str, shapes: list[tuple[int, ...]], device: torch.device) -> None:
    """``FusedGroupProxAdam(backend=backend).step`` after the first step, with fresh gradients
    each step and a GradScaler-style ``grad_scale``/``found_inf``: no host sync (torch raises on one)."""
    from lomt_kernels import FusedGroupProxAdam

    params = [torch.nn.Parameter(torch.randn(shape, device=device)) for shape in shapes]
    opt = FusedGroupProxAdam(params, lr=torch.tensor(1e-3, device=device), lambda_=1e-3, prox=prox, backend=backend)
    opt.grad_scale = torch.tensor(4.0, device=device)
    opt.found_inf = torch.tensor(0.0, device=device)
    for step in range(4):
        opt.zero_grad(set_to_none=True)
        for p in params:
            p.grad = torch.randn_like(p)
        if step > 0:
            torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert all(float(opt.state[p]["step"]) == 4 for p in params)


@cuda_only
@pytest.mark.parametrize("prox", PROXES)
def test_steady_state_step_never_syncs(prox):
    run_steady_state_without_sync("triton", prox, [(64, 32, 3, 3), (256, 64, 1, 1), (64,), (10, 64)], DEVICE)


def run_ten_repeats(step_fn: Callable[..., None], prox: str, shapes: list[tuple[int, ...]], device: torch.device) -> None:
    """One step (counted by the kernel) from one state ten times: the same bits each time (a race
    between blocks, or float atomics, would show as differences)."""
    results = []
    for _ in range(10):
        state = State([(shape, "contiguous") for shape in shapes], "in_channel", torch.float32, device, seed=1)
        state.steps = [s.to(device) for s in state.steps]
        state.new_grads()
        step_fn(*state.tensors(), **hyper(prox, "in_channel"), increment_steps=True)
        results.append(torch.cat([p.flatten() for p in state.params]))
    assert all(torch.equal(results[0], r) for r in results[1:])


@cuda_only
@pytest.mark.parametrize("prox", ["group", "group_weighted"])
def test_ten_repeats_at_real_sizes_are_bit_identical(prox):
    """The ResNet-50 conv shapes (:func:`run_ten_repeats`)."""
    run_ten_repeats(triton_backend.group_prox_adam, prox, sorted(set(resnet50_conv_shapes())), DEVICE)


def run_resnet50_shapes(step_fn: Callable[..., None], prox: str, device: torch.device) -> None:
    """:func:`run_steps` on each distinct conv weight shape of the benchmarks' dilated ResNet-50,
    in one call: slabs of up to 128 items and groups of up to 4,608 elements, which the small
    shapes of the other tests reach only with patched plan constants."""
    shapes = sorted(set(resnet50_conv_shapes()))
    state = State([(shape, "contiguous") for shape in shapes], "in_channel", torch.float32, device)
    state.steps = [s.to(device) for s in state.steps]
    assert_some_groups_zero_and_some_not(run_steps(step_fn, state, **hyper(prox, "in_channel")))


@cuda_only
@pytest.mark.parametrize("prox", ["group", "group_weighted"])
def test_resnet50_conv_shapes(prox):
    run_resnet50_shapes(triton_backend.group_prox_adam, prox, DEVICE)


@cuda_only
@pytest.mark.parametrize("prox", ["group", "group_weighted"])
def test_cuda_graph_capture(prox):
    """One step captured in a CUDA graph (the kernel bumps the step counts), then replayed with
    new gradients and a new lr written into the same tensors."""
    names = ["conv3x3", "conv1x1", "linear", "bias"]
    state = State(names, "in_channel", torch.float32, DEVICE)
    state.steps = [s.to(DEVICE) for s in state.steps]
    state.new_grads()
    lr = torch.tensor(HYPER["lr"], device=DEVICE)
    kwargs = hyper(prox, "in_channel", lr=lr, capturable=True)

    def step(params, grads, exp_avgs, exp_avg_sqs, steps, **kwargs):
        triton_backend.group_prox_adam(params, grads, exp_avgs, exp_avg_sqs, steps, increment_steps=True, **kwargs)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        check_step(step, state, **kwargs)  # warm-up: compiles and builds the launch plan
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(*state.tensors(), **kwargs)
    for i in range(STEPS):
        fresh = State(names, "in_channel", torch.float32, DEVICE, seed=i + 1)
        fresh.new_grads()
        for g, new in zip(state.grads, fresh.grads):
            g.copy_(new)
        lr.fill_(HYPER["lr"] * (1 + i))
        check_step(lambda *args, **_: graph.replay(), state, **kwargs)
