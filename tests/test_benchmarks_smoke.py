"""The benchmark suite's param sets and baselines, checked cheaply so the suite cannot rot.

The suite itself runs in CI in its small mode, as part of the plain ``pytest``.
"""

import importlib.util
import math
import re

import pytest
import torch

from benchmarks import report
from benchmarks.baselines import (
    FLOOR, UNFUSED, UNFUSED_FOR, WEIGHTED_TRAFFIC, Method, fused_spec, max_abs_diff,
    published_weighted_prox_,
)
from benchmarks.params import build_set, resnet50_conv_shapes, small_convs, sweep_shapes
from benchmarks.summary import Timing, ratio_table
from lomt_kernels.reference import weighted_group_prox


def test_resnet50_backbone_has_the_papers_53_convs_and_23_45m_params():
    shapes = resnet50_conv_shapes()
    assert len(shapes) == 53
    assert sum(math.prod(s) for s in shapes) == 23_454_912


@pytest.mark.parametrize("millions", [1, 4, 16, 64])
def test_sweep_sets_are_within_3_percent_of_their_size(millions):
    total = sum(math.prod(s) for s in sweep_shapes(millions * 10**6))
    assert abs(total - millions * 10**6) <= 0.03 * millions * 10**6


def test_restore_makes_every_step_the_same():
    pset = small_convs()
    initial = [p.clone() for p in pset.params]
    method = Method(fused_spec("torch", "group"), pset)
    method.step()
    first = [t.clone() for t in method.state_tensors()]
    method.restore()
    method.step()
    assert all(torch.equal(a, b) for a, b in zip(first, method.state_tensors()))
    assert all(torch.equal(p, p0) for p, p0 in zip(pset.params, initial))  # the set is never written


