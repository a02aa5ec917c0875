r"""The shared parity setup: backend rows, problem builders, tolerances and the step check.

In the manner of torch's ``OptimizerInfo`` (``torch/testing/_internal/common_optimizers.py``):
every backend is a row of :data:`BACKENDS`, and ``tests/test_parity.py`` runs each row through
the same problems; the backend-specific test files build their problems with the same helpers.

**How results are compared.** Each step starts the backend and the float64 reference from the
*same* state (the backend's, widened to float64), so the comparison measures one step's rounding
and never a drift between two trajectories; the state then evolves through several steps, so the
moments and the step counts (which the backend increments, :mod:`lomt_kernels.contract`) are
checked too.

**Tolerances** (per tensor, ``|actual - expected| <= atol_scale * max|expected| + rtol * |expected|``,
:data:`TOLERANCES`):

* float64 (the C++ kernel's own arithmetic, and the fused kernels' reference path): the same
  maths in the same precision, differing only by rounding order (sums over groups, fused
  multiply-adds), ~1e-16 relative per operation; the Adam division and a shrink close to its
  threshold amplify that by at most ~1e4: ``rtol = 1e-10``, ``atol_scale = 1e-12``.
* float32: ``rtol = atol_scale = 2**-18`` (64 half-ulps of float32, about 3.8e-6). The step
  rounds about ten times along any dependency chain (bias-corrected ``d``, ``m/d``,
  ``p - s m/d``, the group norm's tree sum, the shrink factor), and ``p - s m/d`` may cancel,
  so the error is a few half-ulps of the *operands*, which ``atol_scale * max|expected|`` covers
  for elements near zero. The weighted prox stops Newton at ``1 - phi <= 1e-6``; since phi is
  concave and increasing from below, that moves ``x_j`` by at most ``(1 - phi) |z_j|`` (about
  ``1e-6 max|z|``), inside the same bound. Observed errors are 2-3 half-ulps.
* bfloat16 and float16: the backend computes in float32 and rounds once; the reference is
  rounded once from float64, so the two differ by at most one ulp of the stored value,
  ``rtol = 2**-7`` for bfloat16 (``2**-10`` for float16), plus the float32 ``atol_scale`` for
  elements that cancel to near zero.
* Which groups are exactly zero must match exactly; the data spread the group norms over two
  decades around the threshold so that some groups are zeroed and some are not.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import pytest
import torch
from torch import Tensor

from lomt_kernels import backends, reference
from lomt_kernels.contract import AdamHyper, Backend, Prox, StepTensors
from lomt_kernels.grouping import as_groups, group_dim

#: Every prox by name, for ``parametrize`` (plain strings: they go into optimizer state dicts).
PROX_NAMES = tuple(p.value for p in Prox)
#: Steps of each checked run.
STEPS = 3


class Tolerance(NamedTuple):
    """``|actual - expected| <= atol + atol_scale * max|expected| + rtol * |expected|`` (see the
    module docstring)."""

    rtol: float
    atol_scale: float
    atol: float = 0.0


ATOL_SCALE = 2.0**-18
TOLERANCES = {
    torch.float64: Tolerance(1e-10, 1e-12),
    torch.float32: Tolerance(2.0**-18, ATOL_SCALE),
    torch.bfloat16: Tolerance(2.0**-7, ATOL_SCALE),
    torch.float16: Tolerance(2.0**-10, ATOL_SCALE),
}

#: The tensors of the parity problems, by name: shape and memory format. Groups of K = 1, 9 and
#: 49 elements per row, ragged A and B (prime sizes), a bias, an empty tensor, a channels-last
#: conv and a transposed 2-D weight (no group layout: the fused kernels work on a copy). The 3x3
#: conv's 20 input channels take both of the C++ kernel's ways to sum 3x3 groups (16 in
#: registers, in one chunk of 16 with AVX-512 or two of 8 with AVX2, and 4 through per-lane sums).
SHAPES: dict[str, tuple[tuple[int, ...], str]] = {
    "conv3x3": ((6, 20, 3, 3), "contiguous"),
    "conv1x1": ((8, 16, 1, 1), "contiguous"),
    "conv7x7_ragged": ((3, 7, 7, 7), "contiguous"),
    "linear": ((7, 5), "contiguous"),
    "linear_ragged": ((13, 37), "contiguous"),
    "bias": ((6,), "contiguous"),
    "empty": ((0, 5), "contiguous"),
    "conv3x3_channels_last": ((6, 5, 3, 3), "channels_last"),
    "linear_transposed": ((9, 14), "transposed"),
}
#: ``lr`` of the parity problems. With lr * lambda_ = 0.5 the group prox zeroes a group whose
#: elements' rms is below 0.5 and takes 0.5 off the rms of the others, each step; the data put
#: the groups' rms between 0.1 and 10, so some are zeroed and some stay for all steps. The
#: weighted prox measures groups in Adam's metric, where these data's norms are about twice as
#: large: it takes twice the lambda_ for the same split.
LR = 0.05
LAMBDA = {"none": 10.0, "group": 10.0, "group_weighted": 20.0, "l1": 10.0}


def hyper(prox: str, grouping: str, **overrides: object) -> AdamHyper:
    """The parity problems' hyperparameters for ``prox`` and ``grouping``, with ``overrides``."""
    fields = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, lambda_=LAMBDA[prox])
    return AdamHyper(**{**fields, "prox": prox, "grouping": grouping, **overrides})


