"""Task heads: DeepLab-V3 for dense tasks, the papers' small classifier for attributes."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torchvision.models.segmentation.deeplabv3 import ASPP

DEFAULT_ASPP_CHANNELS = 256


class DeepLabV3Head(nn.Sequential):
    """torchvision's ``DeepLabHead`` with the ASPP width as a parameter.

    ``ASPP(in_channels, atrous_rates, aspp_channels)`` -> 3x3 conv -> BN -> ReLU -> 1x1 conv to
    ``out_channels``. With ``aspp_channels=256`` this is ``DeepLabHead`` layer for layer (the
    state_dicts are interchangeable); ``DeepLabHead`` hard-codes 256, which is heavy for the
    small CPU backbone. Input ``[B, in_channels, h, w]``, output ``[B, out_channels, h, w]`` at
    the feature resolution; the model upsamples it.

    The ASPP's image-pooling branch has a BatchNorm over a 1x1 map, so training needs a batch
    of at least 2 (as in torchvision).

    ``output_bias`` initialises the last conv's bias, so the head starts predicting that value
    everywhere (a regression head whose targets are far from 0, such as depth in metres, then
    does not spend its first steps, at Adam's about ``lr`` per weight per step, reaching them).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        aspp_channels: int = DEFAULT_ASPP_CHANNELS,
        atrous_rates: Sequence[int] = (12, 24, 36),
        output_bias: float | None = None,
    ) -> None:
        super().__init__(
            ASPP(in_channels, atrous_rates, aspp_channels),
            nn.Conv2d(aspp_channels, aspp_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(aspp_channels),
            nn.ReLU(),
            nn.Conv2d(aspp_channels, out_channels, 1),
        )
        if output_bias is not None:
            nn.init.constant_(self[-1].bias, output_bias)


class AttributeHead(nn.Sequential):
    """The papers' classification head: a conv, then two fully connected layers; one logit.

    Layout of the published Less-is-More code: 3x3 conv to 64 channels -> ReLU -> 2x2 max-pool
    -> global average pool -> dropout 0.6 -> FC 64->32 -> ReLU -> dropout 0.4 -> FC 32->1.
    Input ``[B, in_channels, h, w]`` with h, w >= 2; output ``[B]`` logits. There is no sigmoid
    here: the loss is BCE-with-logits (the published code applied a sigmoid twice).
    """

    def __init__(self, in_channels: int, *, channels: int = 64, hidden: int = 32) -> None:
        super().__init__(
            nn.Conv2d(in_channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(0.6),
            nn.Linear(channels, hidden),
            nn.ReLU(),
            nn.Dropout(0.4),
            nn.Linear(hidden, 1),
            nn.Flatten(0),  # [B, 1] -> [B], the layout of the attribute targets
        )