def test_published_prox_converges_to_the_reference_weighted_prox():
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(8, 6, 3, 3, generator=gen, dtype=torch.float64)
    d = torch.rand(8, 6, 3, 3, generator=gen, dtype=torch.float64) + 0.1
    tau = 0.5
    # published_weighted_prox_ rebuilds d from v at step t: pick v so that it gets d back.
    t = 1e6  # 1 - beta2**t == 1
    v = (d - 1e-8) ** 2
    p = z.clone()
    published_weighted_prox_(p, v, t, tau, iters=60)
    expected = weighted_group_prox(z, d, tau, "in_channel")
    torch.testing.assert_close(p, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("prox", ["group", "l1", "group_weighted"])
def test_reference_backend_matches_the_unfused_baseline_on_the_small_nyu_model(prox):
    pset = build_set("nyu-3task-small")
    fused = Method(fused_spec("torch", prox), pset)
    fused.step()
    unfused_spec = next(s for s in UNFUSED if s.key == UNFUSED_FOR[prox])
    unfused = Method(unfused_spec, pset, newton_iters=60)
    unfused.step()
    assert max_abs_diff(fused, unfused) <= 1e-5
    assert 0.3 <= fused.zero_group_fraction() <= 0.7


def test_report_quick_run_writes_the_table(tmp_path):
    out = tmp_path / "RESULTS.md"
    assert report.main(["--device", "cpu", "--sets", "small-convs", "--repeats", "1", "--output", str(out)]) == 0
    text = out.read_text()
    assert "torch.optim.Adam(fused=True)" in text and "× Adam(fused)" in text
    assert "Performance summary" in text
    assert FLOOR[0].label in text and WEIGHTED_TRAFFIC.label in text
    assert f"| {FLOOR[0].label} |" in text and "| 1.00 |" in text


def test_report_ratio_pairs_each_round_with_the_floor_step_before_it():
    # The host slows down twentyfold in round 2; the round's own floor step saw it too. The paired
    # ratio stays 2, where the ratio of the medians (6 / 2) would say 3.
    row = report.Row(fused_spec("cpu", "group"), times_ms=[2.0, 40.0, 6.0], floor_ms=[1.0, 20.0, 2.0])
    assert row.ratio == 2.0
    assert report.Row(FLOOR[0], times_ms=[1.0, 3.0]).ratio == 1.0
    assert report.Row(WEIGHTED_TRAFFIC, times_ms=[1.0]).ratio is None


def test_report_leaves_out_a_method_that_raises_and_says_why(tmp_path, monkeypatch):
    broken = fused_spec("cpu", "group_weighted")
    step = Method.step

    def failing_step(self):
        if self.spec == broken:
            raise RuntimeError("CUDA error: invalid argument\nmore lines")
        step(self)

    monkeypatch.setattr(Method, "step", failing_step)
    out = tmp_path / "RESULTS.md"
    assert report.main(["--device", "cpu", "--sets", "small-convs", "--repeats", "1", "--output", str(out)]) == 0
    text = out.read_text()
    assert f"* **Failed** `{broken.label}`, left out: RuntimeError: CUDA error: invalid argument (set small-convs)" in text
    assert f"| {broken.label} |" not in text
    assert f"| {fused_spec('cpu', 'group').label} |" in text


def test_performance_paragraph_gives_the_fraction_of_copy_bandwidth():
    rows = [
        report.Row(FLOOR[0], [1.0]),
        report.Row(fused_spec("triton", "group"), [2.0], floor_ms=[1.0]),
        report.Row(fused_spec("triton", "group_weighted"), [4.0], floor_ms=[1.0]),
        report.Row(next(s for s in UNFUSED if s.key == "unfused-group"), [3.0], floor_ms=[1.0]),
        report.Row(next(s for s in UNFUSED if s.key == "published-weighted"), [30.0], floor_ms=[1.0]),
    ]
    result = report.SetResult("resnet50-convs", "a set", 100_000_000, rows)
    text = report.performance_paragraph([result], "cpu", 2, copy_gbs=2800.0)
    # At 28 B/param over 1e8 params a step's bandwidth is 2,800 over its time in milliseconds:
    # fused Adam reaches all of the copy's, the group step half and the weighted step a quarter.
    assert "the group step moves 1,400 GB/s and the weighted step 700 GB/s: 50% and 25%" in text
    assert "(2,800 GB/s read plus written; fused Adam: 100%)" in text


def test_report_header_quotes_no_figure_the_run_did_not_measure():
    # The header's bullets describe the method and the machine; every time and ratio in the
    # report comes from the run's own rows, so the shared-VM caveat carries no figures of its own.
    rows = [report.Row(FLOOR[0], [1.0, 3.0]), report.Row(fused_spec("cpu", "group"), [2.0, 4.0], floor_ms=[1.0, 3.0])]
    text = report.render([report.SetResult("small-convs", "a set", 1000, rows)], "cpu", 2, 2, shared_note=True)
    header = [line for line in text.splitlines() if line.startswith("* ")]
    assert any("shared VM" in line for line in header)
    assert not [line for line in header if re.search(r"\d\s*ms\b|\d\s*[x×](?!\w)", line)]


def test_ratio_table_puts_each_fused_step_beside_fused_adam_and_its_unfused_counterpart():
    group, other = "cpu resnet50-convs (23.45M params)", "cpu sweep-1M (1.00M params)"
    unfused_group = next(s for s in UNFUSED if s.key == UNFUSED_FOR["group"])
    timings = [
        Timing(group, FLOOR[0], 0.010),
        Timing(group, unfused_group, 0.060),
        Timing(group, fused_spec("torch", "group"), 0.090),
        Timing(group, fused_spec("cpu", "group"), 0.012),
        Timing(group, fused_spec("cpu", "group_weighted"), 0.020),
        Timing(other, fused_spec("cpu", "l1"), 0.004),
    ]
    lines = ratio_table(timings).splitlines()
    row = next(line for line in lines if "[cpu] group " in line).split()
    assert row[-4:] == ["12.0", "1.20", "60.0", "5.00×"]
    weighted = next(line for line in lines if "[cpu] group_weighted" in line).split()
    assert weighted[-4:] == ["20.0", "2.00", "-", "-"]  # the published baseline did not run
    assert not any("[torch]" in line for line in lines)  # the reference is not a fused kernel
    assert lines.index(other) > lines.index(group) and lines[-1].split()[-4:] == ["4.00", "-", "-", "-"]
    assert ratio_table([Timing(group, FLOOR[0], 0.01)]) == ""


def test_pat_is_measured_beside_us_or_skipped_with_its_reason():
    from benchmarks.baselines import PAT, all_specs, skip_reason

    assert PAT in all_specs()
    reason = skip_reason(PAT, "cpu")
    if importlib.util.find_spec("torchao") is None:
        assert 'pip install -e ".[peers]"' in reason
        return
    assert reason is None
    method = Method(PAT, build_set("small-convs"))
    method.timed_step()
    first = [p.detach().clone() for p in method.params]
    method.timed_step()  # restore() puts the warm state and PAT's latent copy back: the same step
    assert all(torch.equal(p, q) for p, q in zip(method.params, first))
    assert not all(torch.equal(p, q) for p, q in zip(method.params, method.pset.params))
    assert method.zero_group_fraction() > 0  # PAT's prox zeroed some of the (in-channel) groups
