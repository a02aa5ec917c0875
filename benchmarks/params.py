"""The parameter sets the benchmarks step: the papers' real model shapes and a size sweep.

A :class:`ParamSet` holds one optimizer step's inputs, generated from a seed: the params, their
gradients, a warm Adam state (``exp_avg``, ``exp_avg_sq``, ``step``) and which tensors take the
prox. Every method under comparison starts each timed round from exactly this state (see
:meth:`benchmarks.baselines.Method.restore`), so every round does the same work: the same
params, the same gradients and the same groups zeroed.

Conv weights that take the prox are drawn as a mid-training network looks: Kaiming-scaled
elements times a per-input-channel scale ``u ~ U(0.05, 2)``, so group norms spread over a
range and :func:`choose_lambda` can pick the ``lambda_`` that zeroes a chosen fraction of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lomt_kernels.grouping import as_groups

#: Adam hyperparameters shared by every method.
LR = 1e-3
BETAS = (0.9, 0.999)
EPS = 1e-8
#: The Adam step count of the warm state (the timed step is step ``STEP0 + 1``).
STEP0 = 100
#: Fraction of groups (elements for ``l1``) the chosen ``lambda_`` zeroes in the timed step.
TARGET_ZERO_FRACTION = 0.5
#: Bytes a one-pass fp32 step must move per param: read p, g, m, v and write p, m, v.
BYTES_PER_PARAM = 28


def step_gbs(numel: int, ms: float) -> float:
    """The effective bandwidth of a step over ``numel`` params that took ``ms`` milliseconds, in
    GB/s, counting :data:`BYTES_PER_PARAM` per param."""
    return BYTES_PER_PARAM * numel / (ms / 1e3) / 1e9

#: Realistic conv shapes for the size sweep (all appear in ResNet-50/DeepLab-V3).
SWEEP_SHAPES = (
    (512, 512, 3, 3),
    (2048, 512, 1, 1),
    (256, 256, 3, 3),
    (512, 2048, 1, 1),
    (128, 128, 3, 3),
    (1024, 256, 1, 1),
    (64, 64, 3, 3),
)
#: Default sweep sizes, in millions of params.
SWEEP_SIZES_M = (1, 4, 16, 64)


@dataclass
class ParamSet:
    """One optimizer step's inputs. ``prox_mask[i]`` says whether tensor ``i`` takes the prox."""

    name: str
    description: str
    params: list[Tensor]
    grads: list[Tensor]
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    prox_mask: list[bool]
    step: float = float(STEP0)
    lambdas: dict[str, float] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def prox_numel(self) -> int:
        return sum(p.numel() for p, m in zip(self.params, self.prox_mask) if m)

    @property
    def num_prox_tensors(self) -> int:
        return sum(self.prox_mask)

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    @property
    def bytes_per_step(self) -> int:
        """The bytes a one-pass fp32 step moves: :data:`BYTES_PER_PARAM` per param."""
        return BYTES_PER_PARAM * self.numel


