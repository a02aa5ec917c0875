"""The ``"cuda"`` backend: it compiles without a GPU, and with one it matches the reference.

Its parity with the reference is the ``cuda`` row of ``tests/test_parity.py``; the GPU tests here
reach the two-phase path and real sizes with the same step-by-step float64 comparison
(``tests/parity.py`` states and justifies the tolerances, which hold for this backend: the same
float32 operations in the same order as Triton's, the same Newton stopping rule).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from lomt_kernels.kernels import cuda as cuda_backend
from lomt_kernels.kernels import cuda_toolkit, device_table
from lomt_kernels.kernels._extension import ExtensionUnavailable
from parity import (
    LR, NONFINITE_CASES, PROX_NAMES, STEPS, State, assert_some_groups_zero_and_some_not, check_found_inf, hyper,
    resnet50_shapes, run_graph_capture, run_nonfinite, run_steady_state_without_sync, run_steps, run_ten_repeats,
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
    """A from-scratch build for sm_80 and sm_90 in an empty extension cache (about two minutes)."""
    env = dict(
        os.environ, TORCH_CUDA_ARCH_LIST=cuda_backend.DEFAULT_ARCH_LIST, TORCH_EXTENSIONS_DIR=str(tmp_path)
    )
    result = subprocess.run(
        [sys.executable, "-m", "lomt_kernels.kernels.cuda", "--compile-only"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    assert "compiling" in result.stderr and "built" in result.stdout


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
@pytest.mark.parametrize("case", NONFINITE_CASES)
@pytest.mark.parametrize("prox", ["group", "group_weighted"])
def test_nonfinite_values_match_reference_in_two_phases(prox, case):
    """A group too big for shared memory (a tall Linear grouped by input) made non-finite: the
    two phases and the weighted prox's solve kernel."""
    run_nonfinite(cuda_backend.step, [((20000, 24), "contiguous"), "conv3x3"], prox, case, torch.float32, DEVICE)


@cuda_only
@pytest.mark.parametrize("prox", ["group", "group_weighted"])
def test_two_phase_at_real_sizes(prox):
    """Groups too big for shared memory: a tall Linear grouped by input (strided, K = 1), a
    wide one grouped by output (contiguous rows longer than a chunk), and next to them a
    tensor whose small groups take the one-pass path in the same call. float32 only: for
    16-bit params the two phases round z to the param dtype in between (one more rounding
    than the parity suite's one-ulp tolerance allows for)."""
    for grouping, shape in (("in_channel", (20000, 24)), ("out_channel", (12, 20000))):
        state = State([(shape, "contiguous"), "conv3x3"], grouping, torch.float32, DEVICE)
        masks = run_steps(cuda_backend.step, state, hyper(prox, grouping))
        assert_some_groups_zero_and_some_not(masks)


@cuda_only
@pytest.mark.parametrize("prox", ["group", "group_weighted"])
def test_resnet50_conv_shapes(prox):
    """The real sizes: the weighted prox's [2048, 512, 1, 1] tile once asked for more shared
    memory than a block may have without opting in, and failed to launch."""
    state = State(resnet50_shapes(), "in_channel", torch.float32, DEVICE)
    assert_some_groups_zero_and_some_not(run_steps(cuda_backend.step, state, hyper(prox, "in_channel")))


#: Tensors of every tile class in one call: one-pass tiles (K = 9, 1, channels-last), two-phase
#: groups (a tall Linear grouped by input), elementwise biases, a transposed weight (the copies path).
MIXED = ["conv3x3", "conv1x1", "conv3x3_channels_last", "bias", "linear", "linear_transposed", ((20000, 24), "contiguous")]


@cuda_only
@pytest.mark.parametrize("prox", PROX_NAMES)
def test_steps_counted_in_the_kernels_over_three_launches(prox):
    """Each count goes up by one a step (two-phase tensors included, whose blocks span three
    launches), with moving grads, one plan build and at most three launches a step; every step
    matches the reference."""
    state = State(MIXED, "in_channel", torch.float32, DEVICE, seed=2)
    state.steps[1] += 4  # per-tensor counts differ
    before = dict(device_table.COUNTS)
    run_steps(cuda_backend.step, state, hyper(prox, "in_channel"))
    assert [float(s) for s in state.steps] == [10.0 + STEPS] + [14.0 + STEPS] + [10.0 + STEPS] * (len(MIXED) - 2)
    counts = {key: device_table.COUNTS[key] - before.get(key, 0) for key in ("launches", "builds", "grad_refreshes")}
    in_place_launches = 3 if prox in ("group", "group_weighted") else 1
    copies_launches = 1  # the transposed weight's launch, built afresh each step
    assert counts == {"launches": STEPS * (in_place_launches + copies_launches), "builds": 1 + STEPS,
                      "grad_refreshes": 2 * STEPS}


@cuda_only
@pytest.mark.parametrize("found", [0.0, 1.0])
def test_found_inf_skips_the_step_on_the_device(found):
    """Two-phase tensors, the copies path and elementwise ones."""
    check_found_inf(cuda_backend.step, found, DEVICE, MIXED)


@cuda_only
def test_lr_tensor_matches_host_scalars():
    """``lr`` as a 0-d device tensor (read by the kernels) gives the same bits as a float."""
    h = hyper("group_weighted", "in_channel", weight_decay=0.1, decoupled_weight_decay=True)
    host, on_device = State(MIXED, "in_channel", torch.float32, DEVICE), State(MIXED, "in_channel", torch.float32, DEVICE)
    for _ in range(STEPS):
        for state in (host, on_device):
            state.new_grads()
        cuda_backend.step(host.tensors(), h, LR)
        cuda_backend.step(on_device.tensors(), h, torch.tensor(LR, device=DEVICE))
        for ours, theirs in zip(host.tensors().lists(), on_device.tensors().lists()):
            assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


@cuda_only
@pytest.mark.parametrize("prox", PROX_NAMES)
def test_steady_state_step_never_syncs(prox):
    """With a two-phase tensor among the params."""
    run_steady_state_without_sync("cuda", prox, [(64, 32, 3, 3), (256, 64, 1, 1), (64,), (10, 64), (20000, 24)], DEVICE)


@cuda_only
@pytest.mark.parametrize("prox", ["group", "group_weighted"])
def test_ten_repeats_at_real_sizes_are_bit_identical(prox):
    """The ResNet-50 conv shapes and two-phase groups: partial sums are added in a fixed order,
    never by float atomics."""
    run_ten_repeats(cuda_backend.step, prox, resnet50_shapes() + [((20000, 24), "contiguous"), ((2048, 512), "contiguous")],
                    DEVICE)


@cuda_only
@pytest.mark.parametrize("prox", ["group", "group_weighted"])
def test_cuda_graph_capture(prox):
    run_graph_capture(cuda_backend.step, prox, DEVICE)
