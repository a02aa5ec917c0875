"""The ``"cpu"`` backend (``csrc/group_prox_adam_cpu.cpp``) against the float64 reference.

Every test steps the same problem with :func:`lomt_kernels.reference.group_prox_adam` in
float64 and with the fused kernel, from identical inputs (lower-precision inputs are upcast for
the reference, so the only difference is the kernel's arithmetic). The first test to run builds
the extension (about a minute, once per machine).
"""

from __future__ import annotations

import copy
import importlib.machinery
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from lomt_kernels import FusedGroupProxAdam, reference
from lomt_kernels.grouping import GROUPINGS, PROXES, as_groups, from_groups, group_dim, is_grouped
from lomt_kernels.kernels import cpu
from lomt_kernels.kernels._extension import ExtensionUnavailable, load_extension

STEPS = 7
HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, decoupled_weight_decay=False, maximize=False)
#: With these the 7 steps zero some groups (elements, for l1) of every grouped tensor and keep
#: others (asserted in each test); "none" must ignore its lambda_.
LAMBDAS = {"none": 8.0, "group": 8.0, "group_weighted": 1.0, "l1": 3.0}
#: (name, shape): a 3x3 and a 1x1 conv, a Linear weight, a bias, an empty tensor, a channels-last
#: conv and a transposed (non-contiguous) 2-D weight. The 3x3 conv's 20 input channels take both
#: of the kernel's ways to sum 3x3 groups in pass 1 (16 in registers, in one chunk of 16 groups
#: with AVX-512 or two of 8 with AVX2, and 4 through per-lane sums).
SHAPES = (
    ("conv3x3", (16, 20, 3, 3)),
    ("conv1x1", (24, 16, 1, 1)),
    ("linear", (10, 24)),
    ("bias", (10,)),
    ("empty", (0, 5)),
    ("conv_channels_last", (12, 8, 3, 3)),
    ("transposed", (9, 14)),
)


@pytest.fixture(scope="module", autouse=True)
def extension() -> None:
    reason = cpu.unavailable_reason(torch.device("cpu"))
    if reason is not None:
        pytest.fail(f"the cpu extension must build on the test machine: {reason}")


def make_problem(seed: int = 0) -> tuple[list[Tensor], list[list[Tensor]]]:
    """float64 params in the layouts of :data:`SHAPES`, and ``STEPS`` steps of gradients.

    Weights are ``randn`` times a scale in ``[0.05, 1]`` (log-uniform) per input and per output
    channel, so group norms spread over two decades and ``LAMBDAS`` zero only some groups.
    Gradients are contiguous even for the channels-last and transposed params, so the kernel
    also sees grads whose strides differ from their param's.
    """
    gen = torch.Generator().manual_seed(seed)
    params = []
    for name, shape in SHAPES:
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        for dim in range(min(2, len(shape)) if x.numel() and len(shape) >= 2 else 0):
            scale = torch.empty(shape[dim], dtype=torch.float64).uniform_(math.log(0.05), 0.0, generator=gen).exp()
            x = x * scale.view([-1 if d == dim else 1 for d in range(len(shape))])
        if name == "conv_channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        elif name == "transposed":
            x = x.t().contiguous().t()
        params.append(x)
    grads = [
        [0.1 * torch.randn(shape, generator=gen, dtype=torch.float64) for _, shape in SHAPES]
        for _ in range(STEPS)
    ]
    return params, grads


def run(step_fn, params: list[Tensor], grads: list[list[Tensor]], *, state=None, **kwargs) -> tuple[list[Tensor], ...]:
    """``len(grads)`` steps of ``step_fn`` from ``params`` (cloned) and zero (or given) state.

    Returns the final params, ``exp_avg``s and ``exp_avg_sq``s.
    """
    params = [p.clone() for p in params]  # clone() keeps the layout
    if state is None:
        exp_avgs = [torch.zeros_like(p) for p in params]
        exp_avg_sqs = [torch.zeros_like(p) for p in params]
        steps = [torch.tensor(0.0) for _ in params]
    else:
        exp_avgs, exp_avg_sqs, steps = ([t.clone() for t in ts] for ts in state)
    for step_grads in grads:
        for s in steps:
            s += 1
        step_fn(params, step_grads, exp_avgs, exp_avg_sqs, steps, **kwargs)
    return params, exp_avgs, exp_avg_sqs


