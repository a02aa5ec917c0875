"""Configuration of the benchmark suite, read from the environment.

* Full-size sets only with ``--benchmark-only`` (``pytest benchmarks --benchmark-only``). Any
  other run, such as the plain ``pytest`` of the test suite, takes the small sets and runs each
  benchmark once as a correctness check (``LOMT_BENCH_SMALL=1`` forces small sets).
* ``LOMT_BENCH_DEVICE``: ``cpu``, ``cuda`` or ``cpu,cuda`` (default: ``cuda`` when present, else
  ``cpu``).
* ``LOMT_BENCH_SIZES``: the sweep sizes in millions of params (default ``1,4,16,64``).
* ``LOMT_BENCH_ROUNDS``: timed rounds per method (default 5; the slow published baseline
  takes at most 3).
* ``LOMT_BENCH_THREADS``: ``torch.set_num_threads`` for CPU runs (default 2).

A timed run ends with :func:`benchmarks.summary.ratio_table`: each fused step beside its
unfused counterpart and fused Adam.
"""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks.baselines import MethodSpec
from benchmarks.params import SWEEP_SIZES_M, build_set, set_names
from benchmarks.summary import Timing, ratio_table


def small_mode(config: pytest.Config) -> bool:
    return os.environ.get("LOMT_BENCH_SMALL", "0") not in ("", "0") or not config.getoption(
        "benchmark_only", default=False
    )


def devices() -> list[str]:
    default = "cuda" if torch.cuda.is_available() else "cpu"
    return [d.strip() for d in os.environ.get("LOMT_BENCH_DEVICE", default).split(",") if d.strip()]


def sweep_sizes() -> tuple[float, ...]:
    raw = os.environ.get("LOMT_BENCH_SIZES")
    return tuple(float(x) for x in raw.split(",")) if raw else SWEEP_SIZES_M


def rounds() -> int:
    return int(os.environ.get("LOMT_BENCH_ROUNDS", "5"))


def threads() -> int:
    return int(os.environ.get("LOMT_BENCH_THREADS", "2"))


def suite_sets(config: pytest.Config) -> list[str]:
    return set_names(small_mode(config), sweep_sizes())


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(threads())
    if small_mode(config):
        config.option.benchmark_disable = True  # one untimed call each: a check, not a measurement


def pytest_benchmark_update_machine_info(config, machine_info):  # noqa: ANN001
    machine_info["torch"] = torch.__version__
    machine_info["torch_num_threads"] = torch.get_num_threads()
    try:
        import triton

        machine_info["triton"] = triton.__version__
    except ImportError:
        machine_info["triton"] = None
    if torch.cuda.is_available():
        machine_info["cuda_device"] = torch.cuda.get_device_name()


_cache: dict[tuple[str, str], object] = {}


@pytest.fixture(scope="session")
def param_set():
    """``param_set(name, device)``: the set, built once; only the latest set is kept in memory."""

    def get(name: str, device: str):
        key = (name, device)
        if key not in _cache:
            _cache.clear()
            _cache[key] = build_set(name, device)
        return _cache[key]

    yield get
    _cache.clear()


_timings: list[Timing] = []


def _spec_of(item: pytest.Item) -> MethodSpec | None:
    """The method a benchmark times: its ``spec`` parameter, or the one in its ``case``."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    for value in (params.get("spec"), *params.get("case", ())):
        if isinstance(value, MethodSpec):
            return value
    return None


@pytest.fixture(autouse=True)
def _record_timing(request: pytest.FixtureRequest):
    """After a timed benchmark, keep its median for the closing table."""
    spec = _spec_of(request.node)
    if spec is None or "benchmark" not in request.fixturenames:
        yield
        return
    benchmark = request.getfixturevalue("benchmark")
    yield
    if benchmark.stats is not None and benchmark.group:
        _timings.append(Timing(benchmark.group, spec, benchmark.stats.stats.median))


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter) -> None:  # noqa: ANN001
    table = ratio_table(_timings)
    if table:
        terminalreporter.write_sep("-", "lomt: fused steps as ratios")
        terminalreporter.write_line(table)