def _grouped_conv_weight(shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    """Kaiming-normal elements times a per-input-channel scale in ``[0.05, 2)``."""
    fan_in = math.prod(shape[1:])
    w = torch.randn(shape, generator=gen) * math.sqrt(2.0 / fan_in)
    scale = 0.05 + 1.95 * torch.rand(shape[1], generator=gen)
    return w.mul_(scale.view(1, -1, *([1] * (len(shape) - 2))))


def _fill_state(
    name: str, description: str, params: list[Tensor], prox_mask: list[bool], seed: int,
    device: torch.device | str,
) -> ParamSet:
    """Random gradients and a warm Adam state for ``params``, moved to ``device``."""
    gen = torch.Generator().manual_seed(seed + 1)
    grads, ms, vs = [], [], []
    for p in params:
        g = torch.randn(p.shape, generator=gen).mul_(1e-2)
        grads.append(g)
        ms.append(torch.randn(p.shape, generator=gen).mul_(3e-3))
        vs.append(torch.randn(p.shape, generator=gen).mul_(1e-2).square_().add_(1e-6))
    device = torch.device(device)
    move = lambda ts: [t.to(device).contiguous() for t in ts]  # noqa: E731
    pset = ParamSet(name, description, move(params), move(grads), move(ms), move(vs), prox_mask)
    for prox in ("group", "group_weighted", "l1"):
        pset.lambdas[prox] = choose_lambda(pset, prox)
    return pset


def conv_set(
    name: str, shapes: list[tuple[int, ...]], device: torch.device | str = "cpu", *,
    seed: int = 0, description: str = "",
) -> ParamSet:
    """Random conv weights of ``shapes`` (all take the prox)."""
    gen = torch.Generator().manual_seed(seed)
    params = [_grouped_conv_weight(s, gen) for s in shapes]
    n = sum(math.prod(s) for s in shapes)
    description = description or f"{len(shapes)} conv weights, {n / 1e6:.2f}M params"
    return _fill_state(name, description, params, [True] * len(params), seed, device)


def resnet50_conv_shapes() -> list[tuple[int, ...]]:
    """The 53 conv weight shapes of torchvision's dilated ResNet-50 (output stride 8)."""
    from torchvision.models import resnet50

    with torch.device("meta"):
        model = resnet50(replace_stride_with_dilation=[False, True, True])
    return [tuple(p.shape) for p in model.parameters() if p.dim() == 4]


def resnet50_backbone(device: torch.device | str = "cpu", *, seed: int = 0) -> ParamSet:
    """The 53 conv weights of ``resnet50(replace_stride_with_dilation=[False, True, True])``."""
    shapes = resnet50_conv_shapes()
    n = sum(math.prod(s) for s in shapes)
    return conv_set(
        "resnet50-convs", shapes, device, seed=seed,
        description=f"dilated ResNet-50 backbone, its {len(shapes)} conv weights ({n / 1e6:.2f}M params, all with the prox)",
    )


def nyu_model_params(*, backbone: str = "resnet50", aspp_channels: int | None = None) -> list[tuple[Tensor, bool]]:
    """The trainable params of the NYU 3-task model, each with whether it takes the prox
    (:func:`lomt_kernels.prox_param_groups` ``(model, "backbone")``'s split). Built on the default
    device: under ``torch.device("meta")`` only their shapes cost anything."""
    from lomt_kernels import prox_param_groups
    from lomt_train.models import build_model

    model = build_model(["seg", "normal", "depth"], num_classes=40, backbone=backbone, aspp_channels=aspp_channels)
    sparse_ids = {id(p) for p in prox_param_groups(model, "backbone", lambda_=1.0)[0]["params"]}
    return [(p, id(p) in sparse_ids) for p in model.parameters() if p.requires_grad]


def nyu_multitask(
    device: torch.device | str = "cpu", *, backbone: str = "resnet50", seed: int = 0,
    aspp_channels: int | None = None,
) -> ParamSet:
    """All params of the NYU 3-task model: the prox on the backbone's conv weights, Adam elsewhere.

    The split is :func:`lomt_kernels.prox_param_groups` ``(model, "backbone")``'s.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    params, mask = [], []
    for p, is_sparse in nyu_model_params(backbone=backbone, aspp_channels=aspp_channels):
        params.append(_grouped_conv_weight(tuple(p.shape), gen) if is_sparse else p.detach().clone())
        mask.append(is_sparse)
    n = sum(p.numel() for p in params)
    n_sparse = sum(p.numel() for p, m in zip(params, mask) if m)
    name = "nyu-3task" if backbone == "resnet50" else f"nyu-3task-{backbone}"
    description = (
        f"NYU seg+normal+depth model ({backbone} + 3 DeepLab heads), all {len(params)} params "
        f"({n / 1e6:.2f}M): prox on the backbone's {sum(mask)} conv weights "
        f"({n_sparse / 1e6:.2f}M), Adam elsewhere"
    )
    return _fill_state(name, description, params, mask, seed, device)


def sweep_shapes(n_params: int) -> list[tuple[int, ...]]:
    """Conv shapes from :data:`SWEEP_SHAPES`, cycled, adding up to about ``n_params``."""
    shapes: list[tuple[int, ...]] = []
    total, i, misses = 0, 0, 0
    while total < 0.97 * n_params and misses < len(SWEEP_SHAPES):
        shape = SWEEP_SHAPES[i % len(SWEEP_SHAPES)]
        i += 1
        size = math.prod(shape)
        if total + size <= 1.03 * n_params:
            shapes.append(shape)
            total += size
            misses = 0
        else:
            misses += 1
    return shapes


def sweep_set(n_params: int, device: torch.device | str = "cpu", *, seed: int = 0) -> ParamSet:
    """A stack of realistic conv weights with about ``n_params`` params, for the size sweep."""
    shapes = sweep_shapes(n_params)
    return conv_set(f"sweep-{n_params / 1e6:g}M", shapes, device, seed=seed)


def small_convs(device: torch.device | str = "cpu", *, seed: int = 0) -> ParamSet:
    """A few small conv weights plus a bias and a Linear weight: the CI smoke set."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(32, 16, 3, 3), (64, 32, 1, 1), (16, 64, 3, 3), (8, 8, 7, 7)]
    params = [_grouped_conv_weight(s, gen) for s in shapes]
    params += [torch.randn(64, generator=gen), torch.randn(10, 64, generator=gen) * 0.1]
    mask = [True] * len(shapes) + [False, False]
    return _fill_state("small-convs", "4 small conv weights (prox), a bias and a Linear weight (Adam)", params, mask, seed, device)


def adam_z_and_d(pset: ParamSet, i: int) -> tuple[Tensor, Tensor]:
    """Tensor ``i``'s Adam output ``z`` and denominator ``d`` in the timed step (float32)."""
    b1, b2 = BETAS
    step = pset.step + 1
    g = pset.grads[i].float()
    m = pset.exp_avgs[i].float() * b1 + (1 - b1) * g
    v = pset.exp_avg_sqs[i].float() * b2 + (1 - b2) * g * g
    d = v.sqrt() / math.sqrt(1 - b2**step) + EPS
    z = pset.params[i].float() - (LR / (1 - b1**step)) * m / d
    return z, d


@torch.no_grad()
def choose_lambda(pset: ParamSet, prox: str, target: float = TARGET_ZERO_FRACTION) -> float:
    """The ``lambda_`` whose prox zeroes a ``target`` fraction of the groups in the timed step.

    A group ``G`` of ``n_G`` elements is zeroed iff ``||z_G|| <= tau`` (``group``) or
    ``||d_G z_G|| <= tau`` (``group_weighted``), ``tau = lr * lambda_ * sqrt(n_G)``; so
    ``lambda_`` is the ``target`` quantile of ``||.|| / (lr sqrt(n_G))`` over all groups of all
    prox tensors. For ``l1`` it is the quantile of ``|z| / lr`` over (a uniform sample of) the
    elements, so the target is then a fraction of elements.
    """
    ratios = []
    gen = torch.Generator().manual_seed(0)
    for i, use in enumerate(pset.prox_mask):
        if not use:
            continue
        z, d = adam_z_and_d(pset, i)
        if prox == "l1":
            flat = z.flatten().abs() / LR
            k = math.ceil(flat.numel() * 200_000 / pset.prox_numel)  # ~200k samples in all
            if flat.numel() > k:
                idx = torch.randint(flat.numel(), (k,), generator=gen).to(flat.device)
                flat = flat[idx]
            ratios.append(flat.cpu())
            continue
        rows = as_groups(z * d if prox == "group_weighted" else z, "in_channel")
        ratios.append((rows.norm(dim=1) / (LR * math.sqrt(rows.shape[1]))).cpu())
    return float(torch.cat(ratios).double().quantile(target))


def set_names(small: bool = False, sizes_m: tuple[float, ...] = SWEEP_SIZES_M) -> list[str]:
    """The sets a benchmark run steps: the papers' models and the sweep, or the small CI sets."""
    if small:
        return ["small-convs", "nyu-3task-small"]
    return ["resnet50-convs", "nyu-3task"] + [f"sweep-{m:g}M" for m in sizes_m]


def build_set(name: str, device: torch.device | str = "cpu") -> ParamSet:
    """The :class:`ParamSet` called ``name`` (one of :func:`set_names`'s), on ``device``."""
    if name == "resnet50-convs":
        return resnet50_backbone(device)
    if name == "nyu-3task":
        return nyu_multitask(device)
    if name == "nyu-3task-small":
        return nyu_multitask(device, backbone="small", aspp_channels=16)
    if name == "small-convs":
        return small_convs(device)
    if name.startswith("sweep-") and name.endswith("M"):
        return sweep_set(round(float(name[len("sweep-"):-1]) * 1e6), device)
    raise ValueError(f"unknown param set {name!r}: expected one of {set_names()}, {set_names(True)} or sweep-<millions>M")
