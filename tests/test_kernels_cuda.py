"""The ``"cuda"`` backend: it compiles without a GPU (without spills), and with one it matches the reference.

The GPU tests use the step-by-step float64 comparison of ``test_kernels_triton.py`` (its module
docstring states and justifies the tolerances, which hold for both backends: the same float32
operations in the same order, the same Newton stopping rule). The plan the kernels follow is
tested on the CPU in ``test_cuda_plan.py``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
from benchmarks.params import resnet50_conv_shapes
from lomt_kernels.kernels import cuda as cuda_backend
from lomt_kernels.kernels import cuda_toolkit, device_table
from lomt_kernels.kernels._extension import ExtensionUnavailable
from test_kernels_triton import (
    GROUPINGS, NONFINITE_CASES, OPTIONS, PROXES, SHAPES, STEPS, State, assert_some_groups_zero_and_some_not,
    hyper, run_found_inf, run_nonfinite, run_options, run_resnet50_shapes, run_steady_state_without_sync,
    run_steps, run_ten_repeats,
)

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICE = torch.device("cuda")


def no_toolkit_reason() -> str | None:
    try:
        cuda_toolkit.find_cuda_home()
    except ExtensionUnavailable as exc:
        return str(exc)
    return None


NO_TOOLKIT = no_toolkit_reason()


@pytest.mark.slow
@pytest.mark.skipif(NO_TOOLKIT is not None, reason=f"needs the CUDA toolkit: {NO_TOOLKIT}")
def test_cuda_extension_compiles(tmp_path):
    """A from-scratch build for sm_80 and sm_90 in an empty extension cache (a few minutes);
    ptxas's report (the build is verbose) shows each of the three kernels, for every dtype and
    prox, built for both architectures, and no function spilling registers."""
    env = dict(
        os.environ, TORCH_CUDA_ARCH_LIST=cuda_backend.DEFAULT_ARCH_LIST, TORCH_EXTENSIONS_DIR=str(tmp_path)
    )
    result = subprocess.run(
        [sys.executable, "-m", "lomt_kernels.kernels.cuda", "--compile-only"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    assert "compiling" in result.stderr and "built" in result.stdout
    entries = re.findall(r"Compiling entry function '(\w+)' for '(sm_\d+)'", result.stdout)
    for kernel in ("step_kernel", "stat_kernel", "shrink_kernel"):
        assert {arch for name, arch in entries if kernel in name} == {"sm_80", "sm_90"}, kernel
    assert len(entries) == 2 * 3 * (4 + 2 + 2)  # per arch and dtype: step for each prox, stat and shrink for two
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", result.stdout)
    assert len(spills) >= len(entries) and all(stores == loads == "0" for stores, loads in spills), spills


def cuda_step(params, grads, exp_avgs, exp_avg_sqs, steps, **kwargs) -> None:
    """The backend with the shared parity helpers' CPU step counts moved to the params' device,
    where it keeps them (the counts already hold this step's, as the helpers pass them)."""
    device_steps = [s.to(params[0].device) for s in steps] if params else steps
    cuda_backend.group_prox_adam(params, grads, exp_avgs, exp_avg_sqs, device_steps, **kwargs)


def test_arch_flags(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a+PTX")
    assert cuda_backend.arch_flags() == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_90a,code=compute_90a",
    ]


def test_unavailable_without_a_cuda_device():
    assert "CUDA tensors only" in cuda_backend.unavailable_reason(torch.device("cpu"))


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("prox", PROXES)
def test_parity_with_reference(prox, grouping, dtype):
    state = State(list(SHAPES), grouping, dtype, DEVICE)
    masks = run_steps(cuda_step, state, **hyper(prox, grouping))
    if prox in ("group", "group_weighted"):
        assert_some_groups_zero_and_some_not(masks)


@cuda_only
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("prox", ["group", "group_weighted"])
def test_options(prox, options):
    run_options(cuda_step, prox, options, DEVICE)


@cuda_only
@pytest.mark.parametrize("case", NONFINITE_CASES)
@pytest.mark.parametrize("prox", PROXES)
def test_nonfinite_values_match_reference(prox, case):
    """One-pass tiles (for the group proxes), and the elementwise path of l1 and none."""
    run_nonfinite(cuda_step, ["conv3x3", "linear"], prox, case, DEVICE)


@cuda_only
@pytest.mark.parametrize("case", NONFINITE_CASES)
@pytest.mark.parametrize("prox", ["group", "group_weighted"])
def test_nonfinite_values_match_reference_in_two_phases(prox, case):
    """A group too big for shared memory (a tall Linear grouped by input) made non-finite: the
    two phases and the weighted prox's solve kernel."""
    run_nonfinite(cuda_step, [((20000, 24), "contiguous"), "conv3x3"], prox, case, DEVICE)


@cuda_only
@pytest.mark.parametrize("prox", ["group", "group_weighted"])
def test_two_phase_at_real_sizes(prox):
    """Groups too big for shared memory: a tall Linear grouped by input (strided, K = 1), a
    wide one grouped by output (contiguous rows longer than a chunk), and next to them a
    tensor whose small groups take the one-pass path in the same call. float32 only: for
    16-bit params the two phases round z to the param dtype in between (one more rounding
    than the module's one-ulp tolerance allows for)."""
    for grouping, shape in (("in_channel", (20000, 24)), ("out_channel", (12, 20000))):
        state = State([(shape, "contiguous"), "conv3x3"], grouping, torch.float32, DEVICE)
        masks = run_steps(cuda_step, state, **hyper(prox, grouping))
        assert_some_groups_zero_and_some_not(masks)


@cuda_only
@pytest.mark.parametrize("prox", ["group", "group_weighted"])
def test_resnet50_conv_shapes(prox):
    """The real sizes: the weighted prox's [2048, 512, 1, 1] tile once asked for more shared
    memory than a block may have without opting in, and failed to launch."""
    run_resnet50_shapes(cuda_step, prox, DEVICE)


#: Tensors of every tile class in one call: one-pass tiles (K = 9, 1, channels-last), two-phase
#: groups (a tall Linear grouped by input), elementwise biases, a transposed weight (the copies path).
MIXED = ["conv3x3", "conv1x1", "conv3x3_channels_last", "bias", "linear", "linear_transposed", ((20000, 24), "contiguous")]


def device_state(names: list, seed: int = 0) -> State:
    """:class:`State` in float32 with its step counts on the GPU, where the backend keeps them."""
    state = State(names, "in_channel", torch.float32, DEVICE, seed=seed)
    state.steps = [s.to(DEVICE) for s in state.steps]
    return state


@cuda_only
@pytest.mark.parametrize("prox", PROXES)
def test_steps_counted_in_the_kernels_over_three_launches(prox):
    """``increment_steps``: each count goes up by one a step (two-phase tensors included, whose
    blocks span three launches), with moving grads, one plan build and at most three launches a
    step; every step matches the reference."""
    state = device_state(MIXED, seed=2)
    state.steps[1] += 4  # per-tensor counts differ
    before = dict(device_table.COUNTS)

    def counted(params, grads, exp_avgs, exp_avg_sqs, steps, **kwargs):
        for s in steps:
            s -= 1
        cuda_backend.group_prox_adam(params, grads, exp_avgs, exp_avg_sqs, steps, increment_steps=True, **kwargs)

    run_steps(counted, state, **hyper(prox, "in_channel"))
    assert [float(s) for s in state.steps] == [10.0 + STEPS] + [14.0 + STEPS] + [10.0 + STEPS] * (len(MIXED) - 2)
    counts = {key: device_table.COUNTS[key] - before.get(key, 0) for key in ("launches", "builds", "grad_refreshes")}
    in_place_launches = 3 if prox in ("group", "group_weighted") else 1
    copies_launches = 1  # the transposed weight's launch, built afresh each step
    assert counts == {"launches": STEPS * (in_place_launches + copies_launches), "builds": 1 + STEPS,
                      "grad_refreshes": 2 * STEPS}


@cuda_only
@pytest.mark.parametrize("prox", ["group", "group_weighted"])
@pytest.mark.parametrize("found", [0.0, 1.0])
def test_found_inf_skips_the_step_on_the_device(prox, found):
    """:func:`run_found_inf` with two-phase tensors, the copies path and elementwise ones."""
    run_found_inf(cuda_backend.group_prox_adam, device_state(MIXED), prox, found)


@cuda_only
def test_lr_tensor_matches_host_scalars():
    """``lr`` as a 0-d device tensor (read by the kernels) gives the same bits as a float."""
    kwargs = hyper("group_weighted", "in_channel", weight_decay=0.1, decoupled_weight_decay=True)
    host, on_device = device_state(MIXED), device_state(MIXED)
    lr = torch.tensor(kwargs.pop("lr"), device=DEVICE)
    for _ in range(STEPS):
        for state in (host, on_device):
            state.new_grads()
        cuda_backend.group_prox_adam(*host.tensors(), lr=float(lr), increment_steps=True, **kwargs)
        cuda_backend.group_prox_adam(*on_device.tensors(), lr=lr, increment_steps=True, **kwargs)
        for name in ("params", "exp_avgs", "exp_avg_sqs", "steps"):
            for ours, theirs in zip(getattr(host, name), getattr(on_device, name)):
                assert torch.equal(ours, theirs), name


@cuda_only
@pytest.mark.parametrize("prox", PROXES)
def test_steady_state_step_never_syncs(prox):
    """:func:`run_steady_state_without_sync` with a two-phase tensor among the params."""
    run_steady_state_without_sync("cuda", prox, [(64, 32, 3, 3), (256, 64, 1, 1), (64,), (10, 64), (20000, 24)], DEVICE)


@cuda_only
@pytest.mark.parametrize("prox", ["group", "group_weighted"])
def test_ten_repeats_at_real_sizes_are_bit_identical(prox):
    """The ResNet-50 conv shapes and two-phase groups (:func:`run_ten_repeats`): partial sums
    are added in a fixed order, never by float atomics."""
    shapes = sorted(set(resnet50_conv_shapes())) + [(20000, 24), (2048, 512)]
    run_ten_repeats(cuda_backend.group_prox_adam, prox, shapes, DEVICE)
