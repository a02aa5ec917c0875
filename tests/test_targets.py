"""Target runs of the trainer: λ learned toward a sparsity or MAC target, healing, exact resume."""

import importlib.util
import json

import pytest
import torch

from lomt_kernels.grouping import as_groups
from lomt_train.checkpoint import load_checkpoint
from lomt_train.cli import main
from lomt_train.config import RunConfig
from lomt_train.trainer import run_dir_for, train

from test_trainer import train_epochs, without_wall_clock

TINY = dict(
    dataset="nyu", tasks=["seg", "depth"], synthetic=True, backend="torch", backbone="small", aspp_channels=8,
    image_size=32, batch_size=4, lr=5e-3, synthetic_images=8, timing_repeats=1, device="cpu", lambda_=0.05,
)


@pytest.fixture(autouse=True)
def _data_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOMT_DATA_CACHE", str(tmp_path / "cache"))


def _config(tmp_path, **overrides) -> RunConfig:
    return RunConfig(**{**TINY, "out": str(tmp_path / "runs"), **overrides})


def _zero_groups(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: ~(as_groups(v, "in_channel") != 0).any(dim=1) for k, v in state.items() if k.startswith("backbone.") and v.dim() == 4}


@pytest.mark.slow
def test_resume_in_the_middle_of_a_target_run_ends_identical(tmp_path):
    options = dict(target_sparsity=40.0, epochs=5, healing_epochs=2, augment=True)
    straight, interrupted = _config(tmp_path / "a", **options), _config(tmp_path / "b", **options)
    train(straight, progress=False)
    train_epochs(interrupted, 2)  # stops in the control stretch
    train(interrupted, progress=False, resume=True)

    a, b = (load_checkpoint(run_dir_for(c) / "last.pt") for c in (straight, interrupted))
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    frozen_a, frozen_b = a["controller"].pop("frozen"), b["controller"].pop("frozen")
    assert a["controller"] == b["controller"]
    assert all(torch.equal(x, y) for x, y in zip(frozen_a["keep"], frozen_b["keep"], strict=True))
    assert without_wall_clock(a["history"]) == without_wall_clock(b["history"])
    phases = [row["target"]["phase"] for row in a["history"]]
    # Each epoch's last call; healing starts by the end of epoch 3 (or in epoch 2, on target).
    assert phases[0] == "control" and phases[2:] == ["healing"] * 3
    assert a["history"][0]["lambda_"] != 0.05 and a["history"][-1]["lambda_"] == 0.0


def test_healing_keeps_the_frozen_groups_at_zero_in_a_run(tmp_path):
    config = _config(tmp_path, target_sparsity=50.0, epochs=6, healing_epochs=3)
    train_epochs(config, 3)  # the third epoch's call starts healing
    frozen = _zero_groups(load_checkpoint(run_dir_for(config) / "last.pt")["model"])
    assert sum(int(z.sum()) for z in frozen.values()) > 0
    result = train(config, progress=False, resume=True)
    final = _zero_groups(load_checkpoint(run_dir_for(config) / "last.pt")["model"])
    for name, zero in frozen.items():
        assert torch.equal(final[name], zero), name  # every frozen group still zero, none grew back or joined
    figures = {row["target"]["figure"] for row in result.history[2:]}
    assert len(figures) == 1 and result.best_epoch >= 3  # best.pt among the healing epochs


def test_a_mac_target_from_the_command_line(tmp_path, capsys):
    args = ["nyu", "--tasks", "seg", "--synthetic", "--backend", "torch", "--backbone", "small", "--aspp-channels", "8",
            "--image-size", "32", "--batch-size", "4", "--synthetic-images", "8", "--device", "cpu", "--epochs", "4",
            "--lambda", "0.05", "--target-macs", "0.6", "--out", str(tmp_path / "runs"), "--no-progress"]
    assert main(args) == 0
    (run,) = [path.parent for path in (tmp_path / "runs" / "nyu-seg").glob("group_weighted-macs0.6-*/seed0/results.json")]
    history = json.loads((run / "history.json").read_text())
    assert [row["target"]["phase"] for row in history][::3] == ["control", "healing"]
    assert all(0 < row["target"]["figure"] <= 1 and "lambda_" in row for row in history)
    assert "target/figure" in (run / "history.csv").read_text().splitlines()[0]
    results = json.loads((run / "results.json").read_text())
    assert results["mac_fraction"] == pytest.approx(history[-1]["target"]["figure"], abs=1e-12)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(target_sparsity=50.0, target_macs=0.5), "not both"),
        (dict(target_sparsity=0.5 * 200), "in \\(0, 100\\)"),
        (dict(target_macs=50.0), "in \\(0, 1\\)"),
        (dict(target_sparsity=50.0, lambda_=0.0), "starting value of λ"),
        (dict(target_sparsity=50.0, epochs=2, healing_epochs=1), "no epoch to steer"),
        (dict(target_sparsity=50.0, prox="l1"), "group prox"),
        (dict(healing_epochs=2), "needs a target"),
    ],
)
def test_bad_target_options_name_the_fix(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train(_config(tmp_path, **{"epochs": 4, **overrides}), progress=False)


def test_pat_peer_reaches_its_target_exactly_or_says_how_to_install_it(tmp_path):
    config = _config(tmp_path, target_sparsity=50.0, epochs=4, healing_epochs=1, peer="pat", grouping="out_channel")
    if importlib.util.find_spec("torchao") is None:
        with pytest.raises(ValueError, match=r'pip install -e "\.\[peers\]"'):
            train(config, progress=False)
        return
    result = train(config, progress=False)
    assert run_dir_for(config).parent.name.startswith("pat-sparsity50-")
    assert result.sparsity["total"]["group_sparsity"] == pytest.approx(50.0, abs=1.0)  # a hard top-k cut
    with pytest.raises(ValueError, match="--grouping out_channel"):
        train(_config(tmp_path / "in", target_sparsity=50.0, epochs=4, peer="pat"), progress=False)
