"""Timing a step against ``torch.optim.Adam(fused=True)``, the floor every benchmark reports against.

On a shared machine the host's speed drifts from one second to the next, so two medians taken
apart may compare two speeds. Every entry point therefore times one fused-Adam round just
before each round of the step under test, and reports the median over rounds of each round's
time over its paired floor's (:func:`paired_ratio`): two steps run within milliseconds of each
other. :mod:`benchmarks.report`, :mod:`benchmarks.device_time` and :mod:`benchmarks.host_overhead`
pair rounds with :func:`time_round`; the pytest-benchmark suites with :func:`pedantic_against_floor`.
"""

from __future__ import annotations

import statistics
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

#: A timed round: runs the step (or several) and returns its duration, in any one unit.
Round = Callable[[], float]


def fused_adam(params: Iterable[Tensor] | Iterable[dict[str, Any]], **kwargs: Any) -> torch.optim.Adam:
    """The floor: ``torch.optim.Adam(params, fused=True, **kwargs)``."""
    return torch.optim.Adam(params, fused=True, **kwargs)


def time_round(step: Round, floor: Round | None, times: list[float], floor_times: list[float]) -> None:
    """One round: ``floor`` (if given) timed just before ``step``, each appended to its list."""
    if floor is not None:
        floor_times.append(floor())
    times.append(step())


def time_rounds(step: Round, floor: Round | None, rounds: int) -> tuple[list[float], list[float]]:
    """``rounds`` rounds of :func:`time_round`: the step's times and the floor's (empty without one)."""
    times: list[float] = []
    floor_times: list[float] = []
    for _ in range(rounds):
        time_round(step, floor, times, floor_times)
    return times, floor_times


def paired_ratio(times: Iterable[float], floor_times: list[float]) -> float | None:
    """The median over rounds of ``times[k] / floor_times[k]``; ``None`` when no floor ran."""
    if not floor_times:
        return None
    return statistics.median(t / f for t, f in zip(times, floor_times, strict=True))


def pedantic_against_floor(benchmark: Any, step: Callable[[], None], restore: Callable[[], None],
                           floor: Round | None, *, rounds: int, warmup_rounds: int) -> None:
    """``benchmark.pedantic(step)`` from ``restore()``'s state each round, with ``floor`` timed
    (untimed by pytest-benchmark) just before each round; records the floor's median and the
    paired ratio (:func:`paired_ratio`) in ``benchmark.extra_info``."""
    floor_times: list[float] = []

    def setup() -> None:
        if floor is not None:
            floor_times.append(floor())
        restore()

    benchmark.pedantic(step, setup=setup, rounds=rounds, warmup_rounds=warmup_rounds)
    if benchmark.stats is not None and floor is not None:
        paired = floor_times[warmup_rounds:]  # setup runs before the warm-up rounds too
        benchmark.extra_info["adam_fused_paired_median"] = statistics.median(paired)
        benchmark.extra_info["ratio_to_adam_fused"] = paired_ratio(benchmark.stats.stats.data, paired)
