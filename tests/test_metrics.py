"""Metrics against values worked out by hand on small arrays."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from lomt_train.metrics import BinaryMetric, DepthMetric, NormalMetric, SegMetric, delta_m

# Segmentation, 3 classes, two images of 2x3 pixels (255 = ignore).
SEG_TARGET = torch.tensor([[[0, 0, 1], [1, 2, 255]], [[2, 2, 0], [0, 255, 255]]])
SEG_PRED = torch.tensor([[[0, 1, 1], [1, 0, 2]], [[2, 2, 0], [0, 1, 1]]])
# Counted (target, prediction) pairs:
#   image 0: (0,0) (0,1) (1,1) (1,1) (2,0)      -> 3 correct, 2 wrong
#   image 1: (2,2) (2,2) (0,0) (0,0)            -> 4 correct, 0 wrong
# Confusion (rows target, columns prediction):
#   t0: p0=3 p1=1 | t1: p1=2 | t2: p0=1 p2=2
# TP = [3, 2, 2]; union_c = row_c + col_c - TP_c:
#   c0: 4 + 4 - 3 = 5 -> 3/5;  c1: 2 + 3 - 2 = 3 -> 2/3;  c2: 3 + 2 - 2 = 3 -> 2/3
# mIoU = (3/5 + 2/3 + 2/3) / 3 = 29/45; pixel accuracy = 7/9.
# Per-image micro IoU = correct / (correct + 2 wrong): 3/7 and 4/4 -> mean 5/7 (pooled over the
# split it would be 7 / (7 + 2*2) = 7/11, so the per-image mean is what is measured).
SEG_MIOU = (3 / 5 + 2 / 3 + 2 / 3) / 3


def _logits(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return F.one_hot(labels.clamp(max=num_classes - 1), num_classes).permute(0, 3, 1, 2).float()


def test_seg_metric_by_hand():
    metric = SegMetric(num_classes=3)
    metric.update(SEG_PRED, SEG_TARGET)
    out = metric.compute()
    assert out["miou"] == pytest.approx(SEG_MIOU)
    assert out["pixel_acc"] == pytest.approx(7 / 9)
    assert out["iou_micro_per_image_paper"] == pytest.approx(5 / 7)
    assert set(out) == set(SegMetric.directions)


def test_seg_paper_iou_is_micro_over_classes_and_skips_images_without_counted_pixels():
    # Image 0, 2x2, 3 classes: target [[0, 0], [1, 2]], prediction [[0, 1], [1, 1]].
    #   per class: c0 TP 1 FP 0 FN 1; c1 TP 1 FP 2 FN 0; c2 TP 0 FP 0 FN 1
    #   micro: (1 + 1 + 0) / ((1+0+1) + (1+2+0) + (0+0+1)) = 2/6 = 1/3 (a per-class mean over
    #   present classes would be (1/2 + 1/3 + 0) / 3 = 5/18 instead).
    # Image 1: class 2 everywhere, predicted right: 1. Image 2: all ignored, so not an image that counts.
    # Mean over the two counted images: (1/3 + 1) / 2 = 2/3.
    target = torch.tensor([[[0, 0], [1, 2]], [[2, 2], [2, 2]], [[255, 255], [255, 255]]])
    pred = torch.tensor([[[0, 1], [1, 1]], [[2, 2], [2, 2]], [[0, 1], [2, 0]]])
    metric = SegMetric(num_classes=3)
    metric.update(pred, target)
    assert metric.compute()["iou_micro_per_image_paper"] == pytest.approx(2 / 3)


def test_seg_metric_skips_classes_with_empty_union_and_learns_classes_from_logits():
    # A fourth class appears in neither target nor prediction: its union is 0, so the mean
    # is still over the three classes above. C is read from the logits' channel dimension.
    metric = SegMetric()
    metric.update(_logits(SEG_PRED, 4), SEG_TARGET)
    assert metric.num_classes == 4
    assert metric.compute()["miou"] == pytest.approx(SEG_MIOU)


def test_seg_metric_accumulates_over_batches_and_resets():
    metric = SegMetric(num_classes=3)
    for i in range(2):
        metric.update(SEG_PRED[i : i + 1], SEG_TARGET[i : i + 1])
    assert metric.compute()["miou"] == pytest.approx(SEG_MIOU)
    assert metric.compute()["iou_micro_per_image_paper"] == pytest.approx(5 / 7)
    metric.reset()
    assert int(metric.state()["confusion"].sum()) == 0
    assert math.isnan(metric.compute()["pixel_acc"])


def test_seg_metric_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        SegMetric(num_classes=3).update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 3))


def test_depth_metric_by_hand():
    # Valid pixels are those with target > 0: targets 1, 2, 4 with predictions 2, 2, 3.
    # errors e = 1, 0, -1; |e|/t = 1, 0, 1/4.
    target = torch.tensor([[[[1.0, 2.0], [0.0, 4.0]]]])
    pred = torch.tensor([[[[2.0, 2.0], [5.0, 3.0]]]])
    metric = DepthMetric()
    metric.update(pred, target)
    out = metric.compute()
    assert out["abs_err"] == pytest.approx(2 / 3)
    assert out["rel_err"] == pytest.approx(1.25 / 3)
    assert out["rmse"] == pytest.approx(math.sqrt(2 / 3))


def test_depth_paper_abs_err_normalises_each_image_by_its_own_maximum():
    # Image 0: targets 1, 2, (0 invalid), 4 with predictions 2, 2, 3 -> |e| = 1, 0, 1; its max is 4,
    #   so the normalised errors are 1/4, 0, 1/4.
    # Image 1: targets 1, 1, 1, 2 with predictions 1, 1, 1, 1 -> |e| = 0, 0, 0, 1; its max is 2,
    #   so the normalised errors are 0, 0, 0, 1/2.
    # abs_err_norm_paper = (1/4 + 1/4 + 1/2) / 7 = 1/7; in metres abs_err = 3/7. Normalising by the
    # split's maximum (4) instead would give 3/4 / 7.
    target = torch.tensor([[[[1.0, 2.0], [0.0, 4.0]]], [[[1.0, 1.0], [1.0, 2.0]]]])
    pred = torch.tensor([[[[2.0, 2.0], [5.0, 3.0]]], [[[1.0, 1.0], [1.0, 1.0]]]])
    metric = DepthMetric()
    metric.update(pred, target)
    out = metric.compute()
    assert out["abs_err_norm_paper"] == pytest.approx(1 / 7)
    assert out["abs_err"] == pytest.approx(3 / 7)
    assert set(out) == set(DepthMetric.directions)
    # The same images one per batch, summed across two "ranks" with sync: the same figure.
    ranks = [DepthMetric(), DepthMetric()]
    for i, rank in enumerate(ranks):
        rank.update(pred[i : i + 1], target[i : i + 1])
    other = iter(ranks[1].state().values())
    ranks[0].sync(lambda t: t + next(other))
    assert ranks[0].compute()["abs_err_norm_paper"] == pytest.approx(1 / 7)


def _normals(vectors: list[tuple[float, float, float]]) -> torch.Tensor:
    # [N, 3] -> [1, 3, 1, N]
    return torch.tensor(vectors, dtype=torch.float32).T[None, :, None, :]


def test_normal_metric_by_hand():
    # Target (1,0,0) everywhere except an invalid zero pixel. Predictions (unnormalised) at
    # 0, 90, 45 and 20 degrees from it; the fifth pixel is invalid and must not count.
    c20, s20 = math.cos(math.radians(20)), math.sin(math.radians(20))
    pred = _normals([(3, 0, 0), (0, 1, 0), (1, 1, 0), (c20, s20, 0), (5, 5, 5)])
    target = _normals([(1, 0, 0)] * 4 + [(0, 0, 0)])
    metric = NormalMetric()
    metric.update(pred, target)
    out = metric.compute()
    # Angles 0, 90, 45, 20: mean 155 / 4; sorted 0, 20, 45, 90 -> lower median (2nd) 20,
    # read from 0.1-degree bins (bin centre, so within 0.05).
    assert out["mean_angle"] == pytest.approx(155 / 4, abs=1e-4)
    assert out["median_angle"] == pytest.approx(20, abs=0.05 + 1e-6)
    assert out["within_11.25"] == pytest.approx(1 / 4)  # 0
    assert out["within_22.5"] == pytest.approx(2 / 4)  # 0, 20
    assert out["within_30"] == pytest.approx(2 / 4)
    assert out["cos_sim"] == pytest.approx((1 + 0 + math.sqrt(0.5) + c20) / 4, abs=1e-6)


def test_normal_median_uses_the_histogram_across_batches():
    # Three batches with angles 90, 0, 90: the median over the split is 90 (bin 900's centre).
    metric = NormalMetric()
    for vector in [(0, 1, 0), (1, 0, 0), (0, 0, 1)]:
        metric.update(_normals([vector]), _normals([(1, 0, 0)]))
    assert metric.compute()["median_angle"] == pytest.approx(90.05, abs=1e-6)
    assert int(metric.state()["histogram"].sum()) == 3


def test_binary_metric_by_hand():
    # Logit > 0 is a positive prediction.
    pred = torch.tensor([2.0, -1.0, 0.5, -3.0, 1.0, -0.2, -1.0])
    target = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    # positive prediction: T F T F T F F -> TP = 2 (0, 4), FP = 1 (2), FN = 1 (1), TN = 3 (3, 5, 6).
    metric = BinaryMetric()
    metric.update(pred, target)
    out = metric.compute()
    assert out["accuracy"] == pytest.approx(5 / 7)
    assert out["precision"] == pytest.approx(2 / 3)
    assert out["recall"] == pytest.approx(2 / 3)
    assert out["f1"] == pytest.approx(4 / 6)  # 2TP / (2TP + FP + FN)
    # Negative-class F1 = 2TN / (2TN + FN + FP) = 6/8; supports 3 (positive) and 4 (negative).
    assert out["f1_weighted"] == pytest.approx((3 * 2 / 3 + 4 * 6 / 8) / 7)


def test_binary_metric_on_edge_maps():
    # Same counts laid out as a [B, 1, H, W] edge map.
    pred = torch.tensor([2.0, -1.0, 0.5, -3.0, 1.0, -0.2, -1.0, -1.0]).view(2, 1, 2, 2)
    target = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]).view(2, 1, 2, 2)
    metric = BinaryMetric()
    metric.update(pred, target)
    assert metric.compute()["f1"] == pytest.approx(2 / 3)
    assert metric.compute()["accuracy"] == pytest.approx(6 / 8)


def test_binary_metric_zero_division():
    # No positive prediction: precision is 0/0 -> 0 (scikit-learn's zero_division=0); an
    # empty metric has no accuracy at all (NaN).
    metric = BinaryMetric()
    metric.update(torch.tensor([-1.0, -2.0]), torch.tensor([1.0, 0.0]))
    out = metric.compute()
    assert out["precision"] == 0.0 and out["recall"] == 0.0 and out["f1"] == 0.0
    assert out["accuracy"] == pytest.approx(1 / 2)
    # f1_weighted: positive class F1 0 (support 1), negative class 2*1 / (2 + 1) (support 1).
    assert out["f1_weighted"] == pytest.approx((0 + 2 / 3) / 2)
    assert math.isnan(BinaryMetric().compute()["accuracy"])


def test_sync_adds_the_states_of_other_ranks():
    # Two "ranks" each see one image; summing their states gives the whole split's figures.
    ranks = [SegMetric(num_classes=3), SegMetric(num_classes=3)]
    for i, metric in enumerate(ranks):
        metric.update(SEG_PRED[i : i + 1], SEG_TARGET[i : i + 1])
    other = iter(ranks[1].state().values())
    ranks[0].sync(lambda t: t + next(other))
    assert ranks[0].compute()["miou"] == pytest.approx(SEG_MIOU)


def test_sync_with_torch_distributed_all_reduce():
    # all_reduce sums in place and returns None; a one-process group leaves the figures alone.
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        metric = DepthMetric()
        metric.update(torch.full((1, 1, 2, 2), 2.0), torch.full((1, 1, 2, 2), 1.0))
        metric.sync(dist.all_reduce)
        assert metric.compute()["abs_err"] == pytest.approx(1.0)
    finally:
        dist.destroy_process_group()


def test_delta_m_by_hand():
    directions = {"seg": {"miou": True, "pixel_acc": True}, "depth": {"abs_err": False}}
    baselines = {"seg": {"miou": 0.5, "pixel_acc": 0.8}, "depth": {"abs_err": 0.5}}
    model = {"seg": {"miou": 0.55, "pixel_acc": 0.72}, "depth": {"abs_err": 0.4, "rmse": 9.0}}
    # seg: miou +10 %, pixel_acc -10 % -> 0; depth: abs_err 20 % lower (better) -> +20 %.
    # Delta_m = (0 + 20) / 2 = 10; rmse is not in the baselines, so it does not count.
    assert delta_m(model, baselines, directions) == pytest.approx(10.0)
    assert delta_m(baselines, baselines, directions) == 0.0
    with pytest.raises(ValueError, match="is 0"):
        delta_m(model, {"depth": {"abs_err": 0.0}}, directions)
