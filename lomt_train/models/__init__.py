"""Multi-task models: dilated ResNet backbones, DeepLab-V3 and attribute heads, per-task attachment."""

from .backbones import BACKBONES, DilatedBasicBlock, SmallResNet, build_backbone, load_weights
from .heads import AttributeHead, DeepLabV3Head
from .multitask import DEFAULT_ATTACH, MultiTaskModel, build_head, build_model, extract_features, feature_channels

__all__ = [
    "BACKBONES",
    "DEFAULT_ATTACH",
    "AttributeHead",
    "DeepLabV3Head",
    "DilatedBasicBlock",
    "MultiTaskModel",
    "SmallResNet",
    "build_backbone",
    "build_head",
    "build_model",
    "extract_features",
    "feature_channels",
    "load_weights",
]
