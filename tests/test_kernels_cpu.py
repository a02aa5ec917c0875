"""The ``"cpu"`` backend (``csrc/group_prox_adam_cpu.cpp``): what the parity suite
(``tests/test_parity.py``) does not reach. Tensors large enough for all threads to step them,
groups longer than a tile, the Newton stopping bound, the build, the custom op.

Each test steps a problem with the float64 reference and with the fused kernel, from identical
inputs (lower-precision inputs are upcast for the reference, so the only difference is the
kernel's arithmetic), with the shared helpers and tolerances of ``tests/parity.py``. The first
test to run builds the extension (about a minute, once per machine).
"""

from __future__ import annotations

import copy
import dataclasses
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
from lomt_kernels.contract import AdamHyper, StepTensors
from lomt_kernels.grouping import GROUPINGS
from lomt_kernels.kernels import cpu
from lomt_kernels.kernels._extension import ExtensionUnavailable, load_extension

from parity import (  # noqa: E402
    PROX_NAMES, SHAPES, TOLERANCES, TRAJECTORY_FLOAT32, State, Tolerance, assert_all_close, assert_close, hyper,
    run_trajectory, zero_groups,
)

#: The trajectories' lr and weight decay, and lambda_s that zero some groups (elements, for l1)
#: of these tests' tensors and keep others.
LR = 1e-3
LAMBDAS = {"group": 8.0, "group_weighted": 1.0, "l1": 3.0}


def cpu_hyper(prox: str, grouping: str, **overrides: object) -> AdamHyper:
    """These tests' hyperparameters (:func:`parity.hyper` with weight decay and :data:`LAMBDAS`)."""
    return hyper(prox, grouping, **{"weight_decay": 1e-2, "lambda_": LAMBDAS.get(prox, 0.0), **overrides})


