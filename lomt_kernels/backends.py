"""The one place where a backend name becomes a :class:`~lomt_kernels.contract.Backend`.

Every backend module implements the contract in full (``step``, ``unavailable_reason`` and
``capturable``; see :mod:`lomt_kernels.contract`). ``backend="auto"`` falls back to the reference
(``"torch"``) only with a warning that says why.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from typing import cast

import torch

from .contract import Backend

BACKENDS = ("torch", "cpu", "triton", "cuda")

_MODULES = {
    "torch": "lomt_kernels.reference",
    "cpu": "lomt_kernels.kernels.cpu",
    "triton": "lomt_kernels.kernels.triton_group_adam",
    "cuda": "lomt_kernels.kernels.cuda",
}
# Fastest first, per device type.
_PREFERENCE = {"cpu": ("cpu", "torch"), "cuda": ("triton", "cuda", "torch")}


def load(name: str) -> Backend:
    """The module of backend ``name`` (importing it; an ``ImportError`` if it cannot be)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: expected 'auto' or one of {BACKENDS}")
    return cast(Backend, importlib.import_module(_MODULES[name]))


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """``None`` if backend ``name`` can run on ``device``, else what is missing."""
    try:
        backend = load(name)
    except ImportError as exc:  # e.g. triton not installed
        return f"importing {_MODULES[name]} failed: {exc}"
    return backend.unavailable_reason(device)


@functools.cache
def resolve(name: str, device: torch.device) -> tuple[str, Backend]:
    """The backend to use for params on ``device``: ``(name, backend)``.

    ``"auto"`` takes the first available backend in the order fastest first, and warns when
    that is the reference (the fused kernels cannot run: the warning gives each one's reason).
    A backend asked for by name that cannot run is a ``RuntimeError`` saying why. An answer is
    kept for the process, so the warning comes once per device (the optimizer asks on every
    step, and a backend that could run stays able to); a refusal is not kept.
    """
    if name == "auto":
        reasons = {}
        for candidate in _PREFERENCE.get(device.type, ("torch",)):
            reason = unavailable_reason(candidate, device)
            if reason is None:
                name = candidate
                break
            reasons[candidate] = reason
        else:
            name = "torch"
        if name == "torch":
            warnings.warn(_fallback_message(device, reasons), stacklevel=3)
    else:
        reason = unavailable_reason(name, device)
        if reason is not None:
            raise RuntimeError(
                f"backend {name!r} cannot run on {device}: {reason}. "
                f"Use backend='auto' to pick one that can, or backend='torch' (the reference)."
            )
    return name, load(name)


def _fallback_message(device: torch.device, reasons: dict[str, str]) -> str:
    """Why ``"auto"`` runs the reference on ``device``, and what to do about it."""
    if not reasons:
        why = f"lomt_kernels has fused kernels for CPU and CUDA params only, not {device.type}"
    else:
        why = "; ".join(f"backend {name!r}: {reason}" for name, reason in reasons.items())
    build = "python -m lomt_kernels.build" + (" --cuda" if device.type == "cuda" else "")
    return (
        f"backend='auto' runs the PyTorch reference on {device}, several times slower than a fused "
        f"kernel, because {why}. To fix: address that reason ({build} builds the kernels and prints "
        f"the error); backend='torch' chooses the reference without this warning."
    )
