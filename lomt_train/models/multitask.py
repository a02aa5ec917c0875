"""The multi-task network: one shared backbone run once, one head per task.

Each task reads the backbone's features at its own *attachment node* (any module or fx node
name of the backbone, e.g. ``"layer4"``, ``"layer2"``, ``"layer3.3.conv1"``). The default
attaches every task at ``"layer4"`` (Less is More); LOMT attaches task t where it needs.
Features are taken with :func:`torchvision.models.feature_extraction.create_feature_extractor`,
which drops every operation after the deepest requested node, so a model whose tasks all
attach at ``layer2`` has no ``layer3``/``layer4`` parameters and does not compute them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from ..tasks import Task, get_task
from .backbones import build_backbone
from .heads import DEFAULT_ASPP_CHANNELS, AttributeHead, DeepLabV3Head

DEFAULT_ATTACH = "layer4"


def extract_features(backbone: nn.Module, nodes: Sequence[str]) -> nn.Module:
    """``backbone`` as a feature extractor returning ``{node: features}`` for each of ``nodes``.

    Raises ``ValueError`` naming the nodes the backbone does not have.
    """
    try:
        return create_feature_extractor(backbone, return_nodes=list(nodes))
    except ValueError as err:
        available = set(get_graph_node_names(backbone)[1])
        # A module name stands for its last node, as in create_feature_extractor.
        prefixes = available | {".".join(n.split(".")[: i + 1]) for n in available for i in range(n.count("."))}
        unknown = [n for n in nodes if n not in prefixes]
        if not unknown:
            raise
        raise ValueError(
            f"attachment node(s) {unknown} are not in the backbone; use a module name such as "
            f"'layer2' or 'layer3.3.conv1' (torchvision.models.feature_extraction.get_graph_node_names "
            f"lists every node)"
        ) from err


@torch.no_grad()
def feature_channels(extractor: nn.Module, size: int = 64) -> dict[str, int]:
    """Channels of each feature the extractor returns, from one dry run on a ``[1, 3, size, size]`` input.

    Runs in eval mode so BatchNorm statistics are untouched.
    """
    was_training = extractor.training
    extractor.eval()
    param = next(extractor.parameters())
    features = extractor(torch.zeros(1, 3, size, size, device=param.device, dtype=param.dtype))
    extractor.train(was_training)
    return {node: f.shape[1] for node, f in features.items()}


def build_head(
    task: Task, in_channels: int, *, num_classes: int, aspp_channels: int, output_bias: float | None = None,
) -> nn.Module:
    """The head for ``task``'s kind: DeepLab-V3 for dense tasks (its last bias set to
    ``output_bias`` when given), the attribute classifier otherwise."""
    if task.kind == "dense":
        return DeepLabV3Head(in_channels, task.out_channels(num_classes), aspp_channels=aspp_channels,
                             output_bias=output_bias)
    if output_bias is not None:
        raise ValueError(f"task {task.name!r}: output_bias is for dense heads only")
    return AttributeHead(in_channels)


def _per_task(values: Mapping[str, object] | None, names: Sequence[str], what: str) -> dict[str, object]:
    """``values`` keyed by canonical task name; a task not among ``names`` is a ``ValueError``."""
    resolved = {get_task(k).name: v for k, v in (values or {}).items()}
    extra = sorted(set(resolved) - set(names))
    if extra:
        raise ValueError(f"{what} names task(s) {extra} that are not among the model's tasks {list(names)}")
    return resolved


class MultiTaskModel(nn.Module):
    """A shared backbone with one head per task.

    Attributes:
        backbone: the feature extractor (an fx ``GraphModule``); every shared, prunable weight
            lives under the ``backbone.`` prefix.
        heads: ``nn.ModuleDict`` of heads by canonical task name.
        attach: ``{task: node}``, the backbone node each head reads.

    ``forward(x)`` with ``x`` ``[B, 3, H, W]`` runs the backbone once and returns
    ``{task: prediction}``: dense tasks ``[B, C_t, H, W]`` (bilinearly upsampled from the
    feature resolution; seg logits, depth in metres, unnormalised normals, edge logits),
    attribute tasks ``[B]`` logits.
    """

    def __init__(
        self,
        backbone: nn.Module,
        tasks: Sequence[Task],
        *,
        num_classes: int,
        attach: Mapping[str, str] | None = None,
        aspp_channels: int = DEFAULT_ASPP_CHANNELS,
        output_bias: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        names = [t.name for t in tasks]
        if not names:
            raise ValueError("a multi-task model needs at least one task")
        if len(set(names)) != len(names):
            raise ValueError(f"tasks {names} name a task twice")
        requested = _per_task(attach, names, "attach")
        self.attach: dict[str, str] = {name: requested.get(name, DEFAULT_ATTACH) for name in names}
        bias = _per_task(output_bias, names, "output_bias")
        self.backbone = extract_features(backbone, list(dict.fromkeys(self.attach.values())))
        channels = feature_channels(self.backbone)
        self.heads = nn.ModuleDict(
            {
                t.name: build_head(t, channels[self.attach[t.name]], num_classes=num_classes,
                                   aspp_channels=aspp_channels, output_bias=bias.get(t.name))
                for t in tasks
            }
        )
        self.dense_tasks: frozenset[str] = frozenset(t.name for t in tasks if t.kind == "dense")

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = self.backbone(x)
        out = {}
        for name, head in self.heads.items():
            y = head(features[self.attach[name]])
            if name in self.dense_tasks:
                y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
            out[name] = y
        return out


def build_model(
    tasks: Sequence[Task] | Sequence[str],
    *,
    num_classes: int,
    backbone: str = "resnet50",
    weights: str | Path | None = None,
    attach: Mapping[str, str] | None = None,
    aspp_channels: int | None = None,
    output_bias: Mapping[str, float] | None = None,
) -> MultiTaskModel:
    """A :class:`MultiTaskModel` for ``tasks`` (``Task`` entries or registry names/aliases).

    Args:
        num_classes: segmentation classes of the dataset (used by ``seg`` only).
        backbone: a name in :data:`~lomt_train.models.backbones.BACKBONES`.
        weights: a local ``state_dict`` file for the backbone (e.g. torchvision's ImageNet
            ResNet-50 weights); ``None`` starts from random weights.
        attach: ``{task: node}`` attachment nodes; tasks not named attach at ``"layer4"``.
        aspp_channels: the DeepLab heads' ASPP width; ``None`` is DeepLab-V3's 256.
        output_bias: ``{task: value}``, the starting output of a dense task's head (its last
            conv's bias), e.g. ``{"depth": mean depth of the training split}``.
    """
    resolved = [t if isinstance(t, Task) else get_task(t) for t in tasks]
    return MultiTaskModel(
        build_backbone(backbone, weights),
        resolved,
        num_classes=num_classes,
        attach=attach,
        aspp_channels=DEFAULT_ASPP_CHANNELS if aspp_channels is None else aspp_channels,
        output_bias=output_bias,
    )