def zero_pattern(p: Tensor, prox: str, grouping: str) -> Tensor:
    """Which groups (elements, for l1) of ``p`` are exactly zero."""
    if prox == "l1":
        return p == 0
    return (as_groups(p, grouping) == 0).all(dim=1)


def check_zeros(actual: list[Tensor], expected: list[Tensor], prox: str, grouping: str) -> None:
    """Same exact zeros as the reference, and in every grouped tensor some zero and some not."""
    if prox == "none":
        assert all(bool((p != 0).all()) for p in actual if p.numel())
        return
    for i, (a, e) in enumerate(zip(actual, expected)):
        if not is_grouped(e) or e.numel() == 0:
            continue
        zeros = zero_pattern(a, prox, grouping)
        assert torch.equal(zeros, zero_pattern(e, prox, grouping)), f"{SHAPES[i][0]}: zero patterns differ"
        assert zeros.any() and not zeros.all(), f"{SHAPES[i][0]}: lambda_ should zero some groups, not all"


def assert_all_close(actual: list[Tensor], expected: list[Tensor], *, rtol: float, atol_factor: float) -> None:
    """``|a - e| <= atol + rtol |e|`` elementwise, with ``atol = atol_factor * max|e|`` per tensor
    (an error relative to the tensor's scale, for elements the prox has shrunk towards zero;
    the max over finite ``e``), and a NaN or inf exactly where ``e`` has one."""
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape and a.stride() == e.stride(), SHAPES[i][0]
        finite = e[e.isfinite()]
        if finite.numel():
            atol = atol_factor * float(finite.abs().max())
            torch.testing.assert_close(a.double(), e, rtol=rtol, atol=atol, equal_nan=True,
                                       msg=lambda m: f"{SHAPES[i][0]}: {m}")


@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("prox", PROXES)
def test_float64_matches_reference(prox: str, grouping: str) -> None:
    # The same maths in the same precision: results differ only by rounding order (sums over
    # groups, fused multiply-adds), ~1e-16 relative per operation. Over 7 steps the Adam
    # division and a shrink close to its threshold amplify that by at most ~1e4.
    params, grads = make_problem()
    kwargs = dict(HYPER, lambda_=LAMBDAS[prox], prox=prox, grouping=grouping)
    expected = run(reference.group_prox_adam, params, grads, **kwargs)
    actual = run(cpu.group_prox_adam, params, grads, **kwargs)
    for a, e in zip(actual, expected):
        assert_all_close(a, e, rtol=1e-10, atol_factor=1e-12)
    check_zeros(actual[0], expected[0], prox, grouping)


def run_float32(kwargs: dict) -> tuple[tuple[list[Tensor], ...], tuple[list[Tensor], ...]]:
    """:func:`run` of the kernel on the float32 problem, and of the reference on its float64 copy."""
    params, grads = make_problem()
    params32 = [p.float() for p in params]
    grads32 = [[g.float() for g in gs] for gs in grads]
    expected = run(reference.group_prox_adam, [p.double() for p in params32],
                   [[g.double() for g in gs] for gs in grads32], **kwargs)
    return run(cpu.group_prox_adam, params32, grads32, **kwargs), expected


@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("prox", PROXES)
def test_float32_matches_float64_reference(prox: str, grouping: str) -> None:
    # float32 rounds each of the ~15 operations of a step to 2^-24 (6e-8) relative, so p, m and
    # v drift from float64 by a few 1e-7 relative per step (2.5e-7 after 7 steps measured). The
    # shrink's error is absolute (|z| tau/||z|| times the norm's 1e-7 relative error), hence the
    # atol on the tensor's scale; the weighted prox also stops Newton at 1 - phi <= 1e-6 rather
    # than 1e-12, which moves x by at most 1e-6 relative.
    actual, expected = run_float32(dict(HYPER, lambda_=LAMBDAS[prox], prox=prox, grouping=grouping))
    for a, e in zip(actual, expected):
        assert all(t.dtype == torch.float32 for t in a)
        assert_all_close(a, e, rtol=5e-6, atol_factor=5e-6)
    check_zeros(actual[0], expected[0], prox, grouping)


