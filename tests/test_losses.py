"""Task losses on small hand-checked arrays, and the loss weightings."""

import math

import pytest
import torch
import torch.nn.functional as F

from lomt_train.losses import (
    EqualWeighting,
    UncertaintyWeighting,
    binary_loss,
    build_weighting,
    depth_loss,
    normal_loss,
    seg_loss,
)


def test_seg_loss_is_cross_entropy_over_non_ignored_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3, 3)
    target = torch.randint(0, 4, (2, 3, 3))
    target[0, 0] = 255
    expected = F.cross_entropy(logits, target, ignore_index=255)
    assert seg_loss(logits, target) == pytest.approx(float(expected))


def test_seg_loss_is_zero_not_nan_when_every_pixel_is_ignored():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = seg_loss(logits, torch.full((1, 2, 2), 255))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(logits.grad == 0)


def test_depth_loss_by_hand():
    # Valid pixels (target > 0): targets 1, 2, 4, predictions 3, 2, 3 -> errors 2, 0, -1.
    target = torch.tensor([[[[1.0, 2.0], [0.0, 4.0]]]])
    pred = torch.tensor([[[[3.0, 2.0], [5.0, 3.0]]]])
    assert depth_loss(pred, target) == pytest.approx((4 + 0 + 1) / 3)  # MSE, the default
    assert depth_loss(pred, target, mode="l1") == pytest.approx((2 + 0 + 1) / 3)
    with pytest.raises(ValueError, match="unknown depth loss mode"):
        depth_loss(pred, target, mode="huber")
    with pytest.raises(ValueError, match="shape"):
        depth_loss(pred[:, 0], target)


def test_normal_loss_by_hand():
    # Pixel 1: pred (2,0,0) vs (1,0,0): cos 1 -> 0. Pixel 2: (0,1,0) vs (1,0,0): cos 0 -> 1.
    # Pixel 3: target zero (invalid), ignored. Mean over valid pixels = 0.5.
    pred = torch.tensor([[2.0, 0, 0], [0, 1, 0], [7, 7, 7]]).T[None, :, None, :].requires_grad_()
    target = torch.tensor([[1.0, 0, 0], [1, 0, 0], [0, 0, 0]]).T[None, :, None, :]
    loss = normal_loss(pred, target)
    assert loss.item() == pytest.approx(0.5)
    loss.backward()
    assert torch.all(pred.grad[..., 2] == 0)  # the invalid pixel gets no gradient


def test_binary_loss_is_bce_with_logits():
    logits = torch.tensor([2.0, -1.0, 0.0])
    target = torch.tensor([1.0, 0.0, 1.0])
    # -log sigmoid(x) = log(1 + e^-x) for target 1; -log(1 - sigmoid(x)) = log(1 + e^x) for target 0.
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1)) + math.log(2)) / 3
    assert binary_loss(logits, target) == pytest.approx(expected)


def test_uncertainty_weighting_formula_and_weights():
    weighting = UncertaintyWeighting(["seg", "depth"])
    with torch.no_grad():
        weighting.log_vars.copy_(torch.tensor([0.0, math.log(2.0)]))
    losses = {"seg": torch.tensor(3.0), "depth": torch.tensor(4.0)}
    # exp(-0) * 3 + 0 + exp(-log 2) * 4 + log 2 = 3 + 2 + log 2
    assert weighting(losses).item() == pytest.approx(5 + math.log(2.0))
    assert weighting.weights() == pytest.approx({"seg": 1.0, "depth": 0.5})


def test_uncertainty_log_variances_train():
    weighting = UncertaintyWeighting(["seg", "depth"])
    optimizer = torch.optim.Adam(weighting.parameters(), lr=0.1)
    before = weighting.log_vars.detach().clone()
    total = weighting({"seg": torch.tensor(3.0), "depth": torch.tensor(0.5)})
    total.backward()
    optimizer.step()
    after = weighting.log_vars.detach()
    # d/ds (exp(-s) L + s) = 1 - L at s = 0: negative for L = 3 (s grows), positive for L = 0.5.
    assert after[0] > before[0] and after[1] < before[1]
    assert weighting.weights()["seg"] < 1.0 < weighting.weights()["depth"]


def test_equal_weighting_and_key_checks():
    weighting = EqualWeighting(["seg", "depth"])
    assert weighting({"seg": torch.tensor(3.0), "depth": torch.tensor(4.0)}).item() == 7.0
    assert weighting.weights() == {"seg": 1.0, "depth": 1.0}
    assert list(weighting.parameters()) == []
    with pytest.raises(ValueError, match="losses for"):
        weighting({"seg": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="distinct"):
        EqualWeighting(["seg", "seg"])


def test_build_weighting():
    assert isinstance(build_weighting("uncertainty", ["seg"]), UncertaintyWeighting)
    assert isinstance(build_weighting("equal", ["seg"]), EqualWeighting)
    with pytest.raises(ValueError, match="valid weightings"):
        build_weighting("gradnorm", ["seg"])
