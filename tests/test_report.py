"""``lomt_train report`` on hand-made run folders: what is a row, the λ-to-sparsity curve, the
comparison with the papers at matched sparsity, and folders of the older layout."""

import csv
import dataclasses
import json
from pathlib import Path

import pytest

from lomt_train.config import RunConfig
from lomt_train.report import write_report
from lomt_train.run_identity import legacy_run_dir, run_dir_for

THREE = ["seg", "normal", "depth"]


def _fake_run(out: Path, config: RunConfig, group_sparsity: float, metrics=None, folder: Path | None = None) -> Path:
    """A finished run's files as the trainer writes them, with the given figures (no training)."""
    config = dataclasses.replace(config, out=str(out))
    run = folder or run_dir_for(config)
    run.mkdir(parents=True)
    metrics = metrics or {task: {"miou": 0.5, "cos_sim": 0.5, "abs_err": 1.0}[_primary(task)] for task in config.tasks}
    test = {task: {_primary(task): value} for task, value in metrics.items()}
    layers = [{"name": "backbone.conv1.weight", "shape": [8, 3, 3, 3], "groups": 3, "zero_groups": 0},
              {"name": "backbone.layer1.0.conv1.weight", "shape": [8, 8, 3, 3], "groups": 8,
               "zero_groups": round(8 * group_sparsity / 100)}]
    files = {
        "config.json": json.loads(config.to_json()),
        "results.json": {"best_epoch": 1, "test_split": "test", "test": test, "group_sparsity": group_sparsity,
                         "param_sparsity": group_sparsity / 2, "mac_fraction": 1 - group_sparsity / 100,
                         "lambda_": config.lambda_, "seed": config.seed, "tasks": config.tasks},
        "history.json": [{"epoch": 1, "group_sparsity": group_sparsity, "lambda_": config.lambda_,
                          **({"target": {"figure": group_sparsity / 100}} if config.target_sparsity else {})}],
        "sparsity.json": {"layers": layers},
        "timing.json": {part: [{"batch_size": 1, "median_ms": 1.0}] for part in ("backbone", "model")},
    }
    for name, value in files.items():
        (run / name).write_text(json.dumps(value))
    return run


def _primary(task: str) -> str:
    return {"seg": "miou", "normal": "cos_sim", "depth": "abs_err"}[task]


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


BASE = RunConfig(dataset="nyu", tasks=["seg", "depth"], synthetic=True, lambda_=0.01)


def test_runs_that_differ_in_any_option_are_separate_rows_and_only_seeds_repeat(tmp_path):
    out = tmp_path / "runs"
    for seed in (0, 1):
        _fake_run(out, dataclasses.replace(BASE, seed=seed), 40.0)
    variants = {"weighting=equal": dict(weighting="equal"), "epochs=20": dict(epochs=20),
                "augment=True": dict(augment=True), "attach={seg:layer3}": dict(attach={"seg": "layer3"})}
    for overrides in variants.values():
        _fake_run(out, dataclasses.replace(BASE, **overrides), 40.0)
    write_report([out], tmp_path / "report")
    rows = _csv(tmp_path / "report" / "table.csv")
    assert len(rows) == 1 + len(variants)
    assert len({row["identity"] for row in rows}) == len(rows)
    seeds = {row["differs"]: row["seeds"] for row in rows}
    for label in variants:
        assert sum(label in differs for differs in seeds) == 1, (label, seeds)
    (base,) = [row for row in rows if row["seeds"] == "2"]  # the two seeds of one config are one row
    assert "weighting=uncertainty" in base["differs"] and "epochs=30" in base["differs"]
    assert list(base)[:7] == ["experiment", "setting", "differs", "identity", "seeds",
                              "λ (target runs: learned, at the end)", "group_sparsity %"]  # sparsity beside λ


def test_the_same_run_twice_is_refused_rather_than_averaged(tmp_path):
    a = _fake_run(tmp_path / "a", BASE, 40.0)
    b = _fake_run(tmp_path / "b", BASE, 40.0)
    with pytest.raises(ValueError, match="same run"):
        write_report([a, b], tmp_path / "report")


