"""A run's state round-trips through last.pt exactly; foreign, tampered or newer checkpoints are refused."""

import dataclasses
import math
import random

import pytest
import torch

from lomt_train.checkpoint import CheckpointError, atomic_save, load_checkpoint
from lomt_train.config import RunConfig
from lomt_train.distributed import DistContext
from lomt_train.run_state import CHECKPOINT_FORMAT, LAYOUT, EarlyStopping, RunState, check_layout, read_checkpoint
from lomt_train.runtime import runtime_for
from lomt_train.tasks import resolve_tasks
from lomt_train.trainer import build_state, run_dir_for, train

from test_trainer import TINY, _config, train_epochs


def _state(config: RunConfig, seed: int) -> RunState:
    torch.manual_seed(seed)
    tasks = resolve_tasks(config.tasks, config.dataset)
    return build_state(config, tasks, 5, DistContext(), runtime_for(config, torch.device("cpu")), steps_per_epoch=2)


def _advanced(config: RunConfig) -> RunState:
    """A state one optimizer step, one scheduler step and one epoch of bookkeeping from fresh."""
    state = _state(config, seed=0)
    images = torch.randn(2, 3, 32, 32)
    loss = sum(out.square().mean() for out in state.model(images).values()) + state.weighting.log_vars.sum()
    loss.backward()
    state.optimizer.step()
    state.scheduler.step()
    state.guard.skipped, state.guard.consecutive = 3, 1
    state.early = EarlyStopping(score=1.5, epoch=0, bad_epochs=0)
    state.history, state.epoch = [{"epoch": 1, "val_loss": {"seg": 1.5}}], 1
    return state


def _assert_same(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}/{i}")
    else:
        assert a == b, where


@pytest.fixture(autouse=True)
def _data_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOMT_DATA_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def config(tmp_path):
    return RunConfig(**{**TINY, "out": str(tmp_path / "runs")}, dataset="nyu", tasks=["seg", "depth"], lambda_=0.1)


def test_save_then_load_restores_every_entry_and_the_random_state(tmp_path, config):
    state = _advanced(config)
    random.seed(5), torch.manual_seed(5)
    state.save(tmp_path / "last.pt", config)
    expected_draws = (random.random(), torch.rand(3))
    saved = read_checkpoint(tmp_path / "last.pt")
    assert set(saved) == set(LAYOUT) and saved["format"] == CHECKPOINT_FORMAT and saved["epoch"] == 0

    fresh = _state(config, seed=1)  # other initial weights: the load must overwrite them
    random.seed(9), torch.manual_seed(9)
    fresh.load_state_dict(saved, tmp_path / "last.pt")
    assert random.random() == expected_draws[0] and torch.equal(torch.rand(3), expected_draws[1])
    assert fresh.epoch == 1 and fresh.early == state.early and fresh.history == state.history
    assert (fresh.guard.skipped, fresh.guard.consecutive) == (3, 1)
    again = fresh.state_dict(config)
    for key in set(LAYOUT) - {"rng"}:
        _assert_same(again[key], saved[key], key)


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda c: c.pop("optimizer"), r"lacks its 'optimizer' entry"),
        (lambda c: c.update(history="rows"), r"its 'history' entry is a str, not a list"),
        (lambda c: c.update(epoch=True), r"its 'epoch' entry is a bool"),
        (lambda c: c.update(epoch=4), r"holds 1 history rows for 5 finished epochs"),
        (lambda c: c.update(format=CHECKPOINT_FORMAT + 1), rf"layout format {CHECKPOINT_FORMAT + 1}, not one this program reads"),
        (lambda c: c["best"].pop("bad_epochs"), r"does not fit this run \('bad_epochs'\)"),
    ],
)
def test_a_tampered_checkpoint_is_refused_naming_the_file_and_the_fix(tmp_path, config, tamper, message):
    ckpt = _advanced(config).state_dict(config)
    tamper(ckpt)
    atomic_save(ckpt, tmp_path / "last.pt")
    target = _state(config, seed=1)
    before = {k: v.clone() for k, v in target.model.state_dict().items()}
    with pytest.raises(CheckpointError, match=message) as caught:
        target.load_state_dict(load_checkpoint(tmp_path / "last.pt"), tmp_path / "last.pt")
    assert str(tmp_path / "last.pt") in str(caught.value)
    assert "delete it to start over" in str(caught.value) or "the program that wrote it" in str(caught.value)
    if "does not fit" not in message:  # a layout error is found before anything is restored
        _assert_same(target.model.state_dict(), before)


def test_a_checkpoint_of_another_run_does_not_fit(tmp_path, config):
    other = dataclasses.replace(config, tasks=["seg", "normal", "depth"])
    atomic_save(_advanced(other).state_dict(other), tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match=r"(?s)last\.pt does not fit this run \(.*Unexpected key.*\); delete it to start over"):
        _state(config, seed=1).load_state_dict(read_checkpoint(tmp_path / "last.pt"), tmp_path / "last.pt")
    target = dataclasses.replace(config, target_sparsity=50.0, epochs=6)
    with pytest.raises(CheckpointError, match="λ controller"):
        _state(target, seed=1).load_state_dict(_advanced(config).state_dict(config), tmp_path / "last.pt")


def test_a_checkpoint_from_before_the_format_was_recorded_still_loads(tmp_path, config):
    ckpt = _advanced(config).state_dict(config)
    for key in ("format", "nonfinite"):  # format 1: neither was written by the first runs
        del ckpt[key]
    check_layout(ckpt, tmp_path / "last.pt")
    fresh = _state(config, seed=1)
    fresh.load_state_dict(ckpt, tmp_path / "last.pt")
    assert fresh.epoch == 1 and fresh.guard.skipped == 0
    _assert_same(fresh.model.state_dict(), ckpt["model"])


def test_early_stopping_keeps_the_best_score_and_counts_the_epochs_since():
    early = EarlyStopping()
    assert [early.update(score, epoch) for epoch, score in enumerate([3.0, 2.0, 2.0, math.nan, 2.5])] == [
        True, True, False, False, False,
    ]
    assert (early.score, early.epoch, early.bad_epochs) == (2.0, 1, 3)
    assert early.exhausted(3) and not early.exhausted(4) and not early.exhausted(0)
    assert EarlyStopping.from_dict(dataclasses.asdict(early)) == early


def test_resume_refuses_a_tampered_last_pt_before_generating_data(tmp_path, monkeypatch):
    config = _config(tmp_path, dataset="nyu", tasks=["seg"], epochs=2)
    train_epochs(config, 1)
    last = run_dir_for(config) / "last.pt"
    ckpt = load_checkpoint(last)
    ckpt["history"] = ckpt["history"] * 2
    atomic_save(ckpt, last)
    monkeypatch.setenv("LOMT_DATA_CACHE", str(tmp_path / "fresh-cache"))
    with pytest.raises(CheckpointError, match=r"holds 2 history rows for 1 finished epochs"):
        train(config, progress=False, resume=True)
    assert not (tmp_path / "fresh-cache").exists()
