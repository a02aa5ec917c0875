"""What a run resumes from, and its checkpoint ``last.pt``.

:class:`RunState` holds everything that changes from epoch to epoch (model, loss weighting,
optimizer, LR schedule, GradScaler, λ controller, non-finite counter, early-stopping record,
history, epoch) and defines the checkpoint layout in one place, :data:`LAYOUT`. A checkpoint is
written atomically (:func:`~lomt_train.checkpoint.atomic_save`), loaded with ``weights_only``
(:func:`~lomt_train.checkpoint.load_checkpoint`), and checked entry by entry
(:func:`check_layout`) before any of it is used, so a foreign or damaged file is refused with
its name and the fix instead of half-restoring a run.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lomt_kernels import LambdaController

from .checkpoint import CheckpointError, atomic_save, load_checkpoint, rng_state, set_rng_state
from .config import RunConfig
from .nonfinite import NonFiniteGuard

#: The layout version this program writes. Format 1 (files without a ``"format"`` entry) has the
#: same entries, so it still loads; a larger number comes from a newer program.
CHECKPOINT_FORMAT = 2

#: Every entry of ``last.pt`` and the type it must have. ``epoch`` is the last finished epoch
#: (from 0), ``best`` an :class:`EarlyStopping` as a dict, ``config`` the run's options
#: (checked against the command by :func:`lomt_train.resume.check_resume`).
LAYOUT: dict[str, type | tuple[type, ...]] = {
    "format": int,
    "model": dict,
    "weighting": dict,
    "optimizer": dict,
    "scheduler": dict,
    "scaler": dict,
    "controller": (dict, type(None)),
    "nonfinite": dict,
    "best": dict,
    "epoch": int,
    "history": list,
    "rng": dict,
    "config": dict,
}
# Entries a format-1 checkpoint may lack: runs started before they were recorded.
_OPTIONAL_IN_FORMAT_1 = {"format", "nonfinite", "config"}


@dataclass
class EarlyStopping:
    """The best validation score so far, the epoch (from 0) that reached it (-1 before any), and
    the eligible epochs since then without improvement."""

    score: float = math.inf
    epoch: int = -1
    bad_epochs: int = 0

    def update(self, score: float, epoch: int) -> bool:
        """Record an eligible epoch's score (lower is better); ``True`` when it is the new best.
        A NaN score never improves."""
        if score < self.score:
            self.score, self.epoch, self.bad_epochs = score, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    def exhausted(self, patience: int) -> bool:
        """``patience`` eligible epochs in a row without improvement (never with ``patience=0``)."""
        return self.bad_epochs >= patience > 0

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "EarlyStopping":
        return cls(score=float(values["score"]), epoch=int(values["epoch"]), bad_epochs=int(values["bad_epochs"]))


def check_layout(ckpt: dict[str, Any], path: Path) -> None:
    """Raise :class:`CheckpointError` naming ``path`` and the fix unless ``ckpt`` has every entry
    of :data:`LAYOUT` with its type, a known format, and one history row per finished epoch."""
    version = ckpt.get("format", 1)
    if version not in (1, CHECKPOINT_FORMAT):
        raise CheckpointError(
            f"checkpoint {path} has layout format {version!r}, not one this program reads (1 or {CHECKPOINT_FORMAT}): "
            "resume it with the program that wrote it, or delete it to start over"
        )
    for key, kind in LAYOUT.items():
        if key not in ckpt:
            if version == 1 and key in _OPTIONAL_IN_FORMAT_1:
                continue
            raise CheckpointError(f"checkpoint {path} lacks its {key!r} entry: it is not a run's last.pt; delete it "
                                  "to start over")
        if not isinstance(ckpt[key], kind) or isinstance(ckpt[key], bool):
            raise CheckpointError(f"checkpoint {path}: its {key!r} entry is a {type(ckpt[key]).__name__}, not a "
                                  f"{getattr(kind, '__name__', kind)}; delete it to start over")
    if len(ckpt["history"]) != ckpt["epoch"] + 1:
        raise CheckpointError(f"checkpoint {path} holds {len(ckpt['history'])} history rows for {ckpt['epoch'] + 1} "
                              "finished epochs; delete it to start over")


def read_checkpoint(path: Path) -> dict[str, Any]:
    """``last.pt`` loaded without running code and checked with :func:`check_layout`."""
    ckpt = load_checkpoint(path)
    check_layout(ckpt, path)
    return ckpt


@dataclass
class RunState:
    """Everything a run carries from one epoch to the next; ``epoch`` is the next one to train (from 0)."""

    model: nn.Module
    weighting: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    controller: LambdaController | None
    guard: NonFiniteGuard
    early: EarlyStopping = field(default_factory=EarlyStopping)
    history: list[dict[str, Any]] = field(default_factory=list)
    epoch: int = 0

    def state_dict(self, config: RunConfig) -> dict[str, Any]:
        """The checkpoint: the entries of :data:`LAYOUT`, tensors and plain types only; the random
        generators' states are taken now."""
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "weighting": self.weighting.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "controller": None if self.controller is None else self.controller.state_dict(),
            "nonfinite": self.guard.state_dict(),
            "best": dataclasses.asdict(self.early),
            "epoch": self.epoch - 1,
            "history": self.history,
            "rng": rng_state(),
            "config": dataclasses.asdict(config),
        }

    def save(self, path: Path, config: RunConfig) -> None:
        """Write :meth:`state_dict` to ``path`` atomically."""
        atomic_save(self.state_dict(config), path)

    def load_state_dict(self, ckpt: dict[str, Any], path: Path) -> None:
        """Restore from a checkpoint read from ``path``; it is checked first (:func:`check_layout`),
        and one that does not fit this run's model or optimizer is a :class:`CheckpointError`."""
        check_layout(ckpt, path)
        try:
            self.model.load_state_dict(ckpt["model"])
            self.weighting.load_state_dict(ckpt["weighting"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.scaler.load_state_dict(ckpt["scaler"])
            if (self.controller is None) != (ckpt["controller"] is None):
                raise ValueError("the run has a λ controller and the checkpoint none, or the other way round")
            if self.controller is not None:
                self.controller.load_state_dict(ckpt["controller"])
            self.guard.load_state_dict(ckpt.get("nonfinite", {"skipped": 0, "consecutive": 0}))
            early = EarlyStopping.from_dict(ckpt["best"])
            set_rng_state(ckpt["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"checkpoint {path} does not fit this run ({exc}); delete it to start over") from exc
        self.early, self.history, self.epoch = early, list(ckpt["history"]), ckpt["epoch"] + 1
