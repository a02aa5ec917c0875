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
from lomt_kernels.kernels import cuda_toolkit
from lomt_kernels.kernels._extension import ExtensionUnavailable
from parity import (
    NONFINITE_CASES, State, assert_some_groups_zero_and_some_not, hyper, resnet50_shapes, run_nonfinite, run_steps,
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
