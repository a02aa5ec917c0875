"""One optimizer step, fused against unfused, on the papers' model shapes and a size sweep.

``pytest benchmarks/ --benchmark-only`` times each method (see :mod:`benchmarks.baselines`)
on each param set (see :mod:`benchmarks.params`); results are grouped per device and set, so
pytest-benchmark's table shows every method's ratio to the fastest one beside it.
Every round starts from the set's warm state (params, gradients and Adam state copied back
in, untimed), so each round does the same step and zeroes the same groups; a fused-Adam step
timed just before each round gives the paired ratio ``ratio_to_adam_fused``
(:func:`benchmarks.timing.pedantic_against_floor`).

With ``--benchmark-disable`` (or ``LOMT_BENCH_SMALL=1``) the sets are small and each method
steps once, untimed, and the step is checked: fused results must match the unfused
baseline's, and the chosen ``lambda_`` must zero 30-70% of the groups.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.baselines import (
    FLOOR, UNFUSED, UNFUSED_FOR, Method, all_specs, max_abs_diff, skip_reason,
)
from benchmarks.conftest import devices, rounds, small_mode, suite_sets
from benchmarks.timing import pedantic_against_floor

#: Newton iterations for the converged published prox the fused weighted prox is checked against.
CONVERGED_NEWTON_ITERS = 60


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" not in metafunc.fixturenames:
        return
    cases, ids = [], []
    for device in devices():
        for name in suite_sets(metafunc.config):
            for spec in all_specs():
                cases.append((device, name, spec))
                ids.append(f"{device}/{name}/{spec.key}")
    metafunc.parametrize("case", cases, ids=ids)


def _spec(key: str):
    return next(s for s in (*FLOOR, *UNFUSED) if s.key == key)


def test_step(benchmark, param_set, case, request):
    device, name, spec = case
    reason = skip_reason(spec, device)
    if reason is not None:
        pytest.skip(reason)
    small = small_mode(request.config)
    pset = param_set(name, device)
    method = Method(spec, pset)

    benchmark.group = f"{device} {name} ({pset.numel / 1e6:.2f}M params)"
    benchmark.extra_info.update(
        method=spec.label, kind=spec.kind, prox=spec.prox, backend=spec.backend,
        params=pset.numel, prox_params=pset.prox_numel, lambda_=method.lambda_,
        bytes_per_step=pset.bytes_per_step, threads=torch.get_num_threads(),
    )
    slow = spec.key == "published-weighted"
    floor = None if spec is FLOOR[0] or small else Method(FLOOR[0], pset)
    pedantic_against_floor(
        benchmark, method.step, method.restore, None if floor is None else floor.timed_step,
        rounds=min(rounds(), 3) if slow else rounds(), warmup_rounds=0 if slow else 1,
    )

    # The last round's result: one step from the warm state.
    zeroed = method.zero_group_fraction() if spec.prox != "none" else 0.0
    benchmark.extra_info["zeroed"] = zeroed
    if benchmark.stats is not None:
        benchmark.extra_info["GB/s"] = pset.bytes_per_step / benchmark.stats.stats.median / 1e9
    if not small:
        return

    if spec.prox != "none":
        assert 0.3 <= zeroed <= 0.7, f"lambda_={method.lambda_} zeroed {zeroed:.0%} of the groups"
    if spec.key == "adam-foreach":
        expected = Method(_spec("adam-fused"), pset)
    elif spec.kind == "fused":
        expected = Method(_spec(UNFUSED_FOR[spec.prox]), pset, newton_iters=CONVERGED_NEWTON_ITERS)
    else:
        return
    expected.step()
    diff = max_abs_diff(method, expected)
    assert diff <= 1e-5, f"{spec.label} differs from {expected.spec.label} by {diff:.3g} after one step"
