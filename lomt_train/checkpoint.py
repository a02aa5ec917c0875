"""Atomic checkpoints, loaded without running code, and the random-number state a run needs to
resume exactly."""

from __future__ import annotations

import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import atomic_open, atomic_write_text

__all__ = [
    "CheckpointError", "atomic_save", "atomic_write_text", "load_checkpoint", "rng_state", "set_rng_state",
    "seed_everything",
]  # fmt: skip


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that would need more than tensors and plain types."""


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` that never leaves a truncated checkpoint (see :func:`atomic_open`)."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def rng_state() -> dict[str, Any]:
    """The state of every random generator a training step may draw from, as tensors and plain
    Python types only, so that it loads with ``weights_only=True``."""
    numpy = np.random.get_state(legacy=False)
    key = torch.from_numpy(numpy["state"]["key"].astype(np.int64))  # a tensor instead of numpy's uint32 array
    state = {
        "python": random.getstate(),
        "numpy": {**numpy, "state": {**numpy["state"], "key": key}},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy = state["numpy"]
    np.random.set_state({**numpy, "state": {**numpy["state"], "key": numpy["state"]["key"].numpy().astype(np.uint32)}})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`atomic_save` with ``weights_only=True``: tensors and
    plain Python types only, so that a crafted file cannot run code. Anything else, and any
    damaged file, is a :class:`CheckpointError` that names the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message is a page of advice to load it unsafely; keep the line naming what it needs.
        needs = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        raise CheckpointError(
            f"checkpoint {path} was refused: it needs {needs.group(1) if needs else 'more'} besides tensors and "
            "plain Python types, and loading it could run code; only load checkpoints this program wrote"
        ) from exc
    except Exception as exc:
        first = str(exc).split(". ")[0]
        raise CheckpointError(f"checkpoint {path} could not be read ({first}); delete it to start over") from exc
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt
