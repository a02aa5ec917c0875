"""Model selection: the score each epoch's model gets on the validation split (lower is better).

The trainer keeps the epoch with the lowest score as ``best.pt`` (the model tested once) and
stops early after ``config.patience`` epochs without a lower one. ``config.criterion`` names
the rule:

``"val_loss"``
    ``score = sum_t L_t``: the unweighted sum of the tasks' mean validation losses (the losses
    the tasks train with, without the learned task weights or the sparsity penalty). This is
    also what the published code of *Less is More* monitors for early stopping and its
    multi-task checkpoint: its ``vloss['total']`` is ``sum_t (exp(-s_t) L_t + s_t)``, and its
    log-variances ``s_t`` are never handed to an optimizer, so they stay at 1 and the total is
    ``e^-1 sum_t L_t + T``, an increasing function of this score (same best epoch, same patience
    count). ``--paper`` names it explicitly.

The published code also kept one checkpoint per task (each task's own validation loss) and read
each task's test figures off its own checkpoint; one model per run cannot do that, and the
README's ``--paper`` table lists it as a difference.
"""

from __future__ import annotations

from typing import Callable, Mapping

from .config import RunConfig


def _sum_of_losses(val_losses: Mapping[str, float], val_metrics: Mapping[str, Mapping[str, float]]) -> float:
    return float(sum(val_losses.values()))


# One entry per criterion: name -> score from (per-task validation losses, per-task metrics).
CRITERIA: dict[str, Callable[[Mapping[str, float], Mapping[str, Mapping[str, float]]], float]] = {
    "val_loss": _sum_of_losses,
}


def check_criterion(config: RunConfig) -> None:
    """Raise ``ValueError`` naming the known criteria when ``config.criterion`` is not one."""
    if config.criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {config.criterion!r}: expected one of {sorted(CRITERIA)}")


def selection_score(
    config: RunConfig, val_losses: Mapping[str, float], val_metrics: Mapping[str, Mapping[str, float]]
) -> float:
    """The validation score of one epoch's model under ``config.criterion`` (lower is better).

    Args:
        config: the run; ``config.criterion`` picks the rule (module docstring).
        val_losses: ``{task: mean validation loss}`` over the whole validation split.
        val_metrics: ``{task: {metric: value}}`` over the same split.
    """
    check_criterion(config)
    return CRITERIA[config.criterion](val_losses, val_metrics)
