"""The one place where a backend name becomes a step function.

Every backend module exposes ``group_prox_adam`` with the signature of
:func:`lomt_kernels.reference.group_prox_adam`, and ``unavailable_reason(device)``, which
returns ``None`` when the backend can run on ``device`` and otherwise says what is missing.
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable

import torch

BACKENDS = ("torch", "cpu", "triton", "cuda")

_MODULES = {
    "torch": "lomt_kernels.reference",
    "cpu": "lomt_kernels.kernels.cpu",
    "triton": "lomt_kernels.kernels.triton_group_adam",
    "cuda": "lomt_kernels.kernels.cuda",
}
# Fastest first, per device type.
_PREFERENCE = {"cpu": ("cpu", "torch"), "cuda": ("triton", "cuda", "torch")}


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """``None`` if backend ``name`` can run on ``device``, else what is missing."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: expected 'auto' or one of {BACKENDS}")
    if name == "torch":
        return None
    try:
        module = importlib.import_module(_MODULES[name])
    except ImportError as exc:  # e.g. triton not installed
        return f"importing {_MODULES[name]} failed: {exc}"
    return module.unavailable_reason(device)


@functools.cache
def resolve(name: str, device: torch.device) -> tuple[str, Callable[..., None]]:
    """The backend to use for params on ``device``: ``(name, step_function)``.

    ``"auto"`` takes the first available backend in the order fastest first; a backend
    asked for by name that cannot run is a ``RuntimeError`` saying why. An answer is kept for
    the process (the optimizer asks on every step, and a backend that could run stays able
    to); a refusal is not.
    """
    if name == "auto":
        for candidate in _PREFERENCE.get(device.type, ("torch",)):
            if unavailable_reason(candidate, device) is None:
                name = candidate
                break
        else:
            name = "torch"
    else:
        reason = unavailable_reason(name, device)
        if reason is not None:
            raise RuntimeError(
                f"backend {name!r} cannot run on {device}: {reason}. "
                f"Use backend='auto' to pick one that can, or backend='torch' (the reference)."
            )
    return name, importlib.import_module(_MODULES[name]).group_prox_adam
