"""The multi-task experiments of *Less is More* and the LOMT models, on FusedGroupProxAdam.

The public surface: datasets (:func:`build_dataset` and the synthetic generators), models
(:func:`build_model`), the task registry (:func:`resolve_tasks`), loss weightings, metrics,
and runs (:class:`RunConfig`, :func:`train`, :func:`run_sweep`, :func:`write_report`).
"""

from .compaction import compact_model, load_compact
from .config import RunConfig
from .data import build_dataset, make_synthetic_celeba, make_synthetic_nyu
from .lomt import probe
from .losses import EqualWeighting, UncertaintyWeighting, build_weighting
from .metrics import delta_m
from .models import MultiTaskModel, build_model
from .report import write_report
from .tasks import Task, resolve_tasks
from .trainer import RunResult, run_sweep, train

__all__ = [
    "EqualWeighting",
    "MultiTaskModel",
    "RunConfig",
    "RunResult",
    "Task",
    "UncertaintyWeighting",
    "build_dataset",
    "build_model",
    "build_weighting",
    "compact_model",
    "delta_m",
    "load_compact",
    "make_synthetic_celeba",
    "make_synthetic_nyu",
    "probe",
    "resolve_tasks",
    "run_sweep",
    "train",
    "write_report",
]
