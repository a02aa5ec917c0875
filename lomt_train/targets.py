"""A run's target: the :class:`lomt_kernels.LambdaController` that ``--target-sparsity`` or
``--target-macs`` asks for, built from the run's config."""

from __future__ import annotations

import torch

from lomt_kernels import LambdaController, MacFraction

from .config import RunConfig
from .models import MultiTaskModel

#: Epochs at the start of a target run during which λ keeps its starting value.
WARMUP_EPOCHS = 1


#: How near the target (a fraction of groups, or of the dense MACs) a step must end to start healing
#: early, and in how many epochs before the healing stretch at most.
SETTLE_TOLERANCE = 0.01
SETTLE_EPOCHS = 2


def healing_epochs(config: RunConfig) -> int:
    """The epochs of the healing stretch: ``healing_epochs``, or by default a fifth of the run."""
    if config.healing_epochs is not None:
        return config.healing_epochs
    return max(config.epochs // 5, 1)


def check_target(config: RunConfig) -> None:
    """Errors that name the bad target option and the fix; nothing to check without a target."""
    if config.target_sparsity is not None and config.target_macs is not None:
        raise ValueError("give --target-sparsity or --target-macs, not both")
    if config.target_sparsity is None and config.target_macs is None:
        if config.healing_epochs:
            raise ValueError("--healing-epochs needs a target (--target-sparsity or --target-macs)")
        return
    if config.target_sparsity is not None and not 0 < config.target_sparsity < 100:
        raise ValueError(f"--target-sparsity {config.target_sparsity}: give a percentage of groups, in (0, 100)")
    if config.target_macs is not None and not 0 < config.target_macs < 1:
        raise ValueError(f"--target-macs {config.target_macs}: give a fraction of the dense MACs, in (0, 1)")
    if config.prox not in ("group", "group_weighted"):
        raise ValueError(f"a target needs a group prox (--prox group or group_weighted), not {config.prox!r}")
    if config.lambda_ <= 0:
        raise ValueError(f"with a target, --lambda is the starting value of λ and must be > 0, not {config.lambda_}")
    if config.patience:
        raise ValueError("a target run follows a schedule to its last epoch: --patience must be 0 with a target")
    if healing_epochs(config) < 0 or WARMUP_EPOCHS + healing_epochs(config) >= config.epochs:
        raise ValueError(
            f"--epochs {config.epochs} leaves no epoch to steer λ after {WARMUP_EPOCHS} warm-up and "
            f"{healing_epochs(config)} healing epoch(s): train longer or pass a smaller --healing-epochs"
        )


def build_controller(
    config: RunConfig, model: MultiTaskModel, optimizer: torch.optim.Optimizer, device: torch.device,
    steps_per_epoch: int,
) -> LambdaController | None:
    """The controller of the backbone's prox groups, called after every step; ``None`` without a target.

    Warm-up and healing are whole epochs; healing may start up to :data:`SETTLE_EPOCHS` epochs
    early (fewer in a short run), on the first step that ends within :data:`SETTLE_TOLERANCE`
    of the target. The controller is called after every step rather than
    every epoch, so that λ follows the figure closely with a small gain per call.
    """
    if config.peer is not None or (config.target_sparsity is None and config.target_macs is None):
        return None
    if config.target_macs is not None:
        example = torch.zeros(1, 3, config.image_size, config.image_size, device=device)
        figure, target = MacFraction(model.backbone, example), config.target_macs
    else:
        figure, target = None, config.target_sparsity / 100.0
    settle = min(SETTLE_EPOCHS, config.epochs - WARMUP_EPOCHS - healing_epochs(config)) if healing_epochs(config) else 0
    return LambdaController(
        optimizer, target, config.epochs * steps_per_epoch, figure=figure, groups=[0],
        warmup=WARMUP_EPOCHS * steps_per_epoch - 1, healing=healing_epochs(config) * steps_per_epoch,
        settle=settle * steps_per_epoch, tolerance=SETTLE_TOLERANCE,
    )


def selectable(config: RunConfig, epoch: int, controller: LambdaController | None) -> bool:
    """Whether the model after ``epoch`` (from 0) may become ``best.pt``: any epoch without a
    target; with one, only those whose zero pattern is final (healing, or the last epoch)."""
    if epoch + 1 == config.epochs or (config.target_sparsity is None and config.target_macs is None):
        return True
    if controller is not None:
        return controller.phase == "healing"
    return epoch + 1 >= config.epochs - healing_epochs(config)  # a peer's healing starts on schedule


def target_label(config: RunConfig) -> str | None:
    """``"sparsity50"`` / ``"macs0.5"`` for a target run's folder and tables; ``None`` without a target."""
    if config.target_sparsity is not None:
        return f"sparsity{config.target_sparsity:g}"
    if config.target_macs is not None:
        return f"macs{config.target_macs:g}"
    return None
