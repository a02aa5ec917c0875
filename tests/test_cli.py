"""The command line as the README uses it: ``--paper`` in a dry run, and the LOMT sequence."""

import json
import shlex
from pathlib import Path

import pytest

from lomt_train.cli import main
from lomt_train.config import PAPER_LAMBDAS, RunConfig

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


@pytest.mark.parametrize("dataset, tasks, patience", [("nyu", "seg,normal,depth", 25), ("celeba", "seg,male,smile", 10)])
def test_paper_dry_run_shows_no_augmentation_early_stopping_and_the_lambdas(tmp_path, capsys, dataset, tasks, patience):
    argv = [dataset, "--tasks", tasks, "--synthetic", "--paper", "--out", str(tmp_path / "runs"), "--dry-run"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    plan = json.loads(printed)
    assert '"augment": false' in printed
    assert plan["early_stopping"] == {"enabled": True, "patience": patience, "criterion": "val_loss", "max_epochs": 1000}
    assert plan["config"]["patience"] == patience and plan["config"]["lr_schedule"] == "none"
    assert plan["lambdas"] == PAPER_LAMBDAS[dataset] and plan["seeds"] == [0, 1, 2, 3, 4]
    assert len(plan["runs"]) == len(set(plan["runs"])) == 5 * len(PAPER_LAMBDAS[dataset])
    assert not (tmp_path / "runs").exists()
    # An explicit flag still wins over the preset.
    assert main([*argv, "--lambda", "1e-3", "--patience", "0"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["lambdas"] == [1e-3] and plan["early_stopping"]["enabled"] is False


# The README's LOMT sequence, verbatim, run in a fresh folder with tiny settings appended (later flags win).
DEMO = "lomt_train nyu --tasks seg,normal,depth --synthetic --seeds 0 1 --out runs/mtl"
PROBE = ("lomt_train lomt-probe nyu --tasks seg,normal,depth --synthetic --lambda 1e-2 --seeds 0 1 --threshold 0.25"
         " --out runs/probe")
STEP_2 = "lomt_train nyu --tasks seg,normal,depth --synthetic --seeds 0 1 --lomt runs/probe/profile.json --out runs/lomt"
TINY = ["--backend", "torch", "--aspp-channels", "8", "--image-size", "32", "--batch-size", "4", "--epochs", "1",
        "--synthetic-images", "8", "--device", "cpu", "--no-progress"]


@pytest.mark.slow
def test_the_readme_lomt_sequence_runs_end_to_end(tmp_path, monkeypatch, capsys):
    for command in (DEMO, PROBE, STEP_2):
        assert command in README, f"the README no longer shows {command!r}: update this test with it"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOMT_DATA_CACHE", str(tmp_path / "cache"))
    for command in (DEMO, PROBE, STEP_2):
        assert main([*shlex.split(command)[1:], *TINY]) == 0, capsys.readouterr().err
    configs = [RunConfig.load(path) for path in (tmp_path / "runs").glob("*/nyu-seg+normal+depth/*/seed0/config.json")]
    assert len(configs) == 2  # the multi-task model and the LOMT model, each in its own folder
    profile = json.loads((tmp_path / "runs" / "probe" / "profile.json").read_text())
    assert sorted(c.attach for c in configs if c.attach) == [profile["attach"]]
    # The report keeps them apart: two rows, not two seeds of one.
    assert main(["report", "runs", "--out", "report"]) == 0
    rows = (tmp_path / "report" / "table.csv").read_text().splitlines()
    assert sum(line.startswith("nyu-seg+normal+depth,") for line in rows) == 2
