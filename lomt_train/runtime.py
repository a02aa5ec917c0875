"""How a run uses its device: loader workers, pinned memory, mixed precision, memory format.

The config's ``workers``, ``amp``, ``amp_dtype`` and ``channels_last`` default to ``None``
(auto), resolved by :func:`resolve_runtime` from the device alone, so that the same command is
quick on a GPU and exact on the CPU:

=================  ==============================  ==========
auto value         CUDA                            CPU
=================  ==============================  ==========
``workers``        ``min(8, CPUs)``                0
``pin_memory``     on                              off
``amp``            bf16 where the GPU supports it  off (fp32)
``channels_last``  on                              off
=================  ==============================  ==========

An explicit ``amp=True`` uses ``amp_dtype`` when given, else bf16 where supported and fp16
otherwise (fp16 alone needs a GradScaler); the CPU autocasts to bf16 only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass

import torch

from .config import RunConfig

#: Loader workers on CUDA when ``workers`` is auto, at most: a cap so that several runs (or
#: ranks) on one machine do not each start a worker per CPU.
MAX_AUTO_WORKERS = 8
AMP_DTYPES = ("bfloat16", "float16")


@dataclass(frozen=True)
class Runtime:
    """The resolved settings; ``amp_dtype`` is ``None`` for full precision."""

    device_type: str
    workers: int
    pin_memory: bool
    amp_dtype: str | None
    channels_last: bool

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to ``amp_dtype`` on this device, or nothing."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=getattr(torch, self.amp_dtype))

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Enabled for fp16 only: bf16 has fp32's range, so its gradients do not underflow."""
        return torch.amp.GradScaler(self.device_type, enabled=self.amp_dtype == "float16")

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def resolve_runtime(config: RunConfig, device_type: str, bf16_supported: bool, cpu_count: int) -> Runtime:
    """The config's settings with every auto (``None``) field decided for a ``device_type``
    (``"cuda"`` or ``"cpu"``) device, ``bf16_supported`` on it, and ``cpu_count`` CPUs.

    Raises ``ValueError`` naming the flag for a combination the device cannot run.
    """
    cuda = device_type == "cuda"
    if config.amp_dtype is not None and config.amp_dtype not in AMP_DTYPES:
        raise ValueError(f"amp_dtype={config.amp_dtype!r}: expected one of {AMP_DTYPES}")
    if config.amp is False and config.amp_dtype is not None:
        raise ValueError(f"--amp-dtype {config.amp_dtype} asks for mixed precision and --no-amp turns it off: give one")
    if config.amp is None and config.amp_dtype is None:
        amp_dtype = "bfloat16" if cuda and bf16_supported else None
    elif config.amp is False:
        amp_dtype = None
    else:
        amp_dtype = config.amp_dtype or ("bfloat16" if bf16_supported or not cuda else "float16")
    if amp_dtype == "float16" and not cuda:
        raise ValueError("--amp-dtype float16 needs a CUDA device; on the CPU use --amp-dtype bfloat16")
    if amp_dtype == "bfloat16" and cuda and not bf16_supported:
        raise ValueError("this GPU has no bfloat16 support: use --amp-dtype float16 (with a GradScaler) or --no-amp")
    if config.workers is not None and config.workers < 0:
        raise ValueError(f"workers={config.workers}: it must be >= 0")
    workers = config.workers if config.workers is not None else (min(MAX_AUTO_WORKERS, cpu_count) if cuda else 0)
    channels_last = config.channels_last if config.channels_last is not None else cuda
    return Runtime(device_type, workers, pin_memory=cuda, amp_dtype=amp_dtype, channels_last=channels_last)


def runtime_for(config: RunConfig, device: torch.device) -> Runtime:
    """:func:`resolve_runtime` for ``device`` as this machine has it."""
    bf16 = device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())
    return resolve_runtime(config, device.type, bf16, os.cpu_count() or 1)
