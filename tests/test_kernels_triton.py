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

import os
import subprocess
import sys
from typing import Callable

import pytest
import torch

from benchmarks.params import resnet50_conv_shapes
from lomt_kernels import reference
from lomt_kernels.grouping import as_groups, group_dim, group_layout

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton_backend = pytest.importorskip("lomt_kernels.kernels.triton_group_adam")

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
    """One-pass tiles (for the group proxes), and the elementwise path of l1 and none."""
    run_nonfinite(triton_backend.group_prox_adam, ["conv3x3", "linear"], prox, case, DEVICE)


@pytest.mark.parametrize("case", NONFINITE_CASES)
@pytest.mark.parametrize("prox", ["group", "group_weighted"])
def test_nonfinite_values_match_reference_in_two_phases(monkeypatch, prox, case):
    """The two-phase path (tiles as in test_two_phase_path): sums added across chunks, the
    weighted prox's solve kernel, and the shrink kernel."""
    monkeypatch.setattr(triton_backend, "ON_CHIP_MAX_TILE", 16)
    monkeypatch.setattr(triton_backend, "TWO_PHASE_TILE", 8)
    layout = group_layout(torch.empty(SHAPES["conv3x3"][0]), "in_channel")
    assert not triton_backend.plan_tiles(layout, prox, 4).one_pass
    run_nonfinite(triton_backend.group_prox_adam, ["conv3x3", "linear"], prox, case, DEVICE)


@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("prox", ["group", "group_weighted"])
def test_two_phase_path(monkeypatch, prox, grouping):
    """Groups too large for one tile: Adam + z + partial sums, then the (solve and) shrink."""
    monkeypatch.setattr(triton_backend, "ON_CHIP_MAX_TILE", 16)
    monkeypatch.setattr(triton_backend, "TWO_PHASE_TILE", 8)
    layout = group_layout(torch.empty(SHAPES["conv3x3"][0]), grouping)
    assert not triton_backend.plan_tiles(layout, prox, 4).one_pass
    state = State(["conv3x3", "conv1x1", "linear", "conv3x3_channels_last"], grouping, torch.float32, DEVICE)
    masks = run_steps(triton_backend.group_prox_adam, state, **hyper(prox, grouping))
    assert_some_groups_zero_and_some_not(masks)


@pytest.mark.parametrize("prox", ["group", "group_weighted"])
def test_short_rows_take_two_phases_for_the_group_prox(monkeypatch, prox):
    """A tall 1x1 conv whose one-pass tile would hold few groups, so short rows: the group prox
    takes two phases with line-long rows instead; the weighted prox keeps its one pass. A
    conv1x1 beside it keeps its one pass in the same call."""
    monkeypatch.setattr(triton_backend, "ON_CHIP_MAX_TILE", 64)
    monkeypatch.setattr(triton_backend, "TARGET_TILE", 64)
    shape = (16, 40, 1, 1)
    plan = triton_backend.plan_tiles(group_layout(torch.empty(shape), "in_channel"), prox, 4)
    if prox == "group":
        assert not plan.one_pass and plan.block_g * 4 == triton_backend.LINE_BYTES
    else:
        assert plan.one_pass and plan.block_g * 4 < triton_backend.LINE_BYTES
    state = State([(shape, "contiguous"), "conv1x1"], "in_channel", torch.float32, DEVICE)
    assert_some_groups_zero_and_some_not(run_steps(triton_backend.group_prox_adam, state, **hyper(prox, "in_channel")))


def test_group_prox_tiles_read_long_rows_at_resnet50_sizes():
    """Every group-prox tile of the ResNet-50 convs reads rows of ``LINE_BYTES`` or more (or
    whole rows), in one pass or two."""
    for shape in resnet50_conv_shapes():
        A, B, K = layout = group_layout(torch.empty(shape, device="meta"), "in_channel")
        plan = triton_backend.plan_tiles(layout, "group", 4)
        assert min(plan.block_g, B) * K * 4 >= min(triton_backend.LINE_BYTES, B * K * 4), (shape, plan)


