"""Datasets of the multi-task experiments, read from their real on-disk layouts, and synthetic
stand-ins written in those same layouts.

A sample is a dict: ``"image"`` float32 ``[3, H, W]`` (ImageNet-normalised), one entry per
task (``"seg"`` int64 ``[H, W]``, 255 = ignore; ``"depth"`` float32 ``[1, H, W]`` metres,
0 = invalid; ``"normal"`` float32 ``[3, H, W]`` unit vectors, 0 = invalid; ``"edge"`` float32
``[1, H, W]`` in {0, 1}; attributes float32 scalars 0./1.) and ``"index"``.
"""

from .build import DATASET_NAMES, build_dataset
from .cache import cache_home, generate_cached, synthetic_root
from .celeba import PART_TO_CLASS3, CelebAMaskHQDataset, compose_mask3
from .class_names import (
    CELEBA_ATTRIBUTES,
    CELEBA_SEG_CLASS_NAMES,
    CELEBAMASK_CLASS_NAMES,
    CELEBAMASK_PARTS,
    NYU13_CLASS_NAMES,
    NYU40_CLASS_NAMES,
)
from .files import CorruptFileError, DatasetLayoutError
from .nyu import IGNORE_INDEX, NYUv2Dataset, detect_nyu_layout
from .sources import DATA_ENV, default_data_root
from .synthetic_celeba import make_synthetic_celeba
from .synthetic_nyu import make_synthetic_nyu
from .tasks import CELEBA_ATTRIBUTE_TASKS, CELEBA_TASKS, NYU_TASKS
from .transforms import IMAGENET_MEAN, IMAGENET_STD, SCALES

__all__ = [
    "CELEBAMASK_CLASS_NAMES",
    "CELEBAMASK_PARTS",
    "CELEBA_ATTRIBUTES",
    "CELEBA_ATTRIBUTE_TASKS",
    "CELEBA_SEG_CLASS_NAMES",
    "CELEBA_TASKS",
    "DATA_ENV",
    "DATASET_NAMES",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NYU13_CLASS_NAMES",
    "NYU40_CLASS_NAMES",
    "NYU_TASKS",
    "PART_TO_CLASS3",
    "SCALES",
    "CelebAMaskHQDataset",
    "CorruptFileError",
    "DatasetLayoutError",
    "NYUv2Dataset",
    "build_dataset",
    "cache_home",
    "compose_mask3",
    "default_data_root",
    "detect_nyu_layout",
    "generate_cached",
    "make_synthetic_celeba",
    "make_synthetic_nyu",
    "synthetic_root",
]
