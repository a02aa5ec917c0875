"""Dilated ResNet backbones (output stride 8), built the torchvision way.

Every backbone is a :class:`torchvision.models.ResNet` with the usual module names
(``conv1, bn1, layer1..layer4``), so feature extraction, attachment nodes and the group-sparse
prox see the same structure whichever backbone is chosen:

* ``resnet50`` / ``resnet101``: torchvision's builders with
  ``replace_stride_with_dilation=[False, True, True]`` (DeepLab-V3's output stride 8; the
  papers' backbone is the former).
* ``small``: a ResNet-18-shaped net (two BasicBlocks per stage) at a sixteenth of the width
  (16-32-64-128 channels) for quick CPU runs and tests. torchvision's ``BasicBlock`` refuses
  dilation, so :class:`DilatedBasicBlock` adds it.

ImageNet (or any) weights come from a local ``state_dict`` file only; nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet50, resnet101
from torchvision.models.resnet import BasicBlock, ResNet, conv3x3

OUTPUT_STRIDE_8 = [False, True, True]


class DilatedBasicBlock(BasicBlock):
    """torchvision's ``BasicBlock`` with the dilation it refuses.

    Both 3x3 convolutions get ``dilation`` (and padding = dilation, so the spatial size is kept),
    as in the dilated residual networks of DeepLab. Parameter names are those of ``BasicBlock``.
    """

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Callable[..., nn.Module] | None = None,
    ) -> None:
        super().__init__(inplanes, planes, stride, downsample, groups, base_width, 1, norm_layer)
        if dilation > 1:
            self.conv1 = conv3x3(inplanes, planes, stride, dilation=dilation)
            self.conv2 = conv3x3(planes, planes, dilation=dilation)


class SmallResNet(ResNet):
    """A narrow ResNet: torchvision's ``ResNet`` with stage widths as a parameter.

    ``ResNet.__init__`` fixes the widths at 64-128-256-512, so this constructor lays out the
    same modules itself and reuses ``ResNet._make_layer`` (strides, dilation, downsampling)
    and ``ResNet.forward`` unchanged.
    """

    def __init__(
        self,
        widths: Sequence[int] = (16, 32, 64, 128),
        layers: Sequence[int] = (2, 2, 2, 2),
        replace_stride_with_dilation: Sequence[bool] = OUTPUT_STRIDE_8,
        num_classes: int = 1000,
    ) -> None:
        if len(widths) != 4 or len(layers) != 4 or len(replace_stride_with_dilation) != 3:
            raise ValueError(
                f"widths {tuple(widths)} and layers {tuple(layers)} need 4 entries and "
                f"replace_stride_with_dilation {tuple(replace_stride_with_dilation)} needs 3"
            )
        nn.Module.__init__(self)
        # The attributes ResNet._make_layer reads.
        self._norm_layer = nn.BatchNorm2d
        self.inplanes = widths[0]
        self.dilation = 1
        self.groups = 1
        self.base_width = 64
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(DilatedBasicBlock, widths[0], layers[0])
        self.layer2 = self._make_layer(
            DilatedBasicBlock, widths[1], layers[1], stride=2, dilate=replace_stride_with_dilation[0]
        )
        self.layer3 = self._make_layer(
            DilatedBasicBlock, widths[2], layers[2], stride=2, dilate=replace_stride_with_dilation[1]
        )
        self.layer4 = self._make_layer(
            DilatedBasicBlock, widths[3], layers[3], stride=2, dilate=replace_stride_with_dilation[2]
        )
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3], num_classes)
        # torchvision's ResNet initialisation, so both families start alike.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def _dilated(builder: Callable[..., ResNet]) -> Callable[[], ResNet]:
    def build() -> ResNet:
        return builder(weights=None, replace_stride_with_dilation=OUTPUT_STRIDE_8)

    build.__doc__ = f"torchvision's ``{builder.__name__}`` at output stride 8, randomly initialised."
    return build


# Adding a backbone is one entry: a function returning a torchvision ResNet.
BACKBONES: dict[str, Callable[[], ResNet]] = {
    "resnet50": _dilated(resnet50),
    "resnet101": _dilated(resnet101),
    "small": SmallResNet,
}


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local ``state_dict`` file (``.pth``) into ``model``, strictly.

    Raises ``FileNotFoundError`` when the file is missing and ``ValueError`` when its keys or
    shapes do not match the model (for example ResNet-101 weights given to ResNet-50).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights {path}: no such file (weights are never downloaded)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"backbone weights {path}: expected a state_dict, got {type(state).__name__}")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"backbone weights {path} do not match the {type(model).__name__}: {err}") from err


def build_backbone(name: str, weights: str | Path | None = None) -> ResNet:
    """The whole backbone classifier ``name`` (see :data:`BACKBONES`), with optional local weights.

    Feature extraction (and with it the removal of ``avgpool``/``fc``) happens in
    :class:`~lomt_train.models.MultiTaskModel`, so a torchvision ImageNet ``state_dict``,
    which includes ``fc``, loads as it is.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid backbones are {sorted(BACKBONES)}")
    model = BACKBONES[name]()
    if weights is not None:
        load_weights(model, weights)
    return model
