"""Run identity: which config fields make a run folder, and the older layout's folders."""

import dataclasses

import pytest
import torch

from lomt_train.checkpoint import atomic_save
from lomt_train.config import RunConfig
from lomt_train.resume import check_resume
from lomt_train.run_identity import NOT_IDENTITY, identity, identity_hash, legacy_run_dir, run_dir_for

BASE = RunConfig(dataset="nyu", tasks=["seg", "depth"], synthetic=True, lambda_=0.01, out="runs")


def _changed(value):
    """A value of the same kind that differs from ``value``."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return [*value, "normal" if value and isinstance(value[0], str) else 2]
    if isinstance(value, dict):
        return {**value, "seg": "layer3"}
    return 3  # None: any value is a change


FIELDS = [f.name for f in dataclasses.fields(RunConfig)]


@pytest.mark.parametrize("name", [n for n in FIELDS if n not in NOT_IDENTITY])
def test_every_identity_field_changes_the_run_folder(name):
    other = dataclasses.replace(BASE, **{name: _changed(getattr(BASE, name))})
    assert identity_hash(other) != identity_hash(BASE)
    assert run_dir_for(other).parent != run_dir_for(BASE).parent


@pytest.mark.parametrize("name", sorted(NOT_IDENTITY - {"seed", "out"}))
def test_where_and_how_a_run_executes_keep_its_folder(name):
    other = dataclasses.replace(BASE, **{name: _changed(getattr(BASE, name))})
    assert run_dir_for(other) == run_dir_for(BASE)


def test_seeds_are_repeats_in_one_folder_and_the_name_is_readable():
    a, b = run_dir_for(BASE), run_dir_for(dataclasses.replace(BASE, seed=1))
    assert a.parent == b.parent and (a.name, b.name) == ("seed0", "seed1")
    assert a.parent.parent.name == "nyu-seg+depth"
    assert a.parent.name == f"group_weighted-lambda0.01-{identity_hash(BASE)}"
    lomt = run_dir_for(dataclasses.replace(BASE, attach={"seg": "layer3"}))
    assert lomt.parent.name.startswith("group_weighted-lambda0.01-attach-")
    target = run_dir_for(dataclasses.replace(BASE, target_sparsity=50.0))
    assert target.parent.name.startswith("group_weighted-sparsity50-")


def test_only_fields_off_their_default_enter_the_identity():
    # So a field added to RunConfig with a default keeps every existing run's folder.
    assert identity(RunConfig(dataset="nyu", tasks=["seg"])) == {"dataset": "nyu", "tasks": ["seg"]}
    assert identity(BASE) == {"dataset": "nyu", "tasks": ["seg", "depth"], "synthetic": True, "lambda_": 0.01}


def test_a_run_in_the_older_layout_is_named_with_the_move_that_adopts_it(tmp_path):
    config = dataclasses.replace(BASE, out=str(tmp_path / "runs"))
    old = legacy_run_dir(config)
    assert old == tmp_path / "runs" / "nyu-seg+depth" / "group_weighted-lambda0.01" / "seed0"
    old.mkdir(parents=True)
    atomic_save({"epoch": 0}, old / "last.pt")
    new = run_dir_for(config)
    for resume in (False, True):
        with pytest.raises(FileExistsError, match="older folder layout") as error:
            check_resume(config, new, resume=resume)
        assert f"mv {old} {new}" in str(error.value)
    # Once the new folder holds the run, the old one no longer matters.
    new.mkdir(parents=True)
    (new / "config.json").write_text(config.to_json())
    atomic_save({"epoch": 0, "config": dataclasses.asdict(config)}, new / "last.pt")
    assert check_resume(config, new, resume=True)["epoch"] == 0
    assert torch.load(old / "last.pt", weights_only=True) == {"epoch": 0}  # left untouched
