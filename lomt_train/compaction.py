"""Physical compaction: turn a group-sparse model into a smaller dense one with the same outputs.

The prox zeroes *input-channel groups* ``W[:, c]`` of the backbone's convolutions. A zero group
means the conv ignores input channel ``c``; compaction removes that work:

* **Private channels** (a chain ``conv P -> BatchNorm B -> ReLU -> conv C`` in which each node
  has exactly one user, e.g. ``conv1 -> bn1 -> relu -> conv2`` inside a ResNet block): channel
  ``c`` is dropped from P's outputs, B's entries and C's inputs when ``C.weight[:, c] == 0``.
  This is exact although ``relu(B(P(x)))[c]`` is not zero (it is the constant
  ``relu(beta_c - mean_c * gamma_c / sqrt(var_c + eps))`` when P's row is zero, and something
  else otherwise): C multiplies it by zero weights, so it never reaches C's output.
* **Shared channels** (every other conv input: the residual stream read by a block's ``conv1``
  and ``downsample.0``, the stem, internal nodes that a head also reads): the tensor must stay
  full width, so the conv gets a gather, ``conv'(x.index_select(1, keep))`` with
  ``conv'.weight = W[:, keep]`` (:class:`GatherConv2d`).

The plan of kept channels comes from :func:`lomt_kernels.macs.channel_plan` (which also counts
the MACs a compacted model would compute, without building it). Heads and every tensor a head
reads are untouched.

Parameter accounting (what :func:`count_params` counts: every ``nn.Parameter``, not buffers such
as BatchNorm running statistics or gather indices): the compact model has
``dense - zero_in_groups - dead_rows - 2 * dropped_bn_channels`` parameters, where
``zero_in_groups`` are the elements of removed input groups (all exactly zero), ``dead_rows`` the
remaining elements of P's dropped output rows (their outputs are only ever multiplied by zero),
and each dropped BatchNorm channel takes its ``gamma`` and ``beta``.

A compact model is saved as ``compact.pt`` (a plain ``state_dict``) beside ``compact_spec.json``
(how to build the model, plus the channel counts of every narrowed module), and
:func:`load_compact` rebuilds it from the two.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from lomt_kernels.macs import channel_plan

from .checkpoint import atomic_save, atomic_write_text, load_checkpoint
from .config import RunConfig
from .models import MultiTaskModel, build_model
from .tasks import get_task
from .timing import measure_latency

SPEC_VERSION = 1


class GatherConv2d(nn.Module):
    """A convolution that reads only some input channels: ``conv(x.index_select(1, index))``.

    Input ``[B, C_full, H, W]``; ``index`` (a buffer, saved in the state_dict) holds the
    ``conv.in_channels`` channels kept, in increasing order; output as ``conv``'s.
    """

    def __init__(self, conv: nn.Conv2d, index: Tensor) -> None:
        super().__init__()
        if index.numel() != conv.in_channels:
            raise ValueError(f"gather of {index.numel()} channels for a conv with {conv.in_channels} inputs")
        self.conv = conv
        self.register_buffer("index", index.to(torch.long))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x.index_select(1, self.index))


def _narrow_conv(conv: nn.Conv2d, in_channels: int, out_channels: int) -> nn.Conv2d:
    """An empty conv with ``conv``'s hyperparameters and the given widths."""
    return nn.Conv2d(
        in_channels, out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, bias=conv.bias is not None, padding_mode=conv.padding_mode,
    )


def _narrow_bn(bn: nn.BatchNorm2d, channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                          track_running_stats=bn.track_running_stats)


def _apply_shapes(backbone: nn.Module, spec: dict[str, Any]) -> None:
    """Replace the backbone's convs and BatchNorms by empty ones of the widths in ``spec``."""
    # New modules take the place, device and mode of the old ones.
    for name, entry in spec["convs"].items():
        old = backbone.get_submodule(name)
        conv = _narrow_conv(old, entry["in"], entry["out"])
        new = GatherConv2d(conv, torch.zeros(entry["in"], dtype=torch.long)) if entry["gather"] else conv
        backbone.set_submodule(name, new.to(old.weight.device).train(backbone.training))
    for name, channels in spec["bns"].items():
        old = backbone.get_submodule(name)
        new = _narrow_bn(old, channels).to(old.running_mean.device).train(backbone.training)
        backbone.set_submodule(name, new)


