"""The short table that ends ``pytest benchmarks/ --benchmark-only``: each fused step beside its
unfused counterpart and fused Adam, as ratios of the medians measured in that run.

``benchmarks/conftest.py`` records a :class:`Timing` per benchmark and prints
:func:`ratio_table` after pytest-benchmark's own tables.
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.baselines import FLOOR, UNFUSED_FOR, MethodSpec

ADAM_FUSED_KEY = FLOOR[0].key


@dataclass(frozen=True)
class Timing:
    """One benchmark's median step time, within its group (a device and a param set)."""

    group: str
    spec: MethodSpec
    median_s: float


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:,.1f}" if ms >= 10 else f"{ms:.2f}"


def ratio_table(timings: list[Timing]) -> str:
    """Per group, a row per fused kernel's step: its median, ``× Adam(fused)`` (its median over fused
    Adam's: lower is better) and ``unfused ÷ fused`` (how many times faster than the same prox
    as separate tensor ops, or the published weighted prox). ``-`` where the counterpart did
    not run in that group. Empty if no fused kernel ran."""
    header = ("step", "ms", "× Adam(fused)", "unfused ms", "unfused ÷ fused")
    sections = []
    for group in dict.fromkeys(t.group for t in timings):
        in_group = {t.spec.key: t for t in timings if t.group == group}
        adam = in_group.get(ADAM_FUSED_KEY)
        rows = []
        for timing in in_group.values():
            if timing.spec.kind != "fused" or timing.spec.backend == "torch":  # the reference is no kernel
                continue
            unfused = in_group.get(UNFUSED_FOR[timing.spec.prox])
            rows.append((
                timing.spec.label,
                _ms(timing.median_s),
                "-" if adam is None else f"{timing.median_s / adam.median_s:.2f}",
                "-" if unfused is None else _ms(unfused.median_s),
                "-" if unfused is None else f"{unfused.median_s / timing.median_s:.2f}×",
            ))
        if rows:
            sections.append((group, [header, *rows]))
    if not sections:
        return ""
    lines = ["fused steps against fused Adam and their unfused counterparts (medians of this run)"]
    for group, rows in sections:
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines += ["", group]
        for row in rows:
            cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
            lines.append("  " + "  ".join(cells))
    return "\n".join(lines)
