"""The configuration of one training run, and the presets that fill it."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Fields that hold paths: compared after resolving, so ``./runs`` and ``runs`` are one folder.
PATH_FIELDS = ("data", "out", "weights")


@dataclass
class RunConfig:
    """Everything that determines a run. Saved as ``config.json`` in the run folder.

    ``lambda_`` and ``seed`` are single values here; sweeps expand into one config per run.
    With ``target_sparsity`` (percent of the backbone's conv groups at zero) or ``target_macs``
    (the compacted backbone's MACs as a fraction of the dense one's), ``lambda_`` is only the
    starting value of a :class:`lomt_kernels.LambdaController`, and the last
    ``healing_epochs`` (default: a fifth of the epochs; 0: none) fine-tune with the zero groups
    frozen. ``peer="pat"`` reaches ``target_sparsity`` with torchao's PAT instead (:mod:`lomt_train.pat`).

    ``amp`` (mixed precision), ``amp_dtype`` (``"bfloat16"`` or ``"float16"``), ``channels_last``
    and ``workers`` (DataLoader processes) are ``None`` for auto: decided from the device by
    :func:`lomt_train.runtime.resolve_runtime` (on CUDA: bf16 where supported, channels_last,
    workers and pinned memory; on the CPU: none of them) and recorded in ``results.json``.

    ``criterion`` names the validation score that selects the tested epoch and, with
    ``patience`` > 0, stops training after that many epochs without a better one
    (:mod:`lomt_train.selection`). Which fields make two runs different experiments, and so
    different folders, is :mod:`lomt_train.run_identity`'s rule.
    """

    dataset: str
    tasks: list[str]
    data: str | None = None
    synthetic: bool = False
    layout: str | None = None
    out: str = "runs"
    lambda_: float = 0.0
    target_sparsity: float | None = None
    target_macs: float | None = None
    healing_epochs: int | None = None
    peer: str | None = None
    prox: str = "group_weighted"
    grouping: str = "in_channel"
    seed: int = 0
    epochs: int = 30
    batch_size: int = 16
    lr: float = 1e-4
    lr_schedule: str = "cosine"
    weight_decay: float = 0.0
    patience: int = 0
    criterion: str = "val_loss"
    image_size: int = 256
    augment: bool = False
    backbone: str = "resnet50"
    weights: str | None = None
    aspp_channels: int | None = None
    attach: dict[str, str] = field(default_factory=dict)
    weighting: str = "uncertainty"
    depth_loss: str = "mse"
    device: str = "auto"
    backend: str = "auto"
    amp: bool | None = None
    amp_dtype: str | None = None
    channels_last: bool | None = None
    workers: int | None = None
    synthetic_images: int = 96
    timing_batch_sizes: list[int] = field(default_factory=lambda: [1])
    timing_repeats: int = 10
    max_nonfinite_steps: int = 5

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RunConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}; known keys are {sorted(known)}")
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        """Read a ``config.json``; any problem is a ``ValueError`` that names the file."""
        try:
            values = json.loads(Path(path).read_text())
            if not isinstance(values, dict):
                raise ValueError(f"expected a JSON object, got {type(values).__name__}")
            return cls.from_dict(values)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: not a valid run config ({exc}); fix or delete it") from exc

    def differences(self, other: "RunConfig") -> dict[str, tuple[Any, Any]]:
        """``{key: (self's value, other's value)}`` for every field that differs, paths compared
        after resolving against the current folder."""
        def normal(name: str, value: Any) -> Any:
            return str(Path(value).resolve()) if name in PATH_FIELDS and value is not None else value

        return {
            f.name: (getattr(self, f.name), getattr(other, f.name))
            for f in dataclasses.fields(self)
            if normal(f.name, getattr(self, f.name)) != normal(f.name, getattr(other, f.name))
        }


# The papers' protocol (``--paper``): the paper where it speaks, the published code
# (github.com/ricupa/Less-is-More-Towards-parsimonious-multi-task-models-using-structured-sparsity)
# where the paper is silent. Each choice, its source and where we differ: the README's
# ``--paper`` table. Adam at 1e-4 held constant, 256x256 inputs, the prox on the backbone's conv
# weights, uncertainty weighting, the dilated ResNet-50, no augmentation (its transforms only
# resize), up to 1000 epochs with early stopping on the validation loss.
PAPER_PRESET: dict[str, Any] = {
    "lr": 1e-4,
    "image_size": 256,
    "backbone": "resnet50",
    "weighting": "uncertainty",
    "prox": "group_weighted",
    "lr_schedule": "none",
    "augment": False,
    "epochs": 1000,
    "criterion": "val_loss",
}
PAPER_BATCH_SIZE = {"nyu": 16, "celeba": 32}
# ``earlystop_patience`` of the published configs (exp_single_mtl_NYU.yaml, exp_single_multi_celebA.yaml).
PAPER_PATIENCE = {"nyu": 25, "celeba": 10}
PAPER_SEEDS = [0, 1, 2, 3, 4]
# The λ values the published code names; the paper's Table 1/2 values could not be read here, so
# these are the code's: λ = 0 is the dense model (``group_sparsity: False``); NYU's 1e-6 is its
# config's and 1e-5 the λ of its article runs (``*_1e-5_trial_*`` in trial_for_article.py);
# CelebA's list is its config's ``lambda_list`` (the config's active λ, 1e-5, among them).
PAPER_LAMBDAS = {"nyu": [0.0, 1e-6, 1e-5], "celeba": [0.0, 1e-6, 1e-5, 1e-4]}

# The built-in synthetic data: small images and a small backbone so that a run shows
# learning and sparsity within minutes on two CPU cores.
SYNTHETIC_PRESET: dict[str, Any] = {
    "lambda_": 1e-2,
    "image_size": 64,
    "backbone": "small",
    "aspp_channels": 32,
    "batch_size": 16,
    "lr": 2e-3,
    "epochs": 8,
    "lr_schedule": "cosine",
}