@torch.no_grad()
def compact_model(model: MultiTaskModel) -> tuple[MultiTaskModel, dict[str, Any]]:
    """A compact copy of ``model`` and the spec of its narrowed modules.

    Returns ``(compact, spec)`` with ``spec = {"convs": {name: {"in", "out", "gather"}},
    "bns": {name: channels}}`` (backbone module names; unchanged modules are left out). In eval
    mode ``compact(x)`` equals ``model(x)`` up to float rounding; ``model`` is not modified.
    """
    source = model.backbone
    plans = {
        name: plan for name, plan in channel_plan(source).items()
        if plan.keep_in.numel() < source.get_submodule(name).in_channels
        or plan.keep_out.numel() < source.get_submodule(name).out_channels
    }
    spec: dict[str, Any] = {
        "convs": {name: {"in": p.keep_in.numel(), "out": p.keep_out.numel(), "gather": p.gather} for name, p in plans.items()},
        "bns": {
            p.bn: p.keep_out.numel() for p in plans.values()
            if p.bn is not None and p.keep_out.numel() < source.get_submodule(p.bn).num_features
        },
    }
    compact = copy.deepcopy(model)
    compact.train(model.training)  # deepcopy of an fx GraphModule comes back in training mode
    _apply_shapes(compact.backbone, spec)
    for name, plan in plans.items():
        old: nn.Conv2d = source.get_submodule(name)
        new = compact.backbone.get_submodule(name)
        if plan.gather:
            new.index.copy_(plan.keep_in)
            new = new.conv
        new.weight.copy_(old.weight[plan.keep_out][:, plan.keep_in])
        if old.bias is not None:
            new.bias.copy_(old.bias[plan.keep_out])
        if plan.bn in spec["bns"]:
            kept = compact.backbone.get_submodule(plan.bn).state_dict()
            for key, value in source.get_submodule(plan.bn).state_dict().items():
                # Per-channel tensors follow the kept channels; num_batches_tracked is a scalar.
                kept[key].copy_(value[plan.keep_out] if value.dim() == 1 else value)
    return compact, spec


