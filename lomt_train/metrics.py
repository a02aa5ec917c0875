"""Evaluation metrics that accumulate over a whole split and compute once.

A metric keeps only sums and counts (tensors in :meth:`Metric.state`), so the figures are
those of the whole split, not means of per-batch figures, and a DDP trainer can add the
states of all ranks with :meth:`Metric.sync` before :meth:`Metric.compute`. State lives on
the device of the first update's tensors; sums are float64, counts int64.

A figure is NaN when nothing was counted for it (e.g. an empty split); precision, recall
and F1 with a zero denominator are 0, as in scikit-learn (``zero_division=0``). Fractions are
in [0, 1], not percentages; angles are in degrees; depths in metres.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import IGNORE_INDEX

ANGLE_BIN_DEGREES = 0.1
ANGLE_THRESHOLDS = (11.25, 22.5, 30.0)


def _ratio(num: Tensor | float, den: Tensor | float, undefined: float = math.nan) -> float:
    num, den = float(num), float(den)
    return num / den if den else undefined


class Metric:
    """Base class: a dict of summable state tensors, ``update``, ``compute``, ``reset``, ``sync``.

    ``directions`` maps each name ``compute`` returns to ``True`` when higher is better.
    """

    directions: ClassVar[dict[str, bool]] = {}

    def __init__(self) -> None:
        self._state: dict[str, Tensor] = {}

    def _add_state(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self._state[name] = torch.zeros(shape, dtype=dtype)

    def _accumulate(self, **increments: Tensor) -> None:
        """Add ``increments`` to the states of the same names, moving the state to their device once."""
        for name, inc in increments.items():
            state = self._state[name]
            if state.device != inc.device:
                state = self._state[name] = state.to(inc.device)
            state += inc.to(state.dtype)

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add one batch's predictions and targets."""
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        """The figures over everything added since the last reset."""
        raise NotImplementedError

    @torch.no_grad()
    def reset(self) -> None:
        for state in self._state.values():
            state.zero_()

    def state(self) -> dict[str, Tensor]:
        """The accumulated state by name: sums and counts, all reduced by addition across ranks."""
        return dict(self._state)

    @torch.no_grad()
    def sync(self, reduce_fn: Callable[[Tensor], Tensor | None]) -> None:
        """Reduce every state tensor with ``reduce_fn`` (a sum over ranks).

        ``reduce_fn`` either sums in place and returns ``None`` (``torch.distributed.all_reduce``
        as it is) or returns the summed tensor. Every rank must call it, in the same order.
        """
        for name, state in self._state.items():
            reduced = reduce_fn(state)
            if reduced is not None:
                self._state[name] = reduced


class SegMetric(Metric):
    """Semantic segmentation from a global confusion matrix over the split.

    ``update(pred, target)``: ``pred`` logits ``[B, C, H, W]`` (argmax taken) or labels
    ``[B, H, W]``; ``target`` labels ``[B, H, W]`` with 255 = ignore. Pixels with an ignored
    target are not counted. With ``num_classes=None`` the class count is taken from the first
    logits seen (give it explicitly when updating with labels, or before a DDP sync on a rank
    that may see no batch).

    * ``miou``: mean over classes c with a non-zero union of IoU_c = TP_c / (TP_c + FP_c + FN_c).
      The papers report this as their segmentation "IoU" (mean IoU).
    * ``pixel_acc``: correctly labelled pixels / counted pixels.
    * ``iou_micro_per_image_paper``: the papers' segmentation "IoU" (Table 1 of arXiv
      2308.12114), as their published code computes it (segmentation_models_pytorch
      ``iou_score(reduction="micro-imagewise")``): per image, the IoU micro-averaged over the
      classes present, sum_c TP_c / sum_c (TP_c + FP_c + FN_c) = correct / (correct + 2 wrong)
      (a wrong pixel is an FP of one class and an FN of another), then the mean over the images
      that have counted pixels. Classes absent from an image's target and prediction add
      nothing to its sums. Reported beside ``miou`` so results can be held against the tables.
    """

    directions: ClassVar[dict[str, bool]] = {"miou": True, "pixel_acc": True, "iou_micro_per_image_paper": True}

    def __init__(self, num_classes: int | None = None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self._add_state("image_iou_sum", (), torch.float64)
        self._add_state("images", (), torch.int64)
        if num_classes is not None:
            self._add_state("confusion", (num_classes, num_classes), torch.int64)

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        if pred.dim() == target.dim() + 1:
            if self.num_classes is None:
                self.num_classes = pred.shape[1]
                self._add_state("confusion", (self.num_classes, self.num_classes), torch.int64)
            pred = pred.argmax(dim=1)
        elif self.num_classes is None:
            raise ValueError("SegMetric without num_classes needs logits [B, C, H, W] to learn C from")
        if pred.shape != target.shape:
            raise ValueError(f"seg: prediction labels {tuple(pred.shape)} != target {tuple(target.shape)}")
        c = self.num_classes
        valid = target != IGNORE_INDEX
        t, p = target[valid], pred[valid]
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= c):
            raise ValueError(f"seg: target labels must be in [0, {c}) or {IGNORE_INDEX}")
        # Rows are targets, columns predictions.
        confusion = torch.bincount(t * c + p, minlength=c * c).view(c, c)
        correct = ((pred == target) & valid).flatten(1).sum(1)
        counted = valid.flatten(1).sum(1)
        wrong = counted - correct
        has_pixels = counted > 0
        image_iou = correct[has_pixels] / (correct[has_pixels] + 2 * wrong[has_pixels])
        self._accumulate(confusion=confusion, image_iou_sum=image_iou.double().sum(), images=has_pixels.sum())

    def compute(self) -> dict[str, float]:
        if "confusion" not in self._state:
            return dict.fromkeys(self.directions, math.nan)
        cm = self._state["confusion"].double()
        tp = cm.diag()
        union = cm.sum(0) + cm.sum(1) - tp
        present = union > 0
        return {
            "miou": float((tp[present] / union[present]).mean()) if present.any() else math.nan,
            "pixel_acc": _ratio(tp.sum(), cm.sum()),
            "iou_micro_per_image_paper": _ratio(self._state["image_iou_sum"], self._state["images"]),
        }