@pytest.mark.parametrize("grouping", GROUPINGS)
def test_float32_weighted_prox_with_a_tiny_tau(grouping: str) -> None:
    # lambda_ = 1e-15 makes tau ~ 1e-17, and the prox nearly the identity. The Newton sums at
    # theta = 0 divide by tau ((z d / tau)^2 d / tau ~ 1e46 here) and would overflow float32, so
    # the first step is taken in closed form; the tolerances are those of the float32 test above.
    actual, expected = run_float32(dict(HYPER, lambda_=1e-15, prox="group_weighted", grouping=grouping))
    for a, e in zip(actual, expected):
        assert_all_close(a, e, rtol=5e-6, atol_factor=5e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("prox", PROXES)
def test_half_precision_one_step(prox: str, grouping: str, dtype: torch.dtype) -> None:
    # Kernel and reference both compute in float32 from the same 16-bit inputs and round once to
    # the storage dtype. Their float32 results differ by ~1e-6 relative, which can move a value
    # across a rounding boundary, so they agree to one unit in the last place of the dtype:
    # eps relative, or one subnormal step near zero.
    params, grads = make_problem()
    gen = torch.Generator().manual_seed(1)
    state = (  # a warm Adam state, in the params' layouts
        [torch.empty_like(p).copy_(1e-2 * torch.randn(p.shape, generator=gen, dtype=p.dtype)) for p in params],
        [torch.empty_like(p).copy_(1e-3 * torch.randn(p.shape, generator=gen, dtype=p.dtype)).square_()
         for p in params],
        [torch.tensor(10.0) for _ in params],
    )
    low = [p.to(dtype) for p in params]
    low_state = ([t.to(dtype) for t in state[0]], [t.to(dtype) for t in state[1]], state[2])
    low_grads = [[g.to(dtype) for g in grads[0]]]
    kwargs = dict(HYPER, lambda_=LAMBDAS[prox], prox=prox, grouping=grouping)
    expected = run(reference.group_prox_adam, [p.float() for p in low], [[g.float() for g in low_grads[0]]],
                   state=tuple([t.float() for t in ts] for ts in low_state[:2]) + (low_state[2],), **kwargs)
    actual = run(cpu.group_prox_adam, low, low_grads, state=low_state, **kwargs)
    finfo = torch.finfo(dtype)
    for a_list, e_list in zip(actual, expected):
        for (name, _), a, e in zip(SHAPES, a_list, e_list):
            assert a.dtype == dtype
            one_subnormal = finfo.smallest_normal * finfo.eps
            torch.testing.assert_close(a.float(), e.to(dtype).float(), rtol=finfo.eps, atol=one_subnormal,
                                       msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize(
    "variant",
    [
        dict(decoupled_weight_decay=True),
        dict(maximize=True),
        dict(weight_decay=0.0),
        dict(beta1=0.3),  # lerp weight 0.7 >= 0.5: torch.lerp's other formula
        dict(grad_scale=torch.tensor(1024.0, dtype=torch.float64)),
        dict(lr=0.0),  # tau == 0: every prox is the identity
    ],
    ids=["decoupled", "maximize", "no_decay", "beta1_0.3", "grad_scale", "lr_0"],
)
@pytest.mark.parametrize("prox", ["group", "group_weighted", "l1"])
def test_hyperparameters_match_reference(prox: str, variant: dict) -> None:
    params, grads = make_problem(seed=2)
    if "grad_scale" in variant:
        grads = [[g * variant["grad_scale"] for g in gs] for gs in grads]
    kwargs = dict(HYPER, lambda_=LAMBDAS[prox], prox=prox, grouping="in_channel") | variant
    expected = run(reference.group_prox_adam, params, grads, **kwargs)
    actual = run(cpu.group_prox_adam, params, grads, **kwargs)
    for a, e in zip(actual, expected):
        assert_all_close(a, e, rtol=1e-10, atol_factor=1e-12)


#: Tensors from this many elements up are stepped by all threads at once, one row band (or
#: contiguous piece) each: the C++ kernel's kCooperativeElements.
COOPERATIVE_ELEMENTS = 1 << 19


@pytest.mark.parametrize("prox", ["group", "group_weighted", "l1"])
def test_large_groups_and_many_tiles(prox: str) -> None:
    """Groups longer than a tile's target (one group per tile), tensors cut into many tiles, with
    an out-channel K that is not a multiple of the vector width, and a tensor large enough for
    all threads to step it at once (in row bands for in-channel groups, in pieces for l1)."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(180_000, 3), (3, 70_001), (256, 300, 1, 1)]
    assert math.prod(shapes[0]) >= COOPERATIVE_ELEMENTS
    scale = lambda n: torch.empty(n, dtype=torch.float64).uniform_(0.01, 1.0, generator=gen)  # noqa: E731
    params = [torch.randn(shapes[0], generator=gen, dtype=torch.float64) * scale(3),
              torch.randn(shapes[1], generator=gen, dtype=torch.float64) * scale(3)[:, None],
              torch.randn(shapes[2], generator=gen, dtype=torch.float64) * scale(300)[:, None, None]]
    grads = [[0.1 * torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(2)]
    for grouping in GROUPINGS:
        kwargs = dict(HYPER, lambda_=LAMBDAS[prox], prox=prox, grouping=grouping)
        expected = run(reference.group_prox_adam, params, grads, **kwargs)
        actual = run(cpu.group_prox_adam, params, grads, **kwargs)
        for a_list, e_list in zip(actual, expected):
            for a, e in zip(a_list, e_list):
                torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12 * float(e.abs().max()))


def test_float32_weighted_prox_on_a_tensor_all_threads_step() -> None:
    """A float32 tensor large enough to be split into row bands, where the passes after the first
    recompute d from v with a reciprocal square root estimate (infinite at v = 0): every third
    gradient element is 0 at every step, so v = 0 (d = eps) there, and must come out as the
    reference's. No weight decay, which would make those gradients nonzero. Tolerances as in
    the float32 test above."""
    gen = torch.Generator().manual_seed(5)
    shape = (2100, 256, 1, 1)
    assert math.prod(shape) >= COOPERATIVE_ELEMENTS
    scale = torch.empty(256, dtype=torch.float64).uniform_(0.05, 1.0, generator=gen)[:, None, None]
    p = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).float()
    grads = []
    for _ in range(3):
        g = (0.1 * torch.randn(shape, generator=gen, dtype=torch.float64)).float()
        g.view(-1)[::3] = 0.0
        grads.append([g])
    kwargs = dict(HYPER, weight_decay=0.0, lambda_=20.0, prox="group_weighted", grouping="in_channel")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        actual = run(cpu.group_prox_adam, [p], grads, **kwargs)
    finally:
        torch.set_num_threads(threads)
    expected = run(reference.group_prox_adam, [p.double()], [[g.double() for g in gs] for gs in grads], **kwargs)
    for a, e in zip(actual, expected):
        assert_all_close(a, e, rtol=5e-6, atol_factor=5e-6)
    assert bool((actual[2][0] == 0).any())
    zeros = zero_pattern(actual[0][0], "group_weighted", "in_channel")
    assert zeros.any() and not zeros.all()


def test_weighted_prox_last_newton_update_lands_within_tolerance() -> None:
    """The kernel ends Newton's iteration with an update it does not check by another pass only
    when a bound on phi'' shows that the update lands within rtol (1e-12 in float64). Its groups
    here are the hard case for that bound: d spread over up to four decades, with one to three
    elements at d = 1 and the rest at one small d, and ||D z|| from 1 to 21 tau. Every group must
    come out as the reference's solved to machine precision, within what rtol allows: a gap of
    rtol in phi moves theta by rtol / (theta phi'), at most 5.5e-12 relative on these groups, so
    1e-10 leaves room for rounding. Measured: 1.5e-12; with the bound's variance term left out,
    1.3e-7."""
    gen = torch.Generator().manual_seed(7)
    rows, groups, t, lr, lambda_ = 64, 400, 10.0, 1e-3, 1.0
    tau = lr * lambda_ * math.sqrt(rows)
    d = 10.0 ** -(4 * torch.rand(1, groups, generator=gen, dtype=torch.float64)).expand(rows, groups).clone()
    for b, k in enumerate(torch.randint(1, 4, (groups,), generator=gen).tolist()):
        d[torch.randperm(rows, generator=gen)[:k], b] = 1.0
    z = torch.randn(rows, groups, generator=gen, dtype=torch.float64)
    ratio = 1 + 20 * torch.rand(groups, generator=gen, dtype=torch.float64)
    z *= ratio * tau / (z * d).norm(dim=0)
    # One step from these params with g = 0 and m = 0 takes z = p and d from v exactly as the
    # reference does: d = sqrt(beta2 v) / sqrt(1 - beta2^t) + eps.
    beta2, eps = HYPER["beta2"], HYPER["eps"]
    v = ((d - eps) * math.sqrt(1 - beta2**t)).square() / beta2
    d = (beta2 * v).sqrt() / math.sqrt(1 - beta2**t) + eps
    p, m = z.clone(), torch.zeros_like(z)
    kwargs = dict(HYPER, lr=lr, weight_decay=0.0, lambda_=lambda_, prox="group_weighted", grouping="in_channel")
    cpu.group_prox_adam([p], [torch.zeros_like(z)], [m], [v], [torch.tensor(t)], **kwargs)
    expected = reference.weighted_group_prox(z, d, tau, "in_channel", rtol=0.0)
    assert bool((expected != 0).all())
    error = ((p - expected).norm(dim=0) / expected.norm(dim=0)).max()
    assert error <= 1e-10, f"largest relative error of a group: {float(error):.2e}"


@pytest.mark.parametrize("prox", ["group", "group_weighted"])
def test_depthwise_conv_out_channel_groups_match_the_reference(prox: str) -> None:
    """Out-channel groups of a depthwise 3x3 conv are nine contiguous lanes in one row, which pass 1
    sums in registers (36 groups: chunks of 8 or 16, then per-lane sums for the last 4)."""
    gen = torch.Generator().manual_seed(5)
    scale = torch.empty(36, 1, 1, 1, dtype=torch.float64).uniform_(math.log(0.05), 0.0, generator=gen).exp()
    p = torch.randn(36, 1, 3, 3, generator=gen, dtype=torch.float64) * scale
    grads = [[0.1 * torch.randn(36, 1, 3, 3, generator=gen, dtype=torch.float64)] for _ in range(STEPS)]
    # Groups of nine weights need a larger lambda_ than LAMBDAS' to zero some of them.
    lambda_ = {"group": 100.0, "group_weighted": LAMBDAS["group_weighted"]}[prox]
    kwargs = dict(HYPER, lambda_=lambda_, prox=prox, grouping="out_channel")
    grads64 = [[g.float().double() for g in gs] for gs in grads]  # the float32 problem, in float64
    expected = run(reference.group_prox_adam, [p.float().double()], grads64, **kwargs)
    actual = run(cpu.group_prox_adam, [p.float()], [[g.float() for g in gs] for gs in grads], **kwargs)
    for a, e in zip(actual, expected):
        # The tolerances of test_float32_matches_float64_reference, for the same reasons.
        torch.testing.assert_close(a[0].double(), e[0], rtol=5e-6, atol=5e-6 * float(e[0].abs().max()))
    zeros = zero_pattern(actual[0][0], prox, "out_channel")
    assert torch.equal(zeros, zero_pattern(expected[0][0], prox, "out_channel"))
    assert zeros.any() and not zeros.all()


#: Ways a group's z becomes non-finite (see :func:`poison`).
NONFINITE_CASES = ("nan_grad", "inf_grad", "inf_param", "zero_grads_eps0")


def poison(case: str, params: list[Tensor], grads: list[list[Tensor]], grouping: str) -> dict:
    """Makes one group of the 3x3 conv non-finite, in place: the group of its element
    ``[3, 5, 1, 1]``, in-channel group 5 (summed in registers in pass 1, in a vector shared with
    finite groups) or out-channel group 3. A NaN or inf gradient element, or an inf param
    element, in the first step (the NaN stays in the moments); or zero gradients at every step
    with eps = 0 (Adam's z is 0/0), with decoupled weight decay so that they stay zero. Returns
    the hyperparameters to override."""
    index = (3, 5, 1, 1)
    group = index[group_dim(grouping)]
    if case == "nan_grad":
        grads[0][0][index] = float("nan")
    elif case == "inf_grad":
        grads[0][0][index] = float("inf")
    elif case == "inf_param":
        params[0][index] = float("inf")
    else:
        for step_grads in grads:
            step_grads[0].select(group_dim(grouping), group).zero_()
        return dict(eps=0.0, decoupled_weight_decay=True)
    return {}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", NONFINITE_CASES)
@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("prox", PROXES)
def test_nonfinite_values_match_reference(prox: str, grouping: str, case: str, dtype: torch.dtype) -> None:
    """The rule for non-finite values (reference.py): a group whose sums are not finite, and for
    l1 an element whose z is not, passes through, as plain Adam leaves it: the kernel's poisoned
    group is its own "none" run's, with NaN (or inf) where the reference has them; every other
    group matches the reference as in the finite tests, zeros included. Same tolerances
    throughout: the group and elementwise paths compute z with the same operations, but where
    ATen's vectors are plain arrays (no AVX2) the compiler may fuse them into multiply-adds
    differently in each, a few ulps apart."""
    params, grads = make_problem()
    overrides = poison(case, params, grads, grouping)
    kwargs = dict(HYPER, lambda_=LAMBDAS[prox], prox=prox, grouping=grouping) | overrides
    params, grads = [p.to(dtype) for p in params], [[g.to(dtype) for g in gs] for gs in grads]
    expected = run(reference.group_prox_adam, [p.double() for p in params],
                   [[g.double() for g in gs] for gs in grads], **kwargs)
    actual = run(cpu.group_prox_adam, params, grads, **kwargs)
    adam = run(cpu.group_prox_adam, params, grads, **(kwargs | dict(prox="none")))[0][0]
    tolerance = dict(rtol=1e-10, atol_factor=1e-12) if dtype == torch.float64 else dict(rtol=5e-6, atol_factor=5e-6)
    for a, e in zip(actual, expected):
        assert_all_close(a, e, **tolerance)
    check_zeros(actual[0], expected[0], prox, grouping)

    p = actual[0][0]
    passed = ~adam.isfinite()
    if prox in ("group", "group_weighted"):
        rows = as_groups(passed, grouping)
        passed = from_groups(rows.any(dim=1, keepdim=True).expand_as(rows), p, grouping)
    assert passed.any() and not expected[0][0][passed].isfinite().all()
    torch.testing.assert_close(p[passed], adam[passed], rtol=tolerance["rtol"], atol=0, equal_nan=True)
    assert torch.equal(p.isnan(), adam.isnan())
    assert all(bool(t.isfinite().all()) for t in actual[0][1:])


@pytest.mark.parametrize("prox", ["group", "group_weighted"])
def test_nonfinite_group_of_a_tensor_all_threads_step(prox: str) -> None:
    """The same rule on a float32 tensor split into row bands, whose group sums add up over the
    bands, and where the weighted prox's later passes recompute d from v: a NaN gradient element
    in one group and an inf in another, in the first of two steps; tolerances as in the float32
    test above."""
    gen = torch.Generator().manual_seed(6)
    shape = (2100, 256, 1, 1)
    assert math.prod(shape) >= COOPERATIVE_ELEMENTS
    scale = torch.empty(256, dtype=torch.float64).uniform_(0.05, 1.0, generator=gen)[:, None, None]
    p = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).float()
    grads = [[(0.1 * torch.randn(shape, generator=gen, dtype=torch.float64)).float()] for _ in range(2)]
    grads[0][0][1500, 7] = float("nan")
    grads[0][0][20, 200] = float("inf")
    kwargs = dict(HYPER, lambda_=LAMBDAS[prox] * 20, prox=prox, grouping="in_channel")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        actual = run(cpu.group_prox_adam, [p], grads, **kwargs)
        adam = run(cpu.group_prox_adam, [p], grads, **(kwargs | dict(prox="none")))[0][0]
    finally:
        torch.set_num_threads(threads)
    expected = run(reference.group_prox_adam, [p.double()], [[g.double() for g in gs] for gs in grads], **kwargs)
    for a, e in zip(actual, expected):
        assert_all_close(a, e, rtol=5e-6, atol_factor=5e-6)
    out = actual[0][0]
    torch.testing.assert_close(out[:, [7, 200]], adam[:, [7, 200]], rtol=5e-6, atol=0, equal_nan=True)
    assert torch.equal(out.isnan(), adam.isnan()) and int(out.isnan().sum()) == 2
    zeros = zero_pattern(out, prox, "in_channel")
    assert zeros.any() and not zeros.all()


@pytest.mark.parametrize("prox", ["group", "group_weighted"])
def test_half_precision_large_tensor(prox: str) -> None:
    """A bfloat16 tensor large enough to be split into row bands across threads, its z and d
    held in one float32 scratch the bands share: one step, to one bfloat16 rounding."""
    gen = torch.Generator().manual_seed(4)
    shape = (2100, 256, 1, 1)
    assert math.prod(shape) >= COOPERATIVE_ELEMENTS
    scale = torch.empty(256, dtype=torch.float64).uniform_(0.05, 1.0, generator=gen)[:, None, None]
    p = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).bfloat16()
    g = (0.1 * torch.randn(shape, generator=gen, dtype=torch.float64)).bfloat16()
    # No weight decay: on bfloat16 data g + wd p can cancel exactly, and the kernel's fused
    # multiply-add then leaves a ~1e-11 residue where the reference's rounded product gives 0.
    # One step from zero state: per-element thresholds 0.2 (group) and ~0.25 / d (weighted, with
    # d ~ |g| ~ 0.08) against channel scales in [0.05, 1] zero some groups.
    lambda_ = {"group": 200.0, "group_weighted": 20.0}[prox]
    kwargs = dict(HYPER, weight_decay=0.0, lambda_=lambda_, prox=prox, grouping="in_channel")
    expected = run(reference.group_prox_adam, [p.float()], [[g.float()]], **kwargs)
    actual = run(cpu.group_prox_adam, [p], [[g]], **kwargs)
    eps = torch.finfo(torch.bfloat16).eps
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a[0].float(), e[0].bfloat16().float(), rtol=eps, atol=0.0)
    zeros = zero_pattern(actual[0][0], prox, "in_channel")
    assert zeros.any() and not zeros.all()


def test_optimizer_cpu_backend_matches_torch_backend() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 16, 1), nn.Flatten(), nn.Linear(16 * 6 * 6, 5))
    model[1].to(memory_format=torch.channels_last)
    twins = [model, copy.deepcopy(model)]
    optimizers = []
    for net, backend in zip(twins, ("torch", "cpu")):
        convs = [p for p in net.parameters() if p.dim() == 4]
        rest = [p for p in net.parameters() if p.dim() != 4]
        optimizers.append(FusedGroupProxAdam(
            [{"params": convs}, {"params": rest, "prox": "l1", "lambda_": 0.5}],
            lr=1e-2, weight_decay=1e-3, lambda_=0.5, prox="group_weighted", backend=backend,
        ))
    x = torch.randn(4, 3, 8, 8)
    for _ in range(5):
        for net, opt in zip(twins, optimizers):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    # Both step in float32; they differ by float32 rounding order (~1e-7 relative per step).
    for p_ref, p_cpu in zip(twins[0].parameters(), twins[1].parameters()):
        torch.testing.assert_close(p_cpu, p_ref, rtol=1e-5, atol=1e-6)
        assert p_cpu.stride() == p_ref.stride()
    for s_ref, s_cpu in zip(optimizers[0].state.values(), optimizers[1].state.values()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(s_cpu[key], s_ref[key], rtol=1e-5, atol=1e-8)


def test_op_under_torch_compile_fullgraph() -> None:
    params, grads = make_problem()
    params = [p.float() for p in params]
    grads = [g.float() for g in grads[0]]
    kwargs = dict(HYPER, lambda_=LAMBDAS["group"], prox="group", grouping="in_channel")

    def step(ps: list[Tensor], gs: list[Tensor], ms: list[Tensor], vs: list[Tensor], steps: list[Tensor]) -> None:
        cpu.group_prox_adam(ps, gs, ms, vs, steps, **kwargs)

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="inductor")):
        ps = [p.clone() for p in params]
        ms, vs = [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps]
        fn(ps, grads, ms, vs, [torch.tensor(1.0) for _ in ps])
        results.append(ps + ms + vs)
    for compiled, eager in zip(results[1], results[0]):
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def test_unavailable_off_the_cpu() -> None:
    reason = cpu.unavailable_reason(torch.device("cuda"))
    assert reason is not None and "cuda" in reason


def test_mixed_dtypes_are_refused() -> None:
    p = torch.zeros(4, 3)
    with pytest.raises(TypeError, match="needs grads in the param's dtype.*backend='torch' takes mixed dtypes"):
        cpu.group_prox_adam([p], [torch.zeros(4, 3, dtype=torch.float64)], [torch.zeros_like(p)],
                            [torch.zeros_like(p)], [torch.tensor(1.0)], **HYPER, lambda_=1.0, prox="group",
                            grouping="in_channel")


def test_build_failure_is_a_reason(tmp_path, monkeypatch, capfd) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    source = tmp_path / "broken.cpp"
    source.write_text("int broken( { return 0; }\n")
    name = f"lomt_test_broken_{tmp_path.name}"
    for attempt in range(2):
        with pytest.raises(ExtensionUnavailable, match=r"building .* failed: .*error") as exc_info:
            load_extension(name, [str(source)])
        assert "\n" not in str(exc_info.value)
    err = capfd.readouterr().err
    assert err.count(f"lomt_kernels: compiling {name}") == 1, err
    with pytest.raises(ExtensionUnavailable, match="missing"):
        load_extension(f"{name}_missing", [str(tmp_path / "absent.cpp")])


def test_a_library_prebuilt_into_the_package_is_loaded_without_compiling(tmp_path) -> None:
    """What ``LOMT_BUILD_EXT=1`` leaves in the package, named by its key, is loaded first."""
    library = Path(cpu.build())  # <cache>/<name>_<key>/<name>_<key>.so
    prebuilt = tmp_path / "prebuilt"
    prebuilt.mkdir()
    target = prebuilt / f"{library.stem}{importlib.machinery.EXTENSION_SUFFIXES[0]}"
    shutil.copy(library, target)
    (prebuilt / "group_prox_adam_cpu_000000000000.so").write_text("another key: never loaded")
    code = (
        "import sys\nfrom pathlib import Path\nfrom lomt_kernels.kernels import _extension, cpu\n"
        "_extension.PREBUILT = Path(sys.argv[1])\nprint(cpu.build())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(prebuilt)], capture_output=True, text=True, timeout=300,
        env={**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "cache")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == str(target) and "compiling" not in result.stderr
    assert not (tmp_path / "cache").exists()


@pytest.mark.skipif(not torch.backends.openmp.is_available(), reason="torch is built without OpenMP")
@pytest.mark.skipif(shutil.which("nm") is None, reason="needs binutils' nm")
def test_kernel_is_built_to_run_on_openmp_threads() -> None:
    """``at::parallel_for`` is a header template: compiled without ``-fopenmp`` its pragma is
    dropped and every "parallel" loop of the kernel runs on the calling thread alone, silently.
    The built library must call into libgomp."""
    symbols = subprocess.run(
        ["nm", "-D", "--undefined-only", cpu.build()], capture_output=True, text=True, check=True
    ).stdout
    assert "GOMP_parallel" in symbols

