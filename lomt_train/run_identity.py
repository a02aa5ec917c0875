"""Which runs are the same experiment: the one rule behind run folders and ``lomt_train report``.

A run's **identity** is every :class:`~lomt_train.config.RunConfig` field that changes what is
trained or measured, except the seed: two runs with the same identity differ only by their
seed, so they are repeats, averaged in reports. Every field counts unless it is listed in
:data:`NOT_IDENTITY`, so a field added to ``RunConfig`` later forks runs rather than silently
merging them; a field that only says where or how fast to run belongs in that list.

Only fields that differ from ``RunConfig``'s defaults enter the hash, so adding a field with a
default keeps every existing run's folder.

The folder is ``<out>/<dataset>-<tasks>/<prox>-<setting>[-attach]-<hash8>/seed<seed>``:
``<setting>`` is ``lambda<λ>`` (or the target, ``sparsity<P>`` / ``macs<F>``), ``-attach``
marks a LOMT model (heads at chosen backbone layers) and ``<hash8>`` is the first 8 hex digits
of the SHA-256 of the identity (:func:`identity_hash`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from .config import RunConfig
from .targets import target_label

# Where the run is written and read, how it is executed, and bookkeeping that does not change the
# model: the seed (a repeat), the output folder, the data folder's location (its layout and the
# dataset are identity), the device and kernel backend (numerically equivalent paths), loader
# workers, the latency measurement and the non-finite-step guard's patience.
NOT_IDENTITY: frozenset[str] = frozenset({
    "seed", "out", "data", "device", "backend", "workers", "timing_batch_sizes", "timing_repeats",
    "max_nonfinite_steps",
})


def identity(config: RunConfig) -> dict[str, Any]:
    """``{field: value}`` for every identity field whose value is not ``RunConfig``'s default."""
    out = {}
    for f in dataclasses.fields(RunConfig):
        if f.name in NOT_IDENTITY:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        value = getattr(config, f.name)
        if value != default:
            out[f.name] = value
    return out


def identity_hash(config: RunConfig) -> str:
    """8 hex digits of the SHA-256 of :func:`identity` (keys sorted, JSON): equal for seeds of one run."""
    text = json.dumps(identity(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def setting_name(config: RunConfig) -> str:
    """``lambda0.01``, or a target run's ``sparsity50`` / ``macs0.5``."""
    return target_label(config) or f"lambda{config.lambda_:g}"


def run_dir_for(config: RunConfig) -> Path:
    """The run's folder (rule in the module docstring)."""
    name = f"{config.peer or config.prox}-{setting_name(config)}{'-attach' if config.attach else ''}"
    return Path(config.out) / f"{config.dataset}-{'+'.join(config.tasks)}" / f"{name}-{identity_hash(config)}" / f"seed{config.seed}"


def legacy_run_dir(config: RunConfig) -> Path:
    """Where the layout before run identities put this run: ``<prox>-<setting>/seed<seed>``, no hash."""
    return run_dir_for(config).parent.with_name(f"{config.peer or config.prox}-{setting_name(config)}") / f"seed{config.seed}"


def check_legacy(config: RunConfig, run_dir: Path) -> None:
    """Refuse to start afresh beside a run of the older layout that this config would have written
    to, naming the ``mv`` that adopts it (that folder's options are checked on ``--resume``)."""
    def holds_run(folder: Path) -> bool:
        return any((folder / name).exists() for name in ("last.pt", "results.json"))

    old = legacy_run_dir(config)
    if holds_run(run_dir) or not holds_run(old):
        return
    raise FileExistsError(
        f"{old} holds a run in the older folder layout (no identity hash); its folder is now {run_dir}. "
        f"Move it there to reuse it (mkdir -p {run_dir.parent} && mv {old} {run_dir}), then pass --resume; "
        "or choose another --out"
    )


def differing_fields(configs: list[RunConfig]) -> list[str]:
    """The identity fields whose values are not the same in all of ``configs`` (field order)."""
    keys = [f.name for f in dataclasses.fields(RunConfig) if f.name not in NOT_IDENTITY]
    return [k for k in keys if len({json.dumps(getattr(c, k), sort_keys=True, default=str) for c in configs}) > 1]


def describe(config: RunConfig, fields: list[str]) -> str:
    """``"weighting=equal, epochs=20"``: ``config``'s values of ``fields``, readably."""
    def show(value: Any) -> str:
        if isinstance(value, dict):
            return "{" + ", ".join(f"{k}:{v}" for k, v in sorted(value.items())) + "}"
        if isinstance(value, list):
            return "+".join(map(str, value))
        return f"{value:g}" if isinstance(value, float) else str(value)

    return ", ".join(f"{k}={show(getattr(config, k))}" for k in fields)
