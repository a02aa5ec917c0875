"""``backend="auto"``: the fused kernel when it can run, else the reference with one warning."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lomt_kernels import FusedGroupProxAdam, backends
from lomt_kernels.kernels import _extension


@pytest.fixture(autouse=True)
def fresh_resolution():
    """Each test resolves afresh, and leaves no answer of its own to the tests after it."""
    backends.resolve.cache_clear()
    yield
    backends.resolve.cache_clear()


def train_steps(steps: int) -> list[warnings.WarningMessage]:
    """``steps`` steps of a small conv with ``backend="auto"``; the warnings they raised."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    opt = FusedGroupProxAdam(conv.parameters(), lr=1e-2, lambda_=1e-2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            opt.zero_grad()
            conv(torch.randn(2, 3, 8, 8)).square().sum().backward()
            opt.step()
    return caught


def test_auto_takes_the_fused_cpu_kernel_without_a_word():
    assert backends.resolve("auto", torch.device("cpu"))[0] == "cpu"
    assert train_steps(2) == []


def test_fallback_to_the_reference_warns_once_with_reason_and_fix(monkeypatch, tmp_path):
    # An install without the C++ sources (what a wheel without csrc/ gave): nothing to build.
    monkeypatch.setattr(_extension, "REPO_CSRC", tmp_path / "repo")
    monkeypatch.setattr(_extension, "PACKAGE_CSRC", tmp_path / "package")
    monkeypatch.setattr(_extension, "PREBUILT", tmp_path / "prebuilt")
    monkeypatch.setattr(_extension, "_loaded", {})
    caught = train_steps(3) + train_steps(2)  # a second optimizer on the same device: still once
    assert backends.resolve("auto", torch.device("cpu"))[0] == "torch"
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert "backend='auto' runs the PyTorch reference on cpu" in message
    assert "the sources of group_prox_adam_cpu are missing" in message
    assert "python -m lomt_kernels.build" in message and "backend='torch'" in message


def test_fallback_on_a_device_without_fused_kernels_says_so():
    with pytest.warns(UserWarning, match="fused kernels for CPU and CUDA params only, not meta"):
        assert backends.resolve("auto", torch.device("meta"))[0] == "torch"


def test_the_reference_by_name_is_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve("torch", torch.device("cpu"))[0] == "torch"


def test_every_backend_implements_the_contract_in_full():
    """``step``, ``unavailable_reason`` and ``capturable`` in every backend module, with the
    protocol's parameters; only Triton declares its steps capturable."""
    import inspect

    from lomt_kernels.contract import Backend

    for name in backends.BACKENDS:
        try:
            backend = backends.load(name)
        except ImportError:  # triton not installed: nothing to check
            continue
        for member in ("step", "unavailable_reason"):
            ours = list(inspect.signature(getattr(backend, member)).parameters)
            assert ours == list(inspect.signature(getattr(Backend, member)).parameters)[1:], (name, member)
        assert backend.capturable is (name in ("triton", "cuda")), name
