"""Checkpoints load without running code, and carry the random state in plain types."""

import builtins
import random

import numpy as np
import pytest
import torch

from lomt_train.checkpoint import CheckpointError, atomic_save, load_checkpoint, rng_state, set_rng_state
from lomt_train.cli import main
from lomt_train.config import RunConfig
from lomt_train.trainer import run_dir_for

from test_trainer import TINY


class _CreatesAFile:
    """Unpickling this opens (so creates) ``path``: what a hostile checkpoint could do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return builtins.open, (self.path, "w")


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's legacy state
    atomic_save({"rng": rng_state()}, tmp_path / "ckpt.pt")
    expected = (random.random(), np.random.standard_normal(), np.random.random(), torch.rand(2))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(load_checkpoint(tmp_path / "ckpt.pt")["rng"])
    got = (random.random(), np.random.standard_normal(), np.random.random(), torch.rand(2))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": _CreatesAFile(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"evil\.pt was refused: it needs .*open"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def _run_folder(tmp_path, monkeypatch) -> tuple[RunConfig, list[str]]:
    """A run folder's config.json for the CLI flags returned, as a started run leaves it."""
    monkeypatch.setenv("LOMT_DATA_CACHE", str(tmp_path / "cache"))
    config = RunConfig(**{**TINY, "out": str(tmp_path / "runs")}, dataset="nyu", tasks=["seg"], lambda_=0.5)
    run_dir_for(config).mkdir(parents=True)
    (run_dir_for(config) / "config.json").write_text(config.to_json())
    flags = [
        "nyu", "--tasks", "seg", "--synthetic", "--lambda", "0.5", "--backend", "torch", "--backbone", "small",
        "--aspp-channels", "8", "--image-size", "32", "--batch-size", "4", "--epochs", "2", "--lr", "2e-3",
        "--synthetic-images", "8", "--device", "cpu", "--out", str(tmp_path / "runs"), "--no-progress",
    ]
    assert RunConfig.load(run_dir_for(config) / "config.json") == config
    return config, flags


@pytest.mark.parametrize("command", ["resume", "compact"])
def test_the_cli_refuses_a_crafted_checkpoint_with_no_side_effect(tmp_path, monkeypatch, capsys, command):
    config, flags = _run_folder(tmp_path, monkeypatch)
    run = run_dir_for(config)
    marker = tmp_path / "pwned"
    name = "last.pt" if command == "resume" else "best.pt"
    torch.save({"model": _CreatesAFile(marker), "epoch": 0}, run / name)
    before = sorted(p.name for p in run.iterdir())
    argv = [*flags, "--resume"] if command == "resume" else ["compact", str(run), "--image-size", "32"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lomt_train: error: checkpoint {run / name} was refused") and "Traceback" not in err
    assert not marker.exists()
    assert sorted(p.name for p in run.iterdir() if p.name != ".lock") == before
    assert not (tmp_path / "cache").exists()  # refused before any data was generated


def test_the_cli_names_a_truncated_checkpoint_and_a_broken_config(tmp_path, monkeypatch, capsys):
    config, flags = _run_folder(tmp_path, monkeypatch)
    run = run_dir_for(config)
    atomic_save({"epoch": 0, "model": {"w": torch.zeros(1000)}}, run / "last.pt")
    (run / "last.pt").write_bytes((run / "last.pt").read_bytes()[:300])
    assert main([*flags, "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lomt_train: error: checkpoint {run / 'last.pt'} could not be read") and err.count("\n") == 1
    (run / "last.pt").unlink()
    (run / "config.json").write_text('{"dataset": "nyu",\n oops}')
    assert main([*flags, "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lomt_train: error: {run / 'config.json'}: not a valid run config") and err.count("\n") == 1
    with pytest.raises(ValueError, match="not a valid run config"):
        main([*flags, "--resume", "--debug"])