@pytest.fixture(scope="module", autouse=True)
def extension() -> None:
    reason = cpu.unavailable_reason(torch.device("cpu"))
    if reason is not None:
        pytest.fail(f"the cpu extension must build on the test machine: {reason}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("prox", PROX_NAMES)
def test_half_precision_step_matches_the_float32_reference(prox: str, grouping: str, dtype: torch.dtype) -> None:
    """Kernel and reference both compute in float32 from the same 16-bit inputs and round once to
    the storage dtype. Their float32 results differ by ~1e-6 relative, which can move a value
    across a rounding boundary, so they agree to one unit in the last place of the dtype: eps
    relative, or one subnormal step near zero (tighter than the parity suite's bound against
    float64, which must also cover the float32 rounding itself)."""
    state = State(list(SHAPES), grouping, dtype, torch.device("cpu"))
    state.new_grads()
    wide = state.clone()
    for name in ("params", "grads", "exp_avgs", "exp_avg_sqs"):
        setattr(wide, name, [t.float() for t in getattr(wide, name)])
    h = cpu_hyper(prox, grouping, lambda_={"none": 0.0, **LAMBDAS}[prox])
    cpu.step(state.tensors(), h, LR)
    reference.step(wide.tensors(), h, LR)
    finfo = torch.finfo(dtype)
    one_ulp = Tolerance(finfo.eps, 0.0, finfo.smallest_normal * finfo.eps)
    for name in ("params", "exp_avgs", "exp_avg_sqs"):
        ours, theirs = getattr(state, name), getattr(wide, name)
        for i, (a, e) in enumerate(zip(ours, theirs)):
            assert a.dtype == dtype
            assert_close(a, e, one_ulp, f"{state.names[i]} {name}")


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
        h = cpu_hyper(prox, grouping)
        expected = run_trajectory(reference.step, params, grads, h, LR)
        actual = run_trajectory(cpu.step, params, grads, h, LR)
        assert_all_close(actual, expected, TOLERANCES[torch.float64])


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
    h = cpu_hyper("group_weighted", "in_channel", weight_decay=0.0, lambda_=20.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        actual = run_trajectory(cpu.step, [p], grads, h, LR)
    finally:
        torch.set_num_threads(threads)
    expected = run_trajectory(reference.step, [p.double()], [[g.double() for g in gs] for gs in grads], h, LR)
    assert_all_close(actual, expected, TRAJECTORY_FLOAT32)
    assert bool((actual[2][0] == 0).any())
    zeros = zero_groups(actual[0][0], "in_channel")
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
    h = cpu_hyper("group_weighted", "in_channel", weight_decay=0.0, lambda_=lambda_)
    beta2, eps = h.beta2, h.eps
    v = ((d - eps) * math.sqrt(1 - beta2**t)).square() / beta2
    d = (beta2 * v).sqrt() / math.sqrt(1 - beta2**t) + eps
    p, m = z.clone(), torch.zeros_like(z)
    cpu.step(StepTensors([p], [torch.zeros_like(z)], [m], [v], [torch.tensor(t - 1)]), h, lr)
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
    grads = [[0.1 * torch.randn(36, 1, 3, 3, generator=gen, dtype=torch.float64)] for _ in range(7)]
    # Groups of nine weights need a larger lambda_ than LAMBDAS' to zero some of them.
    h = cpu_hyper(prox, "out_channel", lambda_={"group": 100.0, "group_weighted": LAMBDAS["group_weighted"]}[prox])
    grads64 = [[g.float().double() for g in gs] for gs in grads]  # the float32 problem, in float64
    expected = run_trajectory(reference.step, [p.float().double()], grads64, h, LR)
    actual = run_trajectory(cpu.step, [p.float()], [[g.float() for g in gs] for gs in grads], h, LR)
    assert_all_close(actual, expected, TRAJECTORY_FLOAT32)
    zeros = zero_groups(actual[0][0], "out_channel")
    assert torch.equal(zeros, zero_groups(expected[0][0], "out_channel"))
    assert zeros.any() and not zeros.all()


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
    h = cpu_hyper(prox, "in_channel", lambda_=LAMBDAS[prox] * 20)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        actual = run_trajectory(cpu.step, [p], grads, h, LR)
        adam = run_trajectory(cpu.step, [p], grads, dataclasses.replace(h, prox="none"), LR)[0][0]
    finally:
        torch.set_num_threads(threads)
    expected = run_trajectory(reference.step, [p.double()], [[g.double() for g in gs] for gs in grads], h, LR)
    assert_all_close(actual, expected, TRAJECTORY_FLOAT32)
    out = actual[0][0]
    torch.testing.assert_close(out[:, [7, 200]], adam[:, [7, 200]], rtol=5e-6, atol=0, equal_nan=True)
    assert torch.equal(out.isnan(), adam.isnan()) and int(out.isnan().sum()) == 2
    zeros = zero_groups(out, "in_channel")
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
    h = cpu_hyper(prox, "in_channel", weight_decay=0.0, lambda_=lambda_)
    expected = run_trajectory(reference.step, [p.float()], [[g.float()]], h, LR)
    actual = run_trajectory(cpu.step, [p], [[g]], h, LR)
    assert_all_close(actual, expected, Tolerance(torch.finfo(torch.bfloat16).eps, 0.0))
    zeros = zero_groups(actual[0][0], "in_channel")
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
    state = State(list(SHAPES), "in_channel", torch.float32, torch.device("cpu"))
    state.new_grads()
    params, grads = state.params, state.grads
    h = cpu_hyper("group", "in_channel")

    def step(ps: list[Tensor], gs: list[Tensor], ms: list[Tensor], vs: list[Tensor], steps: list[Tensor]) -> None:
        cpu.step(StepTensors(ps, gs, ms, vs, steps), h, LR)

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="inductor")):
        ps = [p.clone() for p in params]
        ms, vs = [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps]
        fn(ps, grads, ms, vs, [torch.tensor(0.0) for _ in ps])
        results.append(ps + ms + vs)
    for compiled, eager in zip(results[1], results[0]):
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def test_unavailable_off_the_cpu() -> None:
    reason = cpu.unavailable_reason(torch.device("cuda"))
    assert reason is not None and "cuda" in reason


def test_mixed_dtypes_are_refused() -> None:
    p = torch.zeros(4, 3)
    with pytest.raises(TypeError, match="needs grads in the param's dtype.*backend='torch' takes mixed dtypes"):
        cpu.step(StepTensors([p], [torch.zeros(4, 3, dtype=torch.float64)], [torch.zeros_like(p)],
                             [torch.zeros_like(p)], [torch.tensor(0.0)]), cpu_hyper("group", "in_channel"), LR)


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

