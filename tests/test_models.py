"""Backbones, heads and the multi-task model (with the registry's losses, metrics and weighting)."""

import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.models.segmentation.deeplabv3 import DeepLabHead

from lomt_train.losses import UncertaintyWeighting
from lomt_train.models import BACKBONES, DeepLabV3Head, build_backbone, build_model
from lomt_train.tasks import Task, get_task

NUM_CLASSES = 13
ALL_KINDS = ["seg", "depth", "normal", "edge", "male", "smiling"]


def contract_batch(tasks: list[Task], batch: int = 4, size: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors shaped and valued as the data contract says, with some invalid pixels."""
    g = torch.Generator().manual_seed(seed)
    out = {"image": torch.randn(batch, 3, size, size, generator=g)}
    targets = {
        "seg": lambda: torch.randint(0, NUM_CLASSES, (batch, size, size), generator=g).masked_fill_(
            torch.rand(batch, size, size, generator=g) < 0.1, 255
        ),
        "depth": lambda: (torch.rand(batch, 1, size, size, generator=g) * 10).masked_fill_(
            torch.rand(batch, 1, size, size, generator=g) < 0.1, 0.0
        ),
        "normal": lambda: torch.nn.functional.normalize(torch.randn(batch, 3, size, size, generator=g), dim=1)
        * (torch.rand(batch, 1, size, size, generator=g) > 0.1),
        "edge": lambda: (torch.rand(batch, 1, size, size, generator=g) < 0.2).float(),
    }
    for t in tasks:
        out[t.name] = targets[t.name]() if t.kind == "dense" else torch.randint(0, 2, (batch,), generator=g).float()
    return out


@pytest.fixture(scope="module")
def resnet50_model():
    model = build_model(["seg", "depth", "normal", "edge", "male"], num_classes=40, backbone="resnet50")
    return model.eval()


def test_small_backbone_outputs_and_registry_losses_and_metrics():
    tasks = [get_task(n) for n in ALL_KINDS]
    model = build_model(tasks, num_classes=NUM_CLASSES, backbone="small", aspp_channels=16)
    batch = contract_batch(tasks)
    out = model(batch["image"])
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "seg": (4, NUM_CLASSES, 64, 64),
        "depth": (4, 1, 64, 64),
        "normal": (4, 3, 64, 64),
        "edge": (4, 1, 64, 64),
        "male": (4,),
        "smiling": (4,),
    }
    assert model.backbone(batch["image"])["layer4"].shape[-2:] == (8, 8)  # output stride 8
    for t in tasks:
        assert torch.isfinite(t.loss(out[t.name], batch[t.name]))
        metric = t.metrics()
        metric.update(out[t.name].detach(), batch[t.name])
        assert set(metric.compute()) == set(metric.directions)


def test_resnet50_outputs_at_output_stride_8(resnet50_model):
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert resnet50_model.backbone(x)["layer4"].shape == (1, 2048, 8, 8)
        out = resnet50_model(x)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "seg": (1, 40, 64, 64), "depth": (1, 1, 64, 64), "normal": (1, 3, 64, 64), "edge": (1, 1, 64, 64), "male": (1,)
    }
    # The extractor drops the classifier; every shared weight is under "backbone.".
    names = [n for n, _ in resnet50_model.named_parameters()]
    assert not any("fc." in n for n in names if n.startswith("backbone."))
    assert all(n.startswith(("backbone.", "heads.")) for n in names)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_has_output_stride_8(name):
    extractor = create_feature_extractor(build_backbone(name).eval(), ["layer4"])
    with torch.no_grad():
        assert extractor(torch.zeros(1, 3, 32, 32))["layer4"].shape[-2:] == (4, 4)


def test_backbone_runs_once_per_forward():
    model = build_model(
        ["seg", "depth", "normal", "male"], num_classes=NUM_CLASSES, backbone="small", aspp_channels=8,
        attach={"depth": "layer2", "normals": "layer3.1.conv1"},
    )
    calls = []
    model.backbone.register_forward_hook(lambda *_: calls.append(1))
    model(torch.randn(2, 3, 64, 64))
    assert len(calls) == 1


def test_extractor_stops_at_the_deepest_attachment(resnet50_model):
    shallow = build_model(
        ["seg", "depth", "normal", "edge", "male"], num_classes=40, backbone="resnet50",
        attach=dict.fromkeys(["seg", "depth", "normal", "edge", "male"], "layer2"),
    ).eval()
    names = [n for n, _ in shallow.backbone.named_parameters()]
    assert any(n.startswith("layer2.") for n in names)
    assert not any(n.startswith(("layer3", "layer4")) for n in names)
    x = torch.randn(1, 3, 64, 64)

    def flops(model):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model.backbone(x)
        return counter.get_total_flops()

    assert flops(shallow) < flops(resnet50_model) / 5
    # Wall clock too: interleaved runs, best of five each, so that load from other processes
    # on a shared machine falls on both alike.
    times = {"shallow": [], "full": []}
    with torch.no_grad():
        for _ in range(5):
            for name, model in (("shallow", shallow), ("full", resnet50_model)):
                start = time.perf_counter()
                model.backbone(x)
                times[name].append(time.perf_counter() - start)
    assert min(times["shallow"]) < min(times["full"])


def test_lomt_attachment_at_any_node():
    model = build_model(
        ["seg", "depth"], num_classes=40, backbone="resnet50", attach={"seg": "layer3.3.conv1", "depth": "layer2"}
    )
    assert model.attach == {"seg": "layer3.3.conv1", "depth": "layer2"}
    names = [n for n, _ in model.backbone.named_parameters()]
    assert "layer3.3.conv1.weight" in names
    assert not any(n.startswith(("layer3.3.bn1", "layer3.4", "layer4")) for n in names)
    # Head input channels come from the node: 256 after layer3's bottleneck conv1, 512 after layer2.
    assert model.heads["seg"][0].convs[0][0].in_channels == 256
    assert model.heads["depth"][0].convs[0][0].in_channels == 512


def test_attachment_errors():
    with pytest.raises(ValueError, match=r"\['layer9'\] are not in the backbone"):
        build_model(["seg"], num_classes=3, backbone="small", attach={"seg": "layer9"})
    with pytest.raises(ValueError, match="not among the model's tasks"):
        build_model(["seg"], num_classes=3, backbone="small", attach={"depth": "layer2"})
    with pytest.raises(ValueError, match="valid backbones"):
        build_model(["seg"], num_classes=3, backbone="vgg16")


def test_weights_from_a_local_file(tmp_path):
    source = build_backbone("small")
    path = tmp_path / "small.pth"
    torch.save(source.state_dict(), path)
    model = build_model(["seg"], num_classes=3, backbone="small", weights=path)
    assert torch.equal(model.backbone.get_parameter("conv1.weight"), source.conv1.weight)
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        build_model(["seg"], num_classes=3, backbone="small", weights=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="do not match"):
        build_backbone("resnet50", weights=path)


def test_deeplab_head_matches_torchvision_at_256_channels():
    ours, theirs = DeepLabV3Head(16, 5).eval(), DeepLabHead(16, 5).eval()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))


def test_uncertainty_weighted_adam_steps_lower_every_task_loss():
    torch.manual_seed(0)
    tasks = [get_task(n) for n in ALL_KINDS]
    model = build_model(tasks, num_classes=NUM_CLASSES, backbone="small", aspp_channels=16)
    # Dropout off (BatchNorm still in training mode), so the losses before and after compare
    # the same function rather than two random masks.
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.eval()
    weighting = UncertaintyWeighting([t.name for t in tasks])
    optimizer = torch.optim.Adam([*model.parameters(), *weighting.parameters()], lr=1e-3)
    batch = contract_batch(tasks, size=32)  # small images keep the ten steps quick

    def task_losses():
        out = model(batch["image"])
        return {t.name: t.loss(out[t.name], batch[t.name]) for t in tasks}

    first = {k: v.item() for k, v in task_losses().items()}
    log_vars = weighting.log_vars.detach().clone()
    for _ in range(10):
        optimizer.zero_grad()
        weighting(task_losses()).backward()
        optimizer.step()
    last = {k: v.item() for k, v in task_losses().items()}
    assert all(last[k] < first[k] for k in first), (first, last)
    assert not torch.equal(weighting.log_vars.detach(), log_vars)
