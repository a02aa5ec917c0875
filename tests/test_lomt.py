"""LOMT step 1: the used-layer statistic, the attachment rule, and the probe end to end."""

import json

import pytest

from lomt_train.cli import main
from lomt_train.config import RunConfig
from lomt_train.lomt import active_fractions, choose_attachment, used_layers
from lomt_train.models import build_model

# The convs of the "small" backbone (two BasicBlocks per stage, a downsample in each stage's
# first block but layer1's), in model order.
SMALL_CONVS = ["conv1"] + [
    f"layer{s}.{b}.{conv}"
    for s in range(1, 5)
    for b in range(2)
    for conv in (["conv1", "conv2"] + (["downsample.0"] if b == 0 and s > 1 else []))
]

TINY_FLAGS = [
    "--synthetic", "--backend", "torch", "--backbone", "small", "--aspp-channels", "8", "--image-size", "32",
    "--batch-size", "4", "--epochs", "2", "--synthetic-images", "8", "--device", "cpu", "--no-progress",
]


@pytest.fixture(autouse=True)
def _data_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOMT_DATA_CACHE", str(tmp_path / "cache"))


def _used_through(last: str) -> dict[str, bool]:
    """Every conv up to and including ``last`` used, the rest not."""
    cut = SMALL_CONVS.index(last)
    return {layer: i <= cut for i, layer in enumerate(SMALL_CONVS)}


@pytest.mark.parametrize(
    "used, node",
    [
        (_used_through("layer4.1.conv2"), "layer4"),  # everything: the usual attachment
        (_used_through("layer3.0.conv1"), "layer3.0"),  # part of a block counts for the block
        (_used_through("layer3.1.conv1"), "layer3"),  # a stage's last block is named by the stage
        (_used_through("conv1"), "maxpool"),  # only the stem
        # a shortcut projection alone does not make its block used: the head can read the block's input
        ({**_used_through("layer1.1.conv2"), "layer2.0.downsample.0": True}, "layer1"),
        ({**_used_through("layer2.0.conv1"), "layer3.0.downsample.0": True, "layer4.0.downsample.0": True}, "layer2.0"),
        # a deep used conv after unused ones still decides: the head must see what it computes
        ({**_used_through("layer2.0.conv1"), "layer4.0.conv2": True}, "layer4.0"),
    ],
)
def test_attachment_rule(used, node):
    assert choose_attachment(used) == node
    build_model(["seg"], num_classes=3, backbone="small", aspp_channels=8, attach={"seg": node})


def test_a_layer_is_used_when_active_above_one_percent_in_every_seed():
    fractions = {"a": [0.5, 0.02], "b": [0.5, 0.005], "c": [0.01, 0.9], "d": [0.0, 0.0]}
    assert used_layers(fractions) == {"a": True, "b": False, "c": False, "d": False}


def test_the_threshold_decides_which_layers_are_used_and_so_the_attachment():
    # A hand-made profile: everything through layer3 keeps half its inputs in both seeds, layer4's
    # convs keep 3% in one seed and 20% in the other. At tau = 1% layer4 is used (3% > 1%), so the
    # task attaches at layer4; at tau = 5% the 3% seed makes layer4 unused, so it attaches at layer3.
    fractions = {layer: [0.03, 0.2] if layer.startswith("layer4") else [0.5, 0.5] for layer in SMALL_CONVS}
    assert choose_attachment(used_layers(fractions)) == "layer4"
    used = used_layers(fractions, threshold=0.05)
    assert [layer for layer, u in used.items() if not u] == [l for l in SMALL_CONVS if l.startswith("layer4")]
    assert choose_attachment(used) == "layer3"


@pytest.mark.parametrize("lambdas", [["0"], ["2", "0"]])
def test_probe_refuses_lambda_zero_before_any_training_or_data(tmp_path, capsys, lambdas):
    argv = ["lomt-probe", "nyu", *TINY_FLAGS, "--tasks", "seg,depth", "--lambda", *lambdas, "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "λ = 0" in err and "every layer reads as used" in err and "--lambda" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()  # nothing trained or generated


def test_active_fractions_read_conv_layers_of_sparsity_json():
    sparsity = {"layers": [
        {"name": "conv1.weight", "shape": [16, 3, 7, 7], "groups": 3, "zero_groups": 0},
        {"name": "bn1.weight", "shape": [16], "groups": 16, "zero_groups": 4},
        {"name": "layer1.0.conv1.weight", "shape": [16, 16, 3, 3], "groups": 16, "zero_groups": 12},
    ]}
    assert active_fractions(sparsity) == {"conv1": 1.0, "layer1.0.conv1": 0.25}


def test_probe_end_to_end_with_override_and_lomt_training(tmp_path):
    out = tmp_path / "probe"
    probe = ["lomt-probe", "nyu", *TINY_FLAGS, "--tasks", "seg,depth", "--lambda", "2", "--seeds", "0", "1",
             "--epochs", "1", "--out", str(out)]
    assert main(probe) == 0
    profile = json.loads((out / "profile.json").read_text())
    assert (out / "lomt_profile.png").stat().st_size > 0
    assert set(profile["attach"]) == {"seg", "depth"} and profile["seeds"] == [0, 1]
    assert profile["layers"] == SMALL_CONVS
    for task in ("seg", "depth"):
        assert all(len(v) == 2 for v in profile["active_fraction"][task].values())
        assert profile["used"][task] == used_layers(profile["active_fraction"][task])
        assert profile["attach"][task] == choose_attachment(profile["used"][task])
    assert len(list(out.rglob("results.json"))) == 4  # two tasks alone, two seeds each

    # The override reuses the finished runs and replaces one task's attachment.
    assert main(probe + ["--attach", "seg=layer3.0.conv1"]) == 0
    overridden = json.loads((out / "profile.json").read_text())
    assert overridden["attach"] == {**profile["attach"], "seg": "layer3.0.conv1"}
    assert overridden["chosen"] == profile["chosen"]
    assert len(list(out.rglob("results.json"))) == 4
    assert profile["threshold"] == 0.01

    # --threshold reuses the runs too, and decides "used" by its own value, recorded in the profile.
    assert main(probe + ["--attach", "seg=layer3.0.conv1", "--threshold", "0.5"]) == 0
    strict = json.loads((out / "profile.json").read_text())
    assert strict["threshold"] == 0.5 and "more than 0.5 of" in strict["rule"]
    assert strict["active_fraction"] == overridden["active_fraction"]
    for task in ("seg", "depth"):
        assert strict["used"][task] == used_layers(strict["active_fraction"][task], threshold=0.5)
    assert len(list(out.rglob("results.json"))) == 4

    # Step 2: the LOMT model trains with the profile's attachments.
    runs = tmp_path / "lomt"
    lomt = ["--tasks", "seg,depth", "--lomt", str(out / "profile.json"), "--epochs", "1", "--out", str(runs)]
    assert main(["nyu", *TINY_FLAGS, *lomt]) == 0  # the later --epochs wins
    (config_path,) = runs.rglob("config.json")
    assert RunConfig.load(config_path).attach == strict["attach"]


def test_probe_rejects_an_attachment_the_backbone_lacks(tmp_path, capsys):
    argv = ["lomt-probe", "nyu", *TINY_FLAGS, "--tasks", "seg", "--out", str(tmp_path), "--attach", "seg=layer9"]
    assert main(argv) == 2
    assert "not in the backbone" in capsys.readouterr().err
    assert not list(tmp_path.rglob("config.json"))  # rejected before any training