class State:
    """Params, grads, moments and step counts for tensors named in :data:`SHAPES` (or given as
    ``(shape, memory format)``), generated from a seed: a warm Adam state at step 10."""

    def __init__(
        self, tensors: list[str | tuple[tuple[int, ...], str]], grouping: str, dtype: torch.dtype,
        device: torch.device, seed: int = 0,
    ) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.grouping = grouping
        self.names = [t if isinstance(t, str) else f"{t[0]} {t[1]}" for t in tensors]
        self.layouts = [SHAPES[t] if isinstance(t, str) else t for t in tensors]
        # Group norms spread over two decades around the threshold.
        self.params = [self._tensor(shape, fmt, dtype, device, spread=True) for shape, fmt in self.layouts]
        self.exp_avgs = [0.1 * self._tensor(shape, fmt, dtype, device) for shape, fmt in self.layouts]
        # v over six decades, as Adam's second moments are: d = sqrt(v) spans three.
        self.exp_avg_sqs = [
            (10 ** (6 * self._tensor(shape, fmt, torch.float64, device).abs().clamp(max=1) - 6)).to(dtype)
            for shape, fmt in self.layouts
        ]
        # One-element float32 counts on the params' device, as FusedGroupProxAdam keeps them.
        self.steps = [torch.tensor(10.0, device=device) for _ in self.layouts]
        self.grads: list[Tensor] = []

    def _tensor(self, shape, fmt, dtype, device, spread: bool = False) -> Tensor:  # noqa: ANN001
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
        """Fresh gradients, with the params' strides except a transposed param's, whose grads are
        contiguous: every backend also sees grads whose strides differ from their param's."""
        self.grads = [
            self._tensor(shape, "contiguous" if fmt == "transposed" else fmt, p.dtype, p.device)
            for (shape, fmt), p in zip(self.layouts, self.params)
        ]

    def tensors(self, grad_scale: Tensor | None = None, found_inf: Tensor | None = None) -> StepTensors:
        """The step's tensors (the lists are this state's own: a step updates it)."""
        return StepTensors(self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.steps, grad_scale, found_inf)

    def clone(self) -> State:
        """An independent copy (same layouts, same values)."""
        other = object.__new__(State)
        other.__dict__.update(self.__dict__)
        for name in ("params", "grads", "exp_avgs", "exp_avg_sqs", "steps"):
            setattr(other, name, [t.clone() for t in getattr(self, name)])
        return other


def zero_groups(t: Tensor, grouping: str) -> Tensor:
    """Which groups of ``t`` are exactly zero."""
    return (as_groups(t, grouping) == 0).all(dim=1)


def assert_close(actual: Tensor, expected: Tensor, tolerance: Tolerance, name: str) -> None:
    """``actual`` against the float64 ``expected`` (rounded to ``actual``'s dtype first), within
    ``tolerance`` (its scale from the finite elements), with a NaN or inf exactly where
    ``expected`` has one, and the same strides."""
    assert actual.stride() == expected.stride() or actual.numel() == 0, f"{name}: strides differ"
    finite = expected[expected.isfinite()]
    atol = tolerance.atol + (tolerance.atol_scale * float(finite.abs().max()) if finite.numel() else 0.0)
    torch.testing.assert_close(
        actual.double(), expected.to(actual.dtype).double(), rtol=tolerance.rtol, atol=atol,
        equal_nan=True, msg=lambda message: f"{name}: {message}",
    )


