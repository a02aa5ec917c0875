"""MacFraction and channel_plan: MACs of the compacted network, read off the zero pattern."""

import pytest
import torch
from torch import nn

from lomt_kernels import MacFraction
from lomt_train.compaction import compact_model, count_macs, zero_random_groups
from lomt_train.models import build_model
from lomt_train.tasks import resolve_tasks


def test_a_chain_by_hand():
    # conv1 -> bn -> relu -> conv2 is a private chain: conv2's zero input groups drop conv1's rows.
    net = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 1))
    figure = MacFraction(net, torch.zeros(1, 4, 5, 5))
    assert figure.dense_macs == 25 * 8 * 4 * 9 + 25 * 6 * 8
    assert figure() == 1.0
    with torch.no_grad():
        net[3].weight[:, [1, 4, 6]] = 0
    assert figure() == pytest.approx((25 * 5 * 4 * 9 + 25 * 6 * 5) / (25 * 8 * 4 * 9 + 25 * 6 * 8), abs=1e-15)
    assert figure.decreases_with_lambda


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.7])
def test_equals_the_compacted_backbones_count(fraction):
    model = build_model(resolve_tasks(["seg", "depth"], "nyu"), num_classes=13, backbone="small", aspp_channels=8)
    model.eval()
    figure = MacFraction(model.backbone, torch.zeros(1, 3, 48, 48))
    zero_random_groups(model.backbone, fraction, seed=1)
    compact, _ = compact_model(model)
    expected = count_macs(compact.backbone, 48) / count_macs(model.backbone, 48)
    assert figure() == pytest.approx(expected, abs=1e-15)
    assert (figure() < 1.0) == (fraction > 0)


def test_counting_leaves_the_module_as_it_was():
    model = build_model(resolve_tasks(["seg"], "nyu"), num_classes=13, backbone="small", aspp_channels=8).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    MacFraction(model.backbone, torch.randn(2, 3, 32, 32))()
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # BatchNorm statistics untouched
