"""Reading group sparsity off a model, and building the papers' param groups."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from .grouping import as_groups, group_dim, is_grouped


@dataclass
class LayerSparsity:
    """Sparsity figures of one grouped tensor."""

    name: str
    shape: tuple[int, ...]
    groups: int
    zero_groups: int
    params: int
    zero_params: int
    nonfinite_groups: int = 0

    @property
    def group_sparsity(self) -> float:
        """Percentage of groups that are exactly zero (a group with a NaN or inf never is)."""
        return 100.0 * self.zero_groups / self.groups if self.groups else 0.0

    @property
    def param_sparsity(self) -> float:
        """Percentage of elements that are exactly zero."""
        return 100.0 * self.zero_params / self.params if self.params else 0.0


@dataclass
class SparsityReport:
    """Per-layer and total group and parameter sparsity (the two figures of the papers' tables)."""

    layers: list[LayerSparsity] = field(default_factory=list)

    @property
    def groups(self) -> int:
        return sum(layer.groups for layer in self.layers)

    @property
    def zero_groups(self) -> int:
        return sum(layer.zero_groups for layer in self.layers)

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def zero_params(self) -> int:
        return sum(layer.zero_params for layer in self.layers)

    @property
    def nonfinite_groups(self) -> int:
        return sum(layer.nonfinite_groups for layer in self.layers)

    @property
    def group_sparsity(self) -> float:
        return 100.0 * self.zero_groups / self.groups if self.groups else 0.0

    @property
    def param_sparsity(self) -> float:
        return 100.0 * self.zero_params / self.params if self.params else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures: totals plus one entry per layer."""
        totals = {
            key: getattr(self, key)
            for key in (
                "groups", "zero_groups", "group_sparsity", "params", "zero_params", "param_sparsity", "nonfinite_groups",
            )
        }
        layers = [
            {**asdict(layer), "group_sparsity": layer.group_sparsity, "param_sparsity": layer.param_sparsity}
            for layer in self.layers
        ]
        return {"total": totals, "layers": layers}


@torch.no_grad()
def group_sparsity(
    model_or_params: nn.Module | Iterable[Tensor] | Iterable[tuple[str, Tensor]],
    grouping: str = "in_channel",
) -> SparsityReport:
    """Count zero groups and zero parameters in every tensor with at least two dimensions.

    Args:
        model_or_params: a module (its named parameters are read), named tensors, or tensors.
        grouping: ``"in_channel"`` or ``"out_channel"``, as in :class:`FusedGroupProxAdam`.

    A group counts as zero when all its elements are exactly zero; groups holding a NaN or an
    inf are counted apart (``nonfinite_groups``), as a sign of a diverged run, never as sparse.
    """
    group_dim(grouping)  # validates
    if isinstance(model_or_params, nn.Module):
        named = list(model_or_params.named_parameters())
    else:
        items = list(model_or_params)
        named = [item if isinstance(item, tuple) else (str(i), item) for i, item in enumerate(items)]
    report = SparsityReport()
    for name, t in named:
        if not is_grouped(t) or t.numel() == 0:
            continue
        groups = as_groups(t.detach(), grouping)
        nonzero = groups != 0
        report.layers.append(
            LayerSparsity(
                name=name,
                shape=tuple(t.shape),
                groups=nonzero.shape[0],
                zero_groups=int((~nonzero.any(dim=1)).sum()),
                params=t.numel(),
                zero_params=t.numel() - int(nonzero.sum()),
                nonfinite_groups=int((~groups.isfinite().all(dim=1)).sum()),
            )
        )
    return report


def prox_param_groups(
    model: nn.Module,
    prefix: str = "backbone",
    *,
    lambda_: float,
    prox: str = "group",
    grouping: str = "in_channel",
) -> list[dict[str, Any]]:
    """The papers' param groups: the prox on the 4-D conv weights under ``prefix``, Adam elsewhere.

    Returns two groups for :class:`FusedGroupProxAdam`: ``{"params": conv weights,
    "lambda_": lambda_, "prox": prox, "grouping": grouping}`` and ``{"params": the rest,
    "lambda_": 0.0}``. ``prefix=""`` selects every conv weight of the model.
    """
    sparse, dense = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        under = not prefix or name == prefix or name.startswith(prefix + ".")
        (sparse if under and p.dim() == 4 else dense).append(p)
    if not sparse:
        raise ValueError(
            f"no 4-D conv weights found under prefix {prefix!r}; module names start with "
            f"{sorted({n.split('.')[0] for n, _ in model.named_parameters()})}"
        )
    groups: list[dict[str, Any]] = [
        {"params": sparse, "lambda_": lambda_, "prox": prox, "grouping": grouping}
    ]
    if dense:
        groups.append({"params": dense, "lambda_": 0.0})
    return groups