class DepthMetric(Metric):
    """Depth errors over the valid pixels (``target > 0``) of the whole split.

    ``pred``, ``target``: ``[B, 1, H, W]`` metres. With N valid pixels, e = pred - target:
    ``abs_err`` = sum|e| / N, ``rel_err`` = sum(|e| / target) / N, ``rmse`` = sqrt(sum e^2 / N)
    (pooled over all pixels of the split, not averaged per image).

    ``abs_err_norm_paper``: the papers' depth MAE (Table 1 of arXiv 2308.12114), on depth
    normalised per image. Their published code divides each depth map by its own maximum
    (``depth / depth.max()``) and trains and evaluates on that scale. Here both maps of image b
    are divided by m_b, the maximum of its target over valid pixels, so the figure is unitless:
    ``abs_err_norm_paper`` = sum_i |e_i| / m_b(i) / N (pooled like ``abs_err``). Their loader
    also clips the normalised target to [0.1, its 99th percentile]; that clip is not applied,
    since it would change the ground truth and turn invalid (zero) pixels into counted ones.
    """

    directions: ClassVar[dict[str, bool]] = {
        "abs_err": False, "rel_err": False, "rmse": False, "abs_err_norm_paper": False,
    }

    def __init__(self) -> None:
        super().__init__()
        for name in ("abs_sum", "rel_sum", "sq_sum", "norm_abs_sum"):
            self._add_state(name, (), torch.float64)
        self._add_state("count", (), torch.int64)

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        if pred.shape != target.shape:
            raise ValueError(f"depth: prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        valid = target > 0
        # Each image's largest valid depth; an image without valid pixels contributes no pixel.
        image_max = target.masked_fill(~valid, 0).flatten(1).amax(1).view(-1, *([1] * (target.dim() - 1)))
        t = target[valid].double()
        err = pred[valid].double() - t
        scale = image_max.expand_as(target)[valid].double()
        self._accumulate(
            abs_sum=err.abs().sum(), rel_sum=(err.abs() / t).sum(), sq_sum=err.square().sum(),
            norm_abs_sum=(err.abs() / scale).sum(), count=valid.sum(),
        )

    def compute(self) -> dict[str, float]:
        s = self._state
        mse = _ratio(s["sq_sum"], s["count"])
        return {
            "abs_err": _ratio(s["abs_sum"], s["count"]), "rel_err": _ratio(s["rel_sum"], s["count"]),
            "rmse": math.sqrt(mse), "abs_err_norm_paper": _ratio(s["norm_abs_sum"], s["count"]),
        }


class NormalMetric(Metric):
    """Surface-normal angular errors over the valid pixels (target not the zero vector).

    ``pred``, ``target``: ``[B, 3, H, W]``; both are normalised, so raw head outputs are fine.
    Per valid pixel, cos = <p, t> (clamped to [-1, 1]) and angle = acos(cos) in degrees.

    * ``mean_angle``, ``median_angle`` (degrees). The median comes from a histogram of 0.1 degree
      bins over [0, 180] (no per-pixel storage): it is the centre of the bin holding the
      ceil(N/2)-th smallest angle, so within 0.05 degrees of the lower median.
    * ``within_11.25``, ``within_22.5``, ``within_30``: fraction of pixels with angle < t.
    * ``cos_sim``: mean cosine similarity, the figure the papers report.
    """

    directions: ClassVar[dict[str, bool]] = {
        "mean_angle": False,
        "median_angle": False,
        **{f"within_{t:g}": True for t in ANGLE_THRESHOLDS},
        "cos_sim": True,
    }
    bins = round(180 / ANGLE_BIN_DEGREES)

    def __init__(self) -> None:
        super().__init__()
        self._add_state("angle_sum", (), torch.float64)
        self._add_state("cos_sum", (), torch.float64)
        self._add_state("count", (), torch.int64)
        self._add_state("within", (len(ANGLE_THRESHOLDS),), torch.int64)
        self._add_state("histogram", (self.bins,), torch.int64)

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        if pred.shape != target.shape:
            raise ValueError(f"normal: prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        valid = target.ne(0).any(dim=1)
        p = F.normalize(pred.double(), dim=1).movedim(1, -1)[valid]
        t = F.normalize(target.double(), dim=1).movedim(1, -1)[valid]
        cos = (p * t).sum(-1).clamp(-1.0, 1.0)
        angle = torch.rad2deg(torch.acos(cos))
        bins = (angle / ANGLE_BIN_DEGREES).long().clamp(max=self.bins - 1)
        thresholds = torch.tensor(ANGLE_THRESHOLDS, dtype=angle.dtype, device=angle.device)
        self._accumulate(
            angle_sum=angle.sum(),
            cos_sum=cos.sum(),
            count=valid.sum(),
            within=(angle[:, None] < thresholds).sum(0),
            histogram=torch.bincount(bins, minlength=self.bins),
        )

    def compute(self) -> dict[str, float]:
        s = self._state
        n = int(s["count"])
        if n:
            # First bin whose cumulative count reaches rank ceil(n/2).
            median_bin = int(torch.searchsorted(s["histogram"].cumsum(0), (n + 1) // 2))
            median = (median_bin + 0.5) * ANGLE_BIN_DEGREES
        else:
            median = math.nan
        return {
            "mean_angle": _ratio(s["angle_sum"], n),
            "median_angle": median,
            **{f"within_{t:g}": _ratio(w, n) for t, w in zip(ANGLE_THRESHOLDS, s["within"])},
            "cos_sim": _ratio(s["cos_sum"], n),
        }


class BinaryMetric(Metric):
    """Binary classification counts over the split: edges per pixel, attributes per image.

    ``pred`` logits, ``target`` in {0, 1}, same shape (``[B, 1, H, W]`` or ``[B]``). A prediction
    is positive when its logit is > 0 (probability > 0.5). From TP, FP, FN, TN:
    ``accuracy`` = (TP + TN) / N, ``precision`` = TP / (TP + FP), ``recall`` = TP / (TP + FN),
    ``f1`` = 2 TP / (2 TP + FP + FN) (the positive class; the edge F-score at a fixed 0.5
    threshold, not ODS), ``f1_weighted`` = support-weighted mean of the F1 of both classes
    (sklearn's ``average="weighted"``, the published code's attribute F1).
    """

    directions: ClassVar[dict[str, bool]] = {
        "accuracy": True,
        "precision": True,
        "recall": True,
        "f1": True,
        "f1_weighted": True,
    }

    def __init__(self) -> None:
        super().__init__()
        for name in ("tp", "fp", "fn", "tn"):
            self._add_state(name, (), torch.int64)

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        if pred.shape != target.shape:
            raise ValueError(f"binary: prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        positive, truth = pred > 0, target > 0.5
        self._accumulate(
            tp=(positive & truth).sum(), fp=(positive & ~truth).sum(),
            fn=(~positive & truth).sum(), tn=(~positive & ~truth).sum(),
        )

    def compute(self) -> dict[str, float]:
        tp, fp, fn, tn = (int(self._state[k]) for k in ("tp", "fp", "fn", "tn"))
        n = tp + fp + fn + tn
        f1_pos = _ratio(2 * tp, 2 * tp + fp + fn, 0.0)
        f1_neg = _ratio(2 * tn, 2 * tn + fn + fp, 0.0)
        return {
            "accuracy": _ratio(tp + tn, n),
            "precision": _ratio(tp, tp + fp, 0.0),
            "recall": _ratio(tp, tp + fn, 0.0),
            "f1": f1_pos,
            # Weights are the classes' supports, TP + FN and TN + FP.
            "f1_weighted": _ratio(f1_pos * (tp + fn) + f1_neg * (tn + fp), n),
        }


def delta_m(
    metrics: Mapping[str, Mapping[str, float]],
    baselines: Mapping[str, Mapping[str, float]],
    directions: Mapping[str, Mapping[str, bool]],
) -> float:
    """LibMTL's multi-task gain over a baseline, in percent (positive = better than baseline).

        Delta_m = 100 / T * sum_t 1 / N_t * sum_i (-1)^{l_i} (M_{b,i} - M_{m,i}) / M_{b,i}

    with l_i = 1 when higher is better (``directions[t][i]``), M_m the model's and M_b the
    baseline's value, over the T tasks of ``baselines`` and the N_t metrics listed for each
    (so ``baselines`` chooses which metrics count). This is LibMTL's ``count_improvement``;
    the sign makes every improvement positive.
    """
    if not baselines:
        raise ValueError("delta_m needs at least one task in baselines")
    per_task = []
    for task, base in baselines.items():
        if not base:
            raise ValueError(f"delta_m: no baseline metrics for task {task!r}")
        terms = []
        for name, b in base.items():
            if b == 0:
                raise ValueError(f"delta_m: baseline {task}/{name} is 0, so the relative change is undefined")
            sign = -1.0 if directions[task][name] else 1.0
            terms.append(sign * (b - metrics[task][name]) / b)
        per_task.append(sum(terms) / len(terms))
    return 100.0 * sum(per_task) / len(per_task)