def assert_all_close(actual: tuple[list[Tensor], ...], expected: tuple[list[Tensor], ...], tolerance: Tolerance) -> None:
    """:func:`assert_close` for every tensor of two :func:`run_trajectory` results."""
    for name, a_list, e_list in zip(("p", "exp_avg", "exp_avg_sq"), actual, expected):
        for i, (a, e) in enumerate(zip(a_list, e_list)):
            assert_close(a, e, tolerance, f"tensor {i} {tuple(a.shape)} {name}")


#: A backend's step, or anything called like it (a CUDA graph's replay, a broken wrapper).
StepFn = Callable[[StepTensors, AdamHyper, "float | Tensor"], None]


def check_step(step: StepFn, state: State, hyper: AdamHyper, lr: float | Tensor = LR,
               grad_scale: Tensor | None = None) -> list[Tensor | None]:
    """One step of ``step`` against the float64 reference from the same state; returns, per
    tensor, the mask of its exactly-zero groups (``None`` for tensors without a group prox).

    ``state.steps`` hold the counts before the step; both sides add one.
    """
    wide = [[t.to("cpu", torch.float64) for t in ts] for ts in (state.params, state.grads, state.exp_avgs, state.exp_avg_sqs)]
    expected = StepTensors(*wide, [s.cpu().clone() for s in state.steps],
                           None if grad_scale is None else grad_scale.to("cpu", torch.float64))
    step(state.tensors(grad_scale), hyper, lr)
    reference.step(expected, hyper, float(lr))
    assert [float(s) for s in state.steps] == [float(s) for s in expected.state_steps], "step counts"
    masks = []
    for i, (p, m, v) in enumerate(zip(state.params, state.exp_avgs, state.exp_avg_sqs)):
        tolerance = TOLERANCES[p.dtype]
        for name, actual, want in zip("pmv", (p, m, v), (expected.params[i], expected.exp_avgs[i], expected.exp_avg_sqs[i])):
            assert_close(actual.cpu(), want, tolerance, f"{state.names[i]} {tuple(p.shape)} {name}")
        if p.dim() >= 2 and p.numel() > 0 and hyper.prox.grouped:
            mask = zero_groups(p.cpu(), hyper.grouping)
            expected_mask = zero_groups(expected.params[i], hyper.grouping)
            assert torch.equal(mask, expected_mask), f"{state.names[i]}: zero groups {mask} != {expected_mask}"
            masks.append(mask)
        else:
            masks.append(None)
    return masks


def run_steps(step: StepFn, state: State, hyper: AdamHyper, lr: float | Tensor = LR, steps: int = STEPS,
              grad_scale: Tensor | None = None) -> list[list[Tensor | None]]:
    """``steps`` checked steps with fresh gradients; the zero-group masks of each."""
    masks = []
    for _ in range(steps):
        state.new_grads()
        masks.append(check_step(step, state, hyper, lr, grad_scale))
    return masks


def check_found_inf(step: StepFn, found: float, device: torch.device,
                    names: list[str | tuple[tuple[int, ...], str]] | None = None) -> None:
    """GradScaler's ``found_inf``: a nonzero one leaves params, moments and step counts as they
    were; zero changes nothing in the step (the same bits as a step without it)."""
    names = names or ["conv3x3", "bias", "conv1x1"]
    state = State(names, "in_channel", torch.float32, device)
    state.new_grads()
    before = state.clone()
    h = hyper("group_weighted", "in_channel")
    step(state.tensors(found_inf=torch.tensor(found, device=device)), h, LR)
    tensors, old = state.tensors().lists(), before.tensors().lists()
    assert all(torch.equal(a, b) for ts, bs in zip(tensors, old) for a, b in zip(ts, bs)) == bool(found)
    if not found:
        step(before.tensors(), h, LR)
        for ours, theirs in zip(tensors, before.tensors().lists()):
            assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
        assert [float(s) for s in state.steps] == [11.0] * len(names)


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


def run_ten_repeats(step: StepFn, prox: str, layouts: list[tuple[tuple[int, ...], str]], device: torch.device) -> None:
    """One step from one state ten times: the same bits each time (a race between blocks or
    items, or float atomics, would show as differences)."""
    results = []
    for _ in range(10):
        state = State(layouts, "in_channel", torch.float32, device, seed=1)
        state.new_grads()
        step(state.tensors(), hyper(prox, "in_channel"), LR)
        results.append(torch.cat([p.flatten() for p in state.params]))
    assert all(torch.equal(results[0], r) for r in results[1:])


