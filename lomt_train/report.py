"""Run folders into the papers' tables (Markdown, CSV) and figures (PNG).

* ``table.md`` / ``table.csv``: per experiment and setting (a fixed lambda_, a target sparsity
  or MAC budget reached by a learned λ, or a peer method's target), every test metric, the
  group and parameter sparsity and the backbone's MAC fraction after compaction, as mean +- std
  over seeds (Tables 1-2 of *Less is More*).
* ``channels_<experiment>.png``: input channels per backbone conv layer before and after
  sparsification (Fig. 3).
* ``lambda_<experiment>.png``: against lambda_, (a) each task's primary metric, (b) group and
  parameter sparsity, (c) group sparsity during training, (d) inference time (Fig. 4).
* ``target_<experiment>.png``: for the target runs, the measured figure and λ against epoch.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def find_runs(paths: Iterable[Path]) -> list[Path]:
    """Every finished run folder (one holding ``results.json``) at or under ``paths``."""
    runs = []
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such run folder")
        runs += sorted(p.parent for p in ([path / "results.json"] if (path / "results.json").exists() else path.rglob("results.json")))
    if not runs:
        raise FileNotFoundError(f"no finished runs (folders with results.json) under {', '.join(map(str, paths))}")
    return runs


def _load(run: Path, name: str) -> Any:
    try:
        return json.loads((run / name).read_text())
    except ValueError as exc:
        raise ValueError(f"{run / name}: not valid JSON ({exc}); rerun or delete that run") from exc


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


class Setting(NamedTuple):
    """What a run asked for: ``kind`` is ``"lambda"`` (a fixed λ), ``"sparsity"`` (a target % of
    zero groups), ``"macs"`` (a target MAC fraction) or ``"pat"`` (torchao's PAT at a target %)."""

    kind: str
    value: float

    @property
    def label(self) -> str:
        return {
            "lambda": f"λ={self.value:g}", "sparsity": f"target {self.value:g}% groups",
            "macs": f"target MACs {self.value:g}", "pat": f"PAT {self.value:g}% groups",
        }[self.kind]


_KINDS = ("lambda", "sparsity", "macs", "pat")


def _setting(config: dict[str, Any]) -> Setting:
    if config.get("peer"):
        return Setting(config["peer"], config["target_sparsity"])
    if config.get("target_sparsity") is not None:
        return Setting("sparsity", config["target_sparsity"])
    if config.get("target_macs") is not None:
        return Setting("macs", config["target_macs"])
    return Setting("lambda", config["lambda_"])


def _experiments(runs: list[Path]) -> dict[str, dict[Setting, list[Path]]]:
    """Runs grouped by experiment (dataset, tasks, prox, grouping) and setting, in a fixed order."""
    grouped: dict[str, dict[Setting, list[Path]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        config = _load(run, "config.json")
        name = f"{config['dataset']}-{'+'.join(config['tasks'])}-{config['prox']}"
        if config.get("grouping", "in_channel") != "in_channel":
            name += f"-{config['grouping']}"
        grouped[name][_setting(config)].append(run)
    order = lambda item: (_KINDS.index(item[0].kind), item[0].value)  # noqa: E731
    return {name: dict(sorted(by.items(), key=order)) for name, by in grouped.items()}


def _learned_lambda(run: Path) -> float | None:
    """The last λ a target run's controller set before healing (``None`` for other runs)."""
    rows = [row for row in _load(run, "history.json") if "target" in row and row["lambda_"] > 0]
    return rows[-1]["lambda_"] if rows else None


def _table_rows(by_setting: dict[Setting, list[Path]]) -> list[dict[str, str]]:
    rows = []
    for setting, runs in by_setting.items():
        results = [_load(run, "results.json") for run in runs]
        row = {"setting": setting.label, "seeds": str(len(results))}
        learned = [lam for lam in map(_learned_lambda, runs) if lam is not None]
        row["λ at the end"] = f"{statistics.fmean(learned):.3g}" if learned else (
            f"{setting.value:g}" if setting.kind == "lambda" else "—")
        for task, metrics in results[0]["test"].items():
            for metric in metrics:
                mean, std = _mean_std([r["test"][task][metric] for r in results])
                row[f"{task}/{metric}"] = f"{mean:.4g} ± {std:.2g}"
        for key in ("group_sparsity", "param_sparsity"):
            mean, std = _mean_std([r[key] for r in results])
            row[f"{key} %"] = f"{mean:.1f} ± {std:.1f}"
        if all("mac_fraction" in r for r in results):
            mean, std = _mean_std([r["mac_fraction"] for r in results])
            row["MAC fraction"] = f"{mean:.3f} ± {std:.3f}"
        rows.append(row)
    return rows


def _write_tables(experiments: dict[str, dict[Setting, list[Path]]], out: Path) -> list[Path]:
    md_lines, csv_rows = [], []
    for name, by_setting in experiments.items():
        rows = _table_rows(by_setting)
        columns = list(dict.fromkeys(c for row in rows for c in row))
        md_lines += [f"## {name}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        md_lines += ["| " + " | ".join(row.get(c, "") for c in columns) + " |" for row in rows]
        md_lines.append("")
        csv_rows += [{"experiment": name, **row} for row in rows]
    md, table = out / "table.md", out / "table.csv"
    md.write_text("\n".join(md_lines))
    fields = list(dict.fromkeys(k for row in csv_rows for k in row))
    with table.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(csv_rows)
    return [md, table]


def _plot_channels(name: str, by_setting: dict[Setting, list[Path]], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(12, 4))
    layers = _load(next(iter(by_setting.values()))[0], "sparsity.json")["layers"]
    x = range(len(layers))
    ax.bar(x, [layer["groups"] for layer in layers], color="lightgray", label="before (all channels)")
    for setting, runs in by_setting.items():
        if setting == Setting("lambda", 0.0):
            continue
        after = _load(runs[0], "sparsity.json")["layers"]
        ax.plot(x, [layer["groups"] - layer["zero_groups"] for layer in after], marker=".", label=f"after, {setting.label}")
    ax.set_xticks(list(x), [layer["name"].removeprefix("backbone.") for layer in layers], rotation=90, fontsize=6)
    ax.set_ylabel("input channels")
    ax.set_title(f"{name}: channels per conv layer")
    ax.legend()
    fig.tight_layout()
    path = out / f"channels_{name}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_target(name: str, by_setting: dict[Setting, list[Path]], out: Path) -> Path:
    """(a) the figure each target run steered (its first seed) and its target, (b) λ, against epoch."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for setting, runs in by_setting.items():
        history = _load(runs[0], "history.json")
        epochs = [row["epoch"] for row in history]
        if setting.kind == "pat":
            figure, goal = [row["group_sparsity"] / 100 for row in history], setting.value / 100
        else:
            figure = [row["target"]["figure"] for row in history]
            goal = setting.value / 100 if setting.kind == "sparsity" else setting.value
            axes[1].plot(epochs, [row["lambda_"] if row["lambda_"] > 0 else float("nan") for row in history],
                         marker=".", label=setting.label)
        (line,) = axes[0].plot(epochs, figure, marker=".", label=setting.label)
        axes[0].axhline(goal, color=line.get_color(), linestyle="--", linewidth=0.8)
    axes[0].set_title("(a) figure at the end of each epoch (dashed: target)")
    axes[0].set_ylabel("zero-group fraction / MAC fraction")
    axes[1].set_title("(b) λ at the end of each epoch (healing: λ = 0, not drawn)")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("epoch")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return _save(fig, name, out / f"target_{name}.png")


def _save(fig, title: str, path: Path) -> Path:
    """Title ``fig``, write it to ``path`` as a PNG and close it."""
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_lambda(name: str, by_lambda: dict[float, list[Path]], out: Path) -> Path:
    from .tasks import resolve_tasks

    lambdas = sorted(by_lambda)
    first = _load(by_lambda[lambdas[0]][0], "config.json")
    tasks = resolve_tasks(first["tasks"], first["dataset"])
    # A log axis needs lambda_ > 0: plot lambda_ = 0 at a tenth of the smallest positive value.
    positive = [lam for lam in lambdas if lam > 0]
    xs = [lam if lam > 0 else (min(positive) / 10 if positive else 1.0) for lam in lambdas]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))

    def errorbar(ax, values_per_lambda, label):
        stats = [_mean_std(v) for v in values_per_lambda]
        ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3, label=label)

    results = {lam: [_load(run, "results.json") for run in by_lambda[lam]] for lam in lambdas}
    for task in tasks:
        errorbar(axes[0], [[r["test"][task.name][task.primary_metric] for r in results[lam]] for lam in lambdas],
                 f"{task.name} {task.primary_metric}")
    axes[0].set_title("(a) test metric")
    for key in ("group_sparsity", "param_sparsity"):
        errorbar(axes[1], [[r[key] for r in results[lam]] for lam in lambdas], key.replace("_", " ") + " %")
    axes[1].set_title("(b) sparsity")
    for lam in lambdas:
        history = _load(by_lambda[lam][0], "history.json")
        axes[2].plot([h["epoch"] for h in history], [h["group_sparsity"] for h in history], label=f"λ={lam:g}")
    axes[2].set_title("(c) group sparsity during training")
    axes[2].set_xlabel("epoch")
    for part in ("backbone", "model"):
        errorbar(axes[3], [[_load(run, "timing.json")[part][0]["median_ms"] for run in by_lambda[lam]] for lam in lambdas],
                 f"{part} (ms)")
    axes[3].set_title("(d) inference time")
    for i, ax in enumerate(axes):
        if i != 2:
            ax.set_xscale("log")
            ax.set_xlabel("λ" + (" (0 drawn at the left end)" if 0 in lambdas and positive else ""))
        ax.legend(fontsize=7)
    return _save(fig, name, out / f"lambda_{name}.png")


def write_report(paths: Iterable[Path], out: Path) -> list[Path]:
    """Write the tables and figures for the runs at or under ``paths``; returns the files."""
    runs = find_runs(list(paths))
    out.mkdir(parents=True, exist_ok=True)
    experiments = _experiments(runs)
    written = _write_tables(experiments, out)
    for name, by_setting in experiments.items():
        written.append(_plot_channels(name, by_setting, out))
        by_lambda = {s.value: runs for s, runs in by_setting.items() if s.kind == "lambda"}
        if by_lambda:
            written.append(_plot_lambda(name, by_lambda, out))
        targets = {s: runs for s, runs in by_setting.items() if s.kind != "lambda"}
        if targets:
            written.append(_plot_target(name, targets, out))
    return written