def test_a_run_in_the_older_layout_joins_its_seeds(tmp_path):
    out = tmp_path / "runs"
    old = dataclasses.replace(BASE, out=str(out))
    _fake_run(out, old, 40.0, folder=legacy_run_dir(old))
    _fake_run(out, dataclasses.replace(BASE, seed=1), 42.0)
    write_report([out], tmp_path / "report")
    (row,) = _csv(tmp_path / "report" / "table.csv")
    assert row["seeds"] == "2" and row["group_sparsity %"] == "41.0 ± 1.4"


def test_lambda_to_sparsity_csv_and_png_from_whatever_runs_are_given(tmp_path):
    out = tmp_path / "runs"
    figures = {0.0: 0.0, 1e-3: 20.0, 1e-2: 60.0}
    for lam, sparsity in figures.items():
        for seed in (0, 1):
            _fake_run(out, dataclasses.replace(BASE, lambda_=lam, seed=seed), sparsity + seed)
    _fake_run(out, dataclasses.replace(BASE, lambda_=1e-2, weighting="equal"), 70.0)
    _fake_run(out, dataclasses.replace(BASE, target_sparsity=50.0), 50.0)  # a learned λ: not on the curve
    written = write_report([out], tmp_path / "report")
    lines = _csv(tmp_path / "report" / "lambda_sparsity.csv")
    assert len(lines) == 7
    assert {(line["lambda"], line["seed"], line["group_sparsity %"]) for line in lines if "equal" not in line["family"]} == {
        (f"{lam:g}", str(seed), f"{sparsity + seed:.2f}") for lam, sparsity in figures.items() for seed in (0, 1)}
    assert tmp_path / "report" / "lambda_sparsity.png" in written
    assert (tmp_path / "report" / "lambda_sparsity.png").stat().st_size > 0


def test_the_papers_point_is_matched_by_group_sparsity_not_by_lambda(tmp_path):
    out = tmp_path / "runs"
    three = RunConfig(dataset="nyu", tasks=THREE, synthetic=True)
    dense = {"seg": 0.30, "normal": 0.60, "depth": 1.00}
    runs = {0.0: (0.0, dense), 1e-5: (5.0, dense),  # the paper's λ, here nowhere near its sparsity
            1e-2: (68.0, {"seg": 0.31, "normal": 0.61, "depth": 0.95}),
            1e-1: (90.0, {"seg": 0.20, "normal": 0.50, "depth": 1.50})}
    for lam, (sparsity, metrics) in runs.items():
        _fake_run(out, dataclasses.replace(three, lambda_=lam), sparsity, metrics)
    # A second family (other weighting) whose nearest run is worse on depth.
    for lam, (sparsity, metrics) in {0.0: (0.0, dense), 3e-3: (72.0, {**dense, "seg": 0.35, "depth": 1.10})}.items():
        _fake_run(out, dataclasses.replace(three, lambda_=lam, weighting="equal"), sparsity, metrics)
    write_report([out], tmp_path / "report")
    rows = {row["family"]: row for row in _csv(tmp_path / "report" / "paper_comparison.csv")}
    assert len(rows) == 2
    ours = rows["weighting=uncertainty"]
    assert ours["ours: λ"] == "0.01" and ours["ours: group sparsity %"] == "68.0" and ours["holds here"] == "yes"
    assert ours["depth abs_err: sparse vs dense"] == "0.95 vs 1" and ours["data"] == "synthetic"
    assert rows["weighting=equal"]["holds here"] == "no (not better on depth, normal)"
    assert "matched by group sparsity" in (tmp_path / "report" / "paper_comparison.md").read_text()


def test_without_a_matching_experiment_the_comparison_says_what_it_needs(tmp_path):
    _fake_run(tmp_path / "runs", BASE, 40.0)
    write_report([tmp_path / "runs"], tmp_path / "report")
    assert "No run here matches a published point" in (tmp_path / "report" / "paper_comparison.md").read_text()
