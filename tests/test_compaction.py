"""Compaction: exact outputs, exact parameter accounting, save/load, the run-folder command, speed."""

import json

import pytest
import torch

from lomt_train.cli import main
from lomt_train.compaction import (
    compact_model, count_params, load_compact, load_run_model, save_compact, zero_random_groups,
)
from lomt_train.config import RunConfig
from lomt_train.models import build_model
from lomt_train.trainer import run_dir_for, train

from test_trainer import TINY



def _stream_reader(name: str) -> bool:
    """Convs that read a block's input (the residual stream): these get gathers, never dropped rows."""
    return name.endswith(".conv1") or name.endswith(".downsample.0")


def _zero_groups(weight: torch.Tensor) -> torch.Tensor:
    """Mask of the input-channel groups ``weight[:, c]`` that are entirely zero."""
    return (weight == 0).flatten(2).all(2).all(0)


def _expected_params(model) -> tuple[int, int]:
    """(dense - zeroed, the compact count) from the zero masks, by name, independently of compaction.

    ``zeroed`` counts the elements of all-zero input groups (a random init may hold a stray
    exact zero elsewhere; that one stays). In each private chain ``convK -> bnK -> relu ->
    conv(K+1)`` of a block, the channels D that conv(K+1) does not read take with them the
    rest of convK's rows D and bnK's gamma and beta.
    """
    weights = {n.removesuffix(".weight"): p for n, p in model.backbone.named_parameters() if p.dim() == 4}
    group_size = {name: w.shape[0] * w[0, 0].numel() for name, w in weights.items()}
    zeroed = sum(int(_zero_groups(w).sum()) * group_size[name] for name, w in weights.items())
    dead = 0
    for name, consumer in weights.items():
        for k in (2, 3):
            if name.endswith(f".conv{k}"):
                producer = weights[name.removesuffix(f"conv{k}") + f"conv{k - 1}"]
                dropped = int(_zero_groups(consumer).sum())
                live_in = int((~_zero_groups(producer)).sum())
                dead += dropped * live_in * producer[0, 0].numel() + 2 * dropped
    dense = count_params(model)
    return dense - zeroed, dense - zeroed - dead


@pytest.mark.parametrize(
    "backbone, pattern", [("small", "all convs"), ("small", "stream readers"), ("resnet50", "all convs")]
)
def test_compact_model_is_exact_and_smaller(tmp_path, backbone, pattern):
    model = build_model(["seg", "depth"], num_classes=13, backbone=backbone, aspp_channels=8).eval()
    zero_random_groups(model.backbone, 0.7, convs=None if pattern == "all convs" else _stream_reader)
    compact, spec = compact_model(model)

    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before, after = model(x), compact(x)
    for task in before:
        assert (before[task] - after[task]).abs().max().item() <= 1e-4, task

    dense_minus_zeroed, expected = _expected_params(model)
    assert count_params(compact) == expected
    if pattern == "stream readers":  # no private channel is dropped: exactly the zeros go
        assert count_params(compact) == dense_minus_zeroed
    else:  # ~70% of the backbone's parameters were zero
        backbone_zeroed = count_params(model.backbone) - (dense_minus_zeroed - count_params(model.heads))
        assert 0.6 < backbone_zeroed / count_params(model.backbone) < 0.8
        assert count_params(compact) <= dense_minus_zeroed

    build = {"tasks": ["seg", "depth"], "num_classes": 13, "backbone": backbone, "attach": {}, "aspp_channels": 8}
    loaded = load_compact(save_compact(compact, spec, build, tmp_path / "compact.pt"))
    with torch.no_grad():
        again = loaded(x)
    assert all(torch.equal(again[t], after[t]) for t in after)
    assert any(entry["gather"] for entry in spec["convs"].values())


def test_a_head_reading_an_inner_node_keeps_it_whole():
    model = build_model(["seg", "depth"], num_classes=13, backbone="small", aspp_channels=8,
                        attach={"seg": "layer2.0.conv1", "depth": "layer3"}).eval()
    zero_random_groups(model.backbone, 0.7)
    compact, spec = compact_model(model)
    assert spec["convs"]["layer2.0.conv1"]["out"] == model.backbone.get_submodule("layer2.0.conv1").out_channels
    assert spec["convs"]["layer2.1.conv1"]["out"] < model.backbone.get_submodule("layer2.1.conv1").out_channels
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before, after = model(x), compact(x)
    assert all((before[t] - after[t]).abs().max().item() <= 1e-4 for t in before)


def test_compact_command_on_a_trained_run(tmp_path, monkeypatch):
    monkeypatch.setenv("LOMT_DATA_CACHE", str(tmp_path / "cache"))
    config = RunConfig(**{**TINY, "out": str(tmp_path / "runs")}, dataset="nyu", tasks=["seg", "depth"], lambda_=2.0)
    train(config, progress=False)
    run = run_dir_for(config)
    argv = ["compact", str(run), "--image-size", "32", "--batch-sizes", "1", "2", "--repeats", "1"]
    assert main(argv) == 0
    report = json.loads((run / "compact.json").read_text())
    assert report["max_abs_diff"] <= 1e-4
    for part in ("backbone", "model"):
        assert report["compact"][part]["params"] < report["sparse"][part]["params"]
        assert report["compact"][part]["macs"] < report["sparse"][part]["macs"]
        assert [m["batch_size"] for m in report["compact"][part]["latency"]] == [1, 2]
    assert "| backbone | params |" in (run / "compact.md").read_text()

    model, _ = load_run_model(run)
    compact = load_compact(run / "compact.pt")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before, after = model(x), compact(x)
    assert all((before[t] - after[t]).abs().max().item() <= 1e-4 for t in before)
