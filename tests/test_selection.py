"""Model selection: the validation score, and that it is the published code's rule."""

import dataclasses
import math

import pytest

from lomt_train.cli import main
from lomt_train.config import RunConfig
from lomt_train.selection import selection_score

CONFIG = RunConfig(dataset="nyu", tasks=["seg", "normal", "depth"], synthetic=True)
# Per-epoch validation losses, made up so that the sum's best epoch is not any one task's best.
EPOCHS = [
    {"seg": 2.0, "normal": 0.50, "depth": 1.0},
    {"seg": 1.5, "normal": 0.55, "depth": 1.2},
    {"seg": 1.6, "normal": 0.40, "depth": 0.9},
    {"seg": 1.4, "normal": 0.60, "depth": 1.1},
]


def test_val_loss_is_the_sum_of_the_tasks_validation_losses():
    assert [selection_score(CONFIG, losses, {}) for losses in EPOCHS] == pytest.approx([3.5, 3.25, 2.9, 3.1], abs=1e-12)


def test_val_loss_picks_the_epochs_the_published_code_picks():
    # The published code monitors sum_t (exp(-s_t) L_t + s_t) with its log-variances s_t fixed at 1.
    published = [sum(math.exp(-1.0) * loss + 1.0 for loss in losses.values()) for losses in EPOCHS]
    ours = [selection_score(CONFIG, losses, {}) for losses in EPOCHS]
    assert sorted(range(len(EPOCHS)), key=ours.__getitem__) == sorted(range(len(EPOCHS)), key=published.__getitem__)


def test_an_unknown_criterion_is_named_with_the_known_ones(capsys):
    with pytest.raises(ValueError, match=r"unknown criterion 'val_acc': expected one of \['val_loss'\]"):
        selection_score(dataclasses.replace(CONFIG, criterion="val_acc"), EPOCHS[0], {})
    with pytest.raises(SystemExit):
        main(["nyu", "--tasks", "seg", "--synthetic", "--criterion", "val_acc", "--dry-run"])
    assert "invalid choice: 'val_acc'" in capsys.readouterr().err
