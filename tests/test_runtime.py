"""Device settings resolved from (device type, bf16 support, CPU count): GPU defaults, explicit flags, refusals."""

import dataclasses

import pytest
import torch

from lomt_train.cli import build_parser, config_from_args
from lomt_train.config import RunConfig
from lomt_train.runtime import MAX_AUTO_WORKERS, Runtime, resolve_runtime

AUTO = RunConfig(dataset="nyu", tasks=["seg"], synthetic=True)


@pytest.mark.parametrize(
    "device_type, bf16, cpus, expected",
    [
        ("cuda", True, 32, Runtime("cuda", MAX_AUTO_WORKERS, pin_memory=True, amp_dtype="bfloat16", channels_last=True)),
        ("cuda", True, 2, Runtime("cuda", 2, pin_memory=True, amp_dtype="bfloat16", channels_last=True)),
        ("cuda", False, 16, Runtime("cuda", MAX_AUTO_WORKERS, pin_memory=True, amp_dtype=None, channels_last=True)),
        ("cpu", True, 32, Runtime("cpu", 0, pin_memory=False, amp_dtype=None, channels_last=False)),
    ],
)
def test_auto_settings_follow_the_device(device_type, bf16, cpus, expected):
    assert resolve_runtime(AUTO, device_type, bf16, cpus) == expected


@pytest.mark.parametrize(
    "overrides, device_type, bf16, field, value",
    [
        (dict(amp=True), "cuda", False, "amp_dtype", "float16"),
        (dict(amp=True), "cuda", True, "amp_dtype", "bfloat16"),
        (dict(amp=True), "cpu", True, "amp_dtype", "bfloat16"),
        (dict(amp_dtype="float16"), "cuda", True, "amp_dtype", "float16"),
        (dict(amp=False), "cuda", True, "amp_dtype", None),
        (dict(workers=3), "cuda", True, "workers", 3),
        (dict(workers=2), "cpu", True, "workers", 2),
        (dict(channels_last=False), "cuda", True, "channels_last", False),
        (dict(channels_last=True), "cpu", True, "channels_last", True),
    ],
)
def test_explicit_settings_win_over_auto(overrides, device_type, bf16, field, value):
    runtime = resolve_runtime(dataclasses.replace(AUTO, **overrides), device_type, bf16, 16)
    assert getattr(runtime, field) == value


@pytest.mark.parametrize(
    "overrides, device_type, bf16, message",
    [
        (dict(amp=False, amp_dtype="bfloat16"), "cuda", True, "--no-amp turns it off"),
        (dict(amp_dtype="float16"), "cpu", True, "float16 needs a CUDA device"),
        (dict(amp_dtype="bfloat16"), "cuda", False, "no bfloat16 support: use --amp-dtype float16"),
        (dict(amp_dtype="half"), "cuda", True, "amp_dtype='half'"),
        (dict(workers=-1), "cpu", True, "workers=-1"),
    ],
)
def test_settings_the_device_cannot_run_are_refused_naming_the_flag(overrides, device_type, bf16, message):
    with pytest.raises(ValueError, match=message):
        resolve_runtime(dataclasses.replace(AUTO, **overrides), device_type, bf16, 16)


def test_fp16_keeps_a_grad_scaler_and_bf16_needs_none():
    fp16 = Runtime("cpu", 0, pin_memory=False, amp_dtype="float16", channels_last=False)
    assert fp16.grad_scaler().is_enabled()
    assert not dataclasses.replace(fp16, amp_dtype="bfloat16").grad_scaler().is_enabled()
    assert not dataclasses.replace(fp16, amp_dtype=None).grad_scaler().is_enabled()


def test_autocast_uses_the_resolved_dtype():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with resolve_runtime(dataclasses.replace(AUTO, amp=True), "cpu", True, 1).autocast():
        assert (a @ b).dtype == torch.bfloat16
    with resolve_runtime(AUTO, "cpu", True, 1).autocast():
        assert (a @ b).dtype == torch.float32


def test_the_cli_leaves_auto_unless_a_flag_is_given():
    parse = lambda *flags: config_from_args("nyu", build_parser().parse_args(["nyu", "--tasks", "seg", "--synthetic", *flags]))[0]  # noqa: E731
    auto = parse()
    assert (auto.amp, auto.amp_dtype, auto.channels_last, auto.workers) == (None, None, None, None)
    explicit = parse("--no-amp", "--no-channels-last", "--workers", "0")
    assert (explicit.amp, explicit.channels_last, explicit.workers) == (False, False, 0)
    fp16 = parse("--amp", "--amp-dtype", "float16", "--channels-last")
    assert (fp16.amp, fp16.amp_dtype, fp16.channels_last) == (True, "float16", True)
