"""The ``"cpu"`` backend's step on the dilated ResNet-50 backbone, against fused Adam.

``pytest benchmarks/test_cpu_step.py --benchmark-only`` times, side by side in one run, one
optimizer step over the 53 conv weights of
``torchvision.models.resnet50(replace_stride_with_dilation=[False, True, True])`` (23.45M
params; random weights, random gradients and a warm Adam state, from
:func:`benchmarks.params.resnet50_backbone`; ``torch.set_num_threads(2)`` unless
``LOMT_BENCH_THREADS`` says otherwise):

* ``torch.optim.Adam(fused=True)``: the floor;
* ``FusedGroupProxAdam(backend="cpu", prox="group")``: target at most 1.25x the floor;
* ``FusedGroupProxAdam(backend="cpu", prox="group_weighted")``: target at most 2x;
* fused Adam plus the least memory traffic an exact weighted prox adds, as tensor ops
  (:func:`benchmarks.baselines.weighted_prox_traffic_`): a yardstick for the weighted target,
  measured in the same run.

``lambda_`` zeroes half of the groups (:func:`benchmarks.params.choose_lambda`). Every round
starts from the same warm state with cold caches (:meth:`benchmarks.baselines.Method.restore`,
untimed), so all rounds do the same work. The VM this was tuned on changes speed from one
second to the next, and two methods' medians timed one after the other differ as much by the
host as by the kernel. So every method after the floor also steps fused Adam, timed, in the
untimed setup of each of its rounds, and records in ``extra_info`` the median of those paired floor
rounds (``adam_fused_paired_median``) and the median over rounds of each round's time over its
paired floor step's (``ratio_to_adam_fused``), as ``python -m benchmarks.report`` does.
Rounds: ``LOMT_BENCH_ROUNDS`` (default 5).

With ``--benchmark-disable`` (the CI smoke run) the set is the small one, each method steps
once, and the fused steps are checked against the reference backend's.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.baselines import (
    FLOOR, WEIGHTED_TRAFFIC, Method, MethodSpec, fused_spec, max_abs_diff, skip_reason,
)
from benchmarks.conftest import rounds, small_mode
from benchmarks.timing import pedantic_against_floor

ADAM = FLOOR[0]  # torch.optim.Adam(fused=True)
SPECS = (ADAM, fused_spec("cpu", "group"), WEIGHTED_TRAFFIC, fused_spec("cpu", "group_weighted"))
#: The most each fused step may cost, as a multiple of the floor's median.
TARGET_RATIO = {"group": 1.25, "group_weighted": 2.0}

#: Untimed warm-up rounds before the timed ones.
WARMUP_ROUNDS = 1


@pytest.mark.parametrize("spec", SPECS, ids=[spec.key for spec in SPECS])
def test_cpu_step(benchmark, param_set, spec: MethodSpec, request: pytest.FixtureRequest) -> None:
    reason = skip_reason(spec, "cpu")
    if reason is not None:
        pytest.skip(reason)
    small = small_mode(request.config)
    pset = param_set("small-convs" if small else "resnet50-convs", "cpu")
    method = Method(spec, pset)

    benchmark.group = f"cpu step, {pset.description}"
    benchmark.extra_info.update(
        method=spec.label, params=pset.numel, lambda_=method.lambda_, threads=torch.get_num_threads(),
    )
    floor = None if spec is ADAM or small else Method(ADAM, pset)
    pedantic_against_floor(benchmark, method.step, method.restore, None if floor is None else floor.timed_step,
                           rounds=rounds(), warmup_rounds=WARMUP_ROUNDS)
    if benchmark.stats is not None and spec.kind == "fused":
        benchmark.extra_info["target_ratio"] = TARGET_RATIO[spec.prox]
    if spec.kind != "fused":
        return
    zeroed = method.zero_group_fraction()  # the last round's step, from the warm state
    benchmark.extra_info["zeroed"] = zeroed
    assert 0 < zeroed < 1, f"lambda_={method.lambda_} should zero some groups, not all"
    if small:
        reference = Method(fused_spec("torch", spec.prox), pset)
        reference.step()
        assert max_abs_diff(method, reference) < 1e-5
