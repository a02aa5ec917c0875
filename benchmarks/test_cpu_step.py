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
untimed), so all rounds do the same work. Each method after the floor records the ratio of its
median to the floor's in ``extra_info["ratio_to_adam_fused"]`` (the floor runs first). Rounds:
``LOMT_BENCH_ROUNDS`` (default 5).

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

ADAM = FLOOR[0]  # torch.optim.Adam(fused=True)
SPECS = (ADAM, fused_spec("cpu", "group"), WEIGHTED_TRAFFIC, fused_spec("cpu", "group_weighted"))
#: The most each fused step may cost, as a multiple of the floor's median.
TARGET_RATIO = {"group": 1.25, "group_weighted": 2.0}

_medians: dict[str, float] = {}


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
    benchmark.pedantic(method.step, setup=method.restore, rounds=rounds(), warmup_rounds=1)

    if benchmark.stats is not None:
        _medians[spec.key] = benchmark.stats.stats.median
        if spec is not ADAM and ADAM.key in _medians:
            benchmark.extra_info["ratio_to_adam_fused"] = _medians[spec.key] / _medians[ADAM.key]
        if spec.kind == "fused":
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