def test_capturable_matches_host_scalars():
    """``capturable=True`` (lr and steps read on the device) gives the same bits."""
    kwargs = hyper("group_weighted", "in_channel", weight_decay=0.1, decoupled_weight_decay=True)
    names = ["conv3x3", "linear", "bias"]
    host, on_device = (State(names, "in_channel", torch.float32, DEVICE) for _ in range(2))
    on_device.steps = [s.to(DEVICE) for s in on_device.steps]
    for state in (host, on_device):
        state.steps[1] += 5  # per-tensor steps differ
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


def test_one_launch_per_tile_plan(monkeypatch):
    """Ten same-shaped weights and their biases: two launches (one per tile plan), not twenty."""
    launches = []
    launch = triton_backend._launch

    def counting_launch(bucket, works, *args, **kwargs):
        launches.append(len(works))
        launch(bucket, works, *args, **kwargs)

    monkeypatch.setattr(triton_backend, "_launch", counting_launch)
    state = State(["conv3x3", "bias"] * 10, "in_channel", torch.float32, DEVICE)
    run_steps(triton_backend.group_prox_adam, state, steps=1, **hyper("group", "in_channel"))
    assert sorted(launches) == [10, 10]


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


def test_kernels_compile_for_gpus():
    """The real compiler (stricter than the interpreter) builds every variant for sm_80 and sm_90."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    builds = [
        subprocess.Popen(
            [sys.executable, "-m", triton_backend.__name__, "--compile-only", "--arch", arch],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for arch in ("80", "90")
    ]
    for build in builds:
        out, err = build.communicate(timeout=300)
        assert build.returncode == 0, err[-3000:]
        assert "compiled" in out


@cuda_only
@pytest.mark.parametrize("prox", ["group", "group_weighted"])
def test_cuda_two_phase_at_real_sizes(prox):
    """Groups bigger than ON_CHIP_MAX_TILE without patching: a tall Linear grouped by input
    (strided, K = 1) and a wide one grouped by output (contiguous rows)."""
    for grouping, shape in (("in_channel", (6000, 24)), ("out_channel", (12, 6000))):
        layout = group_layout(torch.empty(shape), grouping)
        assert not triton_backend.plan_tiles(layout, prox, 4).one_pass
        state = State([(shape, "contiguous")], grouping, torch.float32, DEVICE)
        masks = run_steps(triton_backend.group_prox_adam, state, **hyper(prox, grouping))
        assert_some_groups_zero_and_some_not(masks)


def run_resnet50_shapes(step_fn: Callable[..., None], prox: str, device: torch.device) -> None:
    """:func:`run_steps` on each distinct conv weight shape of the benchmarks' dilated ResNet-50,
    in one call: the tile plans and launch configurations of real sizes, which the small
    shapes of the other tests never reach (groups of up to 4,608 elements, 2,048-row tiles)."""
    shapes = sorted(set(resnet50_conv_shapes()))
    state = State([(shape, "contiguous") for shape in shapes], "in_channel", torch.float32, device)
    assert_some_groups_zero_and_some_not(run_steps(step_fn, state, **hyper(prox, "in_channel")))


@cuda_only
@pytest.mark.parametrize("prox", ["group", "group_weighted"])
def test_resnet50_conv_shapes(prox):
    run_resnet50_shapes(triton_backend.group_prox_adam, prox, DEVICE)


@cuda_only
@pytest.mark.parametrize("prox", ["group", "group_weighted"])
def test_cuda_graph_capture(prox):
    """``capturable=True``: one step captured in a CUDA graph (with the step increment), then
    replayed with new gradients and a new lr written into the same tensors."""
    names = ["conv3x3", "conv1x1", "linear", "bias"]
    state = State(names, "in_channel", torch.float32, DEVICE)
    state.steps = [s.to(DEVICE) for s in state.steps]
    state.new_grads()
    lr = torch.tensor(HYPER["lr"], device=DEVICE)
    kwargs = hyper(prox, "in_channel", lr=lr, capturable=True)

    def step(params, grads, exp_avgs, exp_avg_sqs, steps, **kwargs):
        torch._foreach_add_(steps, 1)
        triton_backend.group_prox_adam(params, grads, exp_avgs, exp_avg_sqs, steps, **kwargs)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        check_step(step, state, **kwargs)  # warm-up: compiles and builds the pointer tables
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
