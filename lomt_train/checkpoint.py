"""Atomic checkpoints and the random-number state a run needs to resume exactly."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import atomic_open, atomic_write_text

__all__ = ["atomic_save", "atomic_write_text", "load_checkpoint", "rng_state", "set_rng_state", "seed_everything"]


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` that never leaves a truncated checkpoint (see :func:`atomic_open`)."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def rng_state() -> dict[str, Any]:
    """The state of every random generator a training step may draw from."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`atomic_save`, with an error that names the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: nothing to resume (start the run without --resume)")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise RuntimeError(f"checkpoint {path} could not be read ({exc}); delete it to start over") from exc