def run_graph_capture(step: StepFn, prox: str, device: torch.device) -> None:
    """One step captured in a CUDA graph (the kernels bump the step counts), then replayed with
    new gradients and a new lr written into the same tensors, each replay checked."""
    names = ["conv3x3", "conv1x1", "linear", "bias"]
    state = State(names, "in_channel", torch.float32, device)
    state.new_grads()
    lr = torch.tensor(LR, device=device)
    h = hyper(prox, "in_channel")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        check_step(step, state, h, lr)  # warm-up: compiles and builds the launch plan
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(state.tensors(), h, lr)
    for i in range(STEPS):
        fresh = State(names, "in_channel", torch.float32, device, seed=i + 1)
        fresh.new_grads()
        for g, new in zip(state.grads, fresh.grads):
            g.copy_(new)
        lr.fill_(LR * (1 + i))
        check_step(lambda *_: graph.replay(), state, h, lr)


def assert_some_groups_zero_and_some_not(masks: list[list[Tensor | None]]) -> None:
    """In every step, every tensor with a group prox has zero groups and live ones."""
    for step_masks in masks:
        grouped = [m for m in step_masks if m is not None]
        assert grouped
        for mask in grouped:
            assert mask.any() and not mask.all(), f"want zero groups and live ones, got {mask.tolist()}"


