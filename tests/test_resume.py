"""--resume continues a run only with its own options, and says when there is nothing to do."""

import dataclasses

import pytest

from lomt_train.checkpoint import atomic_save, load_checkpoint
from lomt_train.cli import main
from lomt_train.trainer import run_dir_for, train

from test_trainer import _config, train_epochs


@pytest.fixture
def stopped(tmp_path):
    """A run stopped after its first of two epochs."""
    config = _config(tmp_path, dataset="nyu", tasks=["seg"], epochs=2)
    train_epochs(config, 1)
    return config


def test_other_options_are_refused_naming_each_key(stopped):
    # Options outside the run's identity (run_identity.NOT_IDENTITY) lead to the same folder.
    changed = dataclasses.replace(stopped, workers=1, timing_repeats=3)
    assert run_dir_for(changed) == run_dir_for(stopped)
    with pytest.raises(ValueError, match=r"differ from .*config\.json: workers 1 \(saved None\), timing_repeats 3 \(saved 1\)"):
        train(changed, progress=False, resume=True)


def test_an_option_of_the_identity_resumes_nothing_of_another_run(stopped):
    # More epochs (or any identity option) is another experiment: its own folder, the stopped run untouched.
    longer = dataclasses.replace(stopped, epochs=3)
    assert run_dir_for(longer) != run_dir_for(stopped)
    before = (run_dir_for(stopped) / "last.pt").read_bytes()
    result = train(longer, progress=False, resume=True)
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    assert (run_dir_for(stopped) / "last.pt").read_bytes() == before


def test_paths_are_compared_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = _config(tmp_path, dataset="nyu", tasks=["seg"], epochs=2, out="relrun")
    train_epochs(config, 1)
    result = train(dataclasses.replace(config, out="./relrun"), progress=False, resume=True)
    assert [row["epoch"] for row in result.history] == [1, 2]


def test_without_config_json_the_checkpoint_holds_the_options(stopped):
    run = run_dir_for(stopped)
    (run / "config.json").unlink()
    with pytest.raises(ValueError, match=r"differ from .*last\.pt: timing_repeats 3 \(saved 1\)"):
        train(dataclasses.replace(stopped, timing_repeats=3), progress=False, resume=True)
    ckpt = load_checkpoint(run / "last.pt")
    del ckpt["config"]  # as a checkpoint that records no options
    atomic_save(ckpt, run / "last.pt")
    with pytest.raises(ValueError, match="options are unknown and it cannot be resumed"):
        train(stopped, progress=False, resume=True)


def test_orphan_temporary_files_are_removed_on_the_next_start(stopped):
    run = run_dir_for(stopped)
    orphans = [run / ".last.pt.k1ll3d.tmp", run / ".history.csv.tmp"]
    for orphan in orphans:
        orphan.write_bytes(b"\0" * 1000)  # a write cut short by SIGKILL
    train(stopped, progress=False, resume=True)
    assert not any(orphan.exists() for orphan in orphans)
    assert not list(run.glob(".*.tmp"))


def test_a_finished_run_says_so_and_still_checks_the_options(tmp_path, capsys):
    out = tmp_path / "runs"
    flags = [
        "nyu", "--tasks", "seg", "--synthetic", "--backend", "torch", "--image-size", "32", "--batch-size", "4",
        "--epochs", "1", "--aspp-channels", "8", "--synthetic-images", "8", "--device", "cpu", "--no-progress",
        "--out", str(out),
    ]
    assert main(flags) == 0
    (results,) = out.rglob("results.json")
    before = results.read_bytes()
    capsys.readouterr()
    assert main([*flags, "--resume"]) == 0
    assert f"{results.parent} is finished (results.json): nothing to resume" in capsys.readouterr().out
    assert main([*flags, "--resume", "--workers", "1", "--max-nonfinite-steps", "9"]) == 2
    assert "workers 1 (saved None), max_nonfinite_steps 9 (saved 5)" in capsys.readouterr().err
    assert results.read_bytes() == before
