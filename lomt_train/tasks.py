"""The task registry: each task is one entry (name, aliases, kind, outputs, loss, metrics).

Adding a task means adding one :class:`Task` to :data:`TASKS` (and, for a new dataset task,
to the data package's task lists). Heads are chosen by ``kind`` in
:mod:`lomt_train.models`: ``"dense"`` tasks get a DeepLab-V3 head whose output is upsampled to
the image, ``"attribute"`` tasks the papers' classification head (one logit per image).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from .data.tasks import CELEBA_ATTRIBUTE_TASKS, CELEBA_TASKS, NYU_TASKS
from . import losses
from .losses import DEPTH_LOSS_MODES, binary_loss, normal_loss, seg_loss
from .metrics import BinaryMetric, DepthMetric, Metric, NormalMetric, SegMetric


@dataclass(frozen=True)
class Task:
    """One task of a multi-task model.

    Attributes:
        name: canonical name; also the key of the task's target in a batch.
        kind: ``"dense"`` (per-pixel output ``[B, C, H, W]``) or ``"attribute"`` (``[B]`` logit).
        loss: ``loss(pred, target) -> scalar`` on the model's raw output.
        metrics: factory of a fresh :class:`~lomt_train.metrics.Metric` accumulator.
        primary_metric: the name (among the metric's outputs) used to summarise the task.
        channels: output channels; ``None`` means one per segmentation class.
        aliases: other accepted names.
    """

    name: str
    kind: Literal["dense", "attribute"]
    loss: Callable[[Tensor, Tensor], Tensor]
    metrics: Callable[[], Metric]
    primary_metric: str
    channels: int | None = None
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("dense", "attribute"):
            raise ValueError(f"task {self.name!r}: kind must be 'dense' or 'attribute', got {self.kind!r}")
        if self.primary_metric not in self.metrics().directions:
            raise ValueError(f"task {self.name!r}: primary metric {self.primary_metric!r} is not one its metrics compute")

    def out_channels(self, num_classes: int) -> int:
        """Channels of the head's output for a dataset with ``num_classes`` segmentation classes."""
        return num_classes if self.channels is None else self.channels

    @property
    def higher_is_better(self) -> bool:
        """The direction of :attr:`primary_metric`."""
        return self.metrics().directions[self.primary_metric]


_ATTRIBUTE_ALIASES = {"smiling": ("smile",)}

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("seg", "dense", seg_loss, SegMetric, "miou", aliases=("semseg", "segmentation")),
        Task("depth", "dense", losses.depth_loss, DepthMetric, "abs_err", channels=1),
        Task("normal", "dense", normal_loss, NormalMetric, "cos_sim", channels=3, aliases=("normals",)),
        Task("edge", "dense", binary_loss, BinaryMetric, "f1", channels=1),
        *(
            Task(name, "attribute", binary_loss, BinaryMetric, "accuracy", channels=1,
                 aliases=_ATTRIBUTE_ALIASES.get(name, ()))
            for name in CELEBA_ATTRIBUTE_TASKS
        ),
    )
}

ALIASES: dict[str, str] = {alias: t.name for t in TASKS.values() for alias in t.aliases}

DATASET_TASKS: dict[str, tuple[str, ...]] = {"nyu": NYU_TASKS, "celeba": CELEBA_TASKS}


def canonical_name(name: str) -> str:
    """The canonical name for ``name`` (case-insensitive; aliases resolved)."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks are {sorted(TASKS)} (aliases: {ALIASES})")
    return key


def get_task(name: str) -> Task:
    """The registry entry for ``name`` or one of its aliases."""
    return TASKS[canonical_name(name)]


def resolve_tasks(names: str | Sequence[str], dataset: str, *, depth_loss: str = "mse") -> list[Task]:
    """The tasks ``names`` (a sequence, or one comma-separated string) for ``dataset``.

    ``dataset`` is ``"nyu"`` (seg, depth, normal, edge) or ``"celeba"`` (seg and the 40
    attributes). Aliases are accepted; a task named twice, an unknown name or a task the
    dataset does not provide raises ``ValueError`` listing the valid names.
    ``depth_loss`` chooses the depth loss: ``"mse"`` (the papers') or ``"l1"``.
    """
    if dataset not in DATASET_TASKS:
        raise ValueError(f"unknown dataset {dataset!r}; valid datasets are {sorted(DATASET_TASKS)}")
    if depth_loss not in DEPTH_LOSS_MODES:
        raise ValueError(f"unknown depth loss {depth_loss!r}; expected one of {DEPTH_LOSS_MODES}")
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    valid = DATASET_TASKS[dataset]
    if not names:
        raise ValueError(f"no tasks given; valid tasks for {dataset!r} are {list(valid)}")
    canonical = [canonical_name(n) for n in names]
    unavailable = [n for n, c in zip(names, canonical) if c not in valid]
    if unavailable:
        raise ValueError(f"task(s) {unavailable} not available for {dataset!r}; valid tasks are {list(valid)}")
    if len(set(canonical)) != len(canonical):
        raise ValueError(f"tasks {list(names)} name a task twice")
    tasks = [TASKS[c] for c in canonical]
    return [
        dataclasses.replace(t, loss=functools.partial(losses.depth_loss, mode=depth_loss)) if t.name == "depth" else t
        for t in tasks
    ]