#: The switches of the step, each against the reference (``grad_scale`` becomes a 0-d tensor;
#: ``lr`` replaces :data:`LR`).
OPTIONS = {
    "coupled_decay": {"weight_decay": 0.1},
    "decoupled_decay_maximize": {"weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True},
    "grad_scale": {"grad_scale": 8.0},
    "lambda_zero": {"lambda_": 0.0},
    "lr_zero": {"lr": 0.0},  # tau = 0: every prox is the identity
    # tau ~ 1e-16: the prox is nearly the identity; the weighted prox's sums at theta = 0 would
    # overflow float32, so its first Newton step is taken in closed form.
    "tiny_lambda": {"lambda_": 1e-15},
    "small_beta1_eps_zero": {"beta1": 0.3, "eps": 0.0},  # lerp weight 0.7 >= 0.5: torch.lerp's other formula
    # The first steps from zero moments, where the bias corrections are largest.
    "cold_start": {"cold": True, "weight_decay": 0.01},
}


def run_options(step: StepFn, prox: str, options: dict, device: torch.device) -> None:
    """:func:`run_steps` with ``options`` on a conv, a channels-last conv and a bias."""
    options = dict(options)
    lr = options.pop("lr", LR)
    scale = options.pop("grad_scale", None)
    grad_scale = None if scale is None else torch.tensor(scale, device=device)
    cold = options.pop("cold", False)
    state = State(["conv3x3", "conv3x3_channels_last", "bias"], "in_channel", torch.float32, device)
    if cold:
        for t in (*state.exp_avgs, *state.exp_avg_sqs, *state.steps):
            t.zero_()
    before = [p.clone() for p in state.params]
    run_steps(step, state, hyper(prox, "in_channel", **options), lr, grad_scale=grad_scale)
    if lr == 0.0:
        assert all(torch.equal(a, b) for a, b in zip(state.params, before))


#: Ways group 2 of a tensor becomes non-finite (see :func:`run_nonfinite`).
NONFINITE_CASES = ("nan_grad", "inf_grad", "inf_param", "zero_grads_eps0")


def run_nonfinite(step: StepFn, tensors: list, prox: str, case: str, dtype: torch.dtype,
                  device: torch.device, grouping: str = "in_channel") -> None:
    """:func:`run_steps` with group 2 of the first tensor made non-finite as ``case`` says: a NaN
    or inf gradient element, or an inf param element, in the first step (the NaN stays in the
    moments); or zero gradients and moments with eps = 0 (Adam's z is 0/0). Each step matches
    the reference (NaN and inf included), which passes such a group through as plain Adam leaves
    it (reference.py): so it has NaNs (or infs) and, under a group prox, no exact zeros, while
    the other groups are still zeroed or kept by the prox."""
    state = State(tensors, grouping, dtype, device)
    h = hyper(prox, grouping, eps=0.0) if case == "zero_grads_eps0" else hyper(prox, grouping)
    gdim = group_dim(grouping)
    group = (slice(None),) * gdim + (2,)
    element = tuple(2 if d == gdim else 1 for d in range(state.params[0].dim()))
    if case == "inf_param":
        state.params[0][element] = float("inf")
    elif case == "zero_grads_eps0":
        state.exp_avgs[0][group] = 0.0
        state.exp_avg_sqs[0][group] = 0.0
    masks = []
    for i in range(STEPS):
        state.new_grads()
        if case == "zero_grads_eps0":
            state.grads[0][group] = 0.0
        elif i == 0 and case in ("nan_grad", "inf_grad"):
            state.grads[0][element] = float("nan" if case == "nan_grad" else "inf")
        masks.append(check_step(step, state, h))
    poisoned = state.params[0][group]
    assert not poisoned.isfinite().all()
    if Prox(prox).grouped:
        assert (poisoned != 0).all()
        assert_some_groups_zero_and_some_not(masks)


#: A float32 run of several steps against a float64 run from the same start: float32 rounds each
#: of the ~15 operations of a step to 2^-24 (6e-8) relative, so p, m and v drift from float64 by
#: a few 1e-7 relative per step (2.5e-7 after 7 steps measured on the C++ kernel). The shrink's
#: error is absolute (|z| tau/||z|| times the norm's 1e-7 relative error), hence the atol on the
#: tensor's scale; the weighted prox also stops Newton at 1 - phi <= 1e-6 rather than 1e-12,
#: which moves x by at most 1e-6 relative.
TRAJECTORY_FLOAT32 = Tolerance(5e-6, 5e-6)


def run_trajectory(step: StepFn, params: list[Tensor], grads: list[list[Tensor]], hyper: AdamHyper,
                   lr: float, state: tuple[list[Tensor], ...] | None = None) -> tuple[list[Tensor], ...]:
    """``len(grads)`` steps of ``step`` from ``params`` (cloned) and zero state (or ``state``:
    moments and counts, cloned): a trajectory, for checks a single step cannot make (the first
    steps' bias corrections, drift). Returns the final params, ``exp_avg``s and ``exp_avg_sq``s."""
    params = [p.clone() for p in params]  # clone() keeps the layout
    if state is None:
        state = ([torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params],
                 [torch.tensor(0.0) for _ in params])
    exp_avgs, exp_avg_sqs, steps = ([t.clone() for t in ts] for ts in state)
    for step_grads in grads:
        step(StepTensors(params, step_grads, exp_avgs, exp_avg_sqs, steps), hyper, lr)
    return params, exp_avgs, exp_avg_sqs


def resnet50_shapes() -> list[tuple[tuple[int, ...], str]]:
    """Each distinct conv weight shape of the benchmarks' dilated ResNet-50: slabs of up to 128
    Triton items and groups of up to 4,608 elements."""
    from benchmarks.params import resnet50_conv_shapes

    return [(shape, "contiguous") for shape in sorted(set(resnet50_conv_shapes()))]


# --------------------------------------------------------------------------- the backend rows


_ALL_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


@dataclasses.dataclass(frozen=True)
class BackendInfo:
    """One row of the parity suite: a backend, the device it steps and the param dtypes it takes."""

    name: str
    device: torch.device
    dtypes: tuple[torch.dtype, ...] = _ALL_DTYPES

    def backend(self) -> Backend:
        """The backend module; skips the test (with the reason) where it cannot run here."""
        reason = backends.unavailable_reason(self.name, self.device)
        if reason is not None:
            pytest.skip(f"backend {self.name!r} cannot run on {self.device}: {reason}")
        return backends.load(self.name)


#: Without a GPU, Triton runs in its interpreter on CPU tensors (``tests/conftest.py`` sets
#: ``TRITON_INTERPRET``); the CUDA row then skips.
_GPU = torch.device("cuda") if torch.cuda.is_available() else None
BACKENDS = (
    # The reference itself in float32 and 16-bit: its own rounding against its float64 run.
    BackendInfo("torch", torch.device("cpu"), (torch.float32, torch.bfloat16, torch.float16)),
    BackendInfo("cpu", torch.device("cpu")),
    # In the interpreter float16, which takes bfloat16's 16-bit path, is left to the multi-item
    # tests of tests/test_kernels_triton.py: the interpreter's time is the suite's largest cost.
    BackendInfo("triton", _GPU or torch.device("cpu"), _ALL_DTYPES if _GPU else _ALL_DTYPES[:3]),
    BackendInfo("cuda", _GPU or torch.device("cuda")),
)


def backend_row(name: str) -> BackendInfo:
    """The row of backend ``name``."""
    return next(info for info in BACKENDS if info.name == name)


def rows_and_dtypes(dtypes: tuple[torch.dtype, ...] | None = None) -> list:
    """``pytest.param(info, dtype)`` for every row and each of its dtypes (those in ``dtypes``)."""
    return [
        pytest.param(info, dtype, id=f"{info.name}-{str(dtype).removeprefix('torch.')}")
        for info in BACKENDS for dtype in info.dtypes if dtypes is None or dtype in dtypes
    ]