@torch.no_grad()
def zero_random_groups(
    backbone: nn.Module, fraction: float, *, seed: int = 0, convs: Callable[[str], bool] | None = None
) -> None:
    """Synthetic group sparsity for tests and benchmarks, in place.

    Zeroes each input-channel group ``W[:, c]`` of the convs with more than 3 inputs (not the
    RGB stem) that ``convs(name)`` selects (all by default) with probability ``fraction``, and
    draws BatchNorm statistics and biases at random, so that, as in a trained model, the
    channels compaction drops carry non-zero constants.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, module in backbone.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels > 3 and (convs is None or convs(name)):
            module.weight[:, torch.rand(module.in_channels, generator=generator) < fraction] = 0
        elif isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
            module.bias.normal_(generator=generator)


def _num_classes(tasks: list[str], state: dict[str, Tensor]) -> int:
    """Segmentation classes, read off the checkpoint: the output width of the class-count head."""
    for name in tasks:
        if get_task(name).channels is None:
            last = [k for k in state if k.startswith(f"heads.{name}.") and k.endswith(".weight")][-1]
            return state[last].shape[0]
    return 1  # no task depends on the class count


def load_run_model(run_dir: str | Path) -> tuple[MultiTaskModel, dict[str, Any]]:
    """The selected (``best.pt``) model of a run folder in eval mode, and its build arguments."""
    run_dir = Path(run_dir)
    config = RunConfig.load(run_dir / "config.json")
    state = load_checkpoint(run_dir / "best.pt")["model"]
    build = {
        "tasks": list(config.tasks), "num_classes": _num_classes(config.tasks, state),
        "backbone": config.backbone, "attach": dict(config.attach), "aspp_channels": config.aspp_channels,
    }
    model = build_model(**build)
    model.load_state_dict(state)
    return model.eval(), build


def save_compact(model: MultiTaskModel, spec: dict[str, Any], build: dict[str, Any], path: str | Path) -> Path:
    """Write ``path`` (``compact.pt``, the state_dict) and ``compact_spec.json`` beside it."""
    path = Path(path)
    atomic_write_text(json.dumps({"version": SPEC_VERSION, "build": build, **spec}, indent=2),
                      path.with_name("compact_spec.json"))
    atomic_save(model.state_dict(), path)
    return path


def load_compact(path: str | Path) -> MultiTaskModel:
    """Rebuild a compact model from ``compact.pt`` and the ``compact_spec.json`` beside it (eval mode)."""
    path = Path(path)
    spec = json.loads(path.with_name("compact_spec.json").read_text())
    if spec.get("version") != SPEC_VERSION:
        raise ValueError(f"{path.with_name('compact_spec.json')}: spec version {spec.get('version')}, expected {SPEC_VERSION}")
    model = build_model(**spec["build"])
    _apply_shapes(model.backbone, spec)
    model.load_state_dict(load_checkpoint(path))
    return model.eval()


def count_params(module: nn.Module) -> int:
    """Elements of every ``nn.Parameter`` (buffers such as BN running statistics excluded)."""
    return sum(p.numel() for p in module.parameters())


def count_nonzero_params(module: nn.Module) -> int:
    return sum(int((p != 0).sum()) for p in module.parameters())


@torch.no_grad()
def count_macs(module: nn.Module, image_size: int) -> int:
    """Multiply-accumulates of one ``[1, 3, S, S]`` forward pass in eval mode (FLOPs / 2, as counted
    by ``torch.utils.flop_counter``: convolutions, matmuls, ...; gathers and elementwise ops are free)."""
    was_training = module.training
    module.eval()
    param = next(module.parameters())
    counter = FlopCounterMode(display=False)
    with counter:
        module(torch.zeros(1, 3, image_size, image_size, device=param.device, dtype=param.dtype))
    module.train(was_training)
    return counter.get_total_flops() // 2


def measure(
    model: MultiTaskModel, *, image_size: int, batch_sizes: list[int], repeats: int, device: torch.device,
    warmup: int = 3,
) -> dict[str, dict[str, Any]]:
    """Params, non-zero params, MACs (one image) and latency (per batch size: median of ``repeats``
    timed calls after ``warmup`` untimed ones) of ``model.backbone`` and of the whole ``model``."""
    out = {}
    for part, module in (("backbone", model.backbone), ("model", model)):
        module = module.to(device)
        out[part] = {
            "params": count_params(module),
            "nonzero_params": count_nonzero_params(module),
            "macs": count_macs(module, image_size),
            "latency": [
                measure_latency(module, batch_size=b, image_size=image_size, device=device, warmup=warmup,
                                repeats=repeats)
                for b in batch_sizes
            ],
        }
    return out


def _markdown(figures: dict[str, dict[str, Any]]) -> str:
    rows = ["| part | figure | sparse | compact | ratio |", "|---|---|---:|---:|---:|"]
    for part in ("backbone", "model"):
        before, after = figures["sparse"][part], figures["compact"][part]
        pairs = [("params", before["params"], after["params"]), ("MACs (1 image)", before["macs"], after["macs"])]
        pairs += [
            (f"latency batch {a['batch_size']} (ms, median)", a["median_ms"], b["median_ms"])
            for a, b in zip(before["latency"], after["latency"])
        ]
        for label, x, y in pairs:
            fmt = "{:,.1f}" if isinstance(x, float) else "{:,}"
            rows.append(f"| {part} | {label} | {fmt.format(x)} | {fmt.format(y)} | {y / x:.3f} |")
    return "\n".join(rows) + "\n"


def compact_run(
    run_dir: str | Path, *, image_size: int = 256, batch_sizes: tuple[int, ...] = (1, 16), repeats: int = 5,
    device: str = "cpu",
) -> dict[str, Any]:
    """Compact a run's ``best.pt``; write ``compact.pt``, ``compact_spec.json``, ``compact.json``, ``compact.md``.

    ``compact.json`` holds params, non-zero params, MACs (one image) and latency (median over
    ``repeats`` after warm-up, per batch size, ``image_size`` squared inputs) of the backbone and
    of the whole model, before (``"sparse"``) and after (``"compact"``), and checks that the two
    agree (``max_abs_diff`` over the task outputs on one random batch, eval mode).
    """
    run_dir = Path(run_dir)
    model, build = load_run_model(run_dir)
    compact, spec = compact_model(model)
    save_compact(compact, spec, build, run_dir / "compact.pt")
    with torch.no_grad():
        x = torch.randn(2, 3, image_size, image_size)
        a, b = model(x), compact(x)
        diff = max((a[k] - b[k]).abs().max().item() for k in a)
    dev = torch.device(device)
    figures = {
        "sparse": measure(model, image_size=image_size, batch_sizes=list(batch_sizes), repeats=repeats, device=dev),
        "compact": measure(compact, image_size=image_size, batch_sizes=list(batch_sizes), repeats=repeats, device=dev),
    }
    report = {"run": str(run_dir), "image_size": image_size, "max_abs_diff": diff, **figures}
    atomic_write_text(json.dumps(report, indent=2), run_dir / "compact.json")
    atomic_write_text(_markdown(figures), run_dir / "compact.md")
    return report
