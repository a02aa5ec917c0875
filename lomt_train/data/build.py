"""``build_dataset``: one entry point for every dataset, by name."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch.utils.data import Dataset

from .celeba import CelebAMaskHQDataset
from .nyu import NYUv2Dataset

DATASET_NAMES = ("nyu", "celeba")


def build_dataset(
    name: str,
    root: str | Path,
    split: str,
    tasks: Sequence[str],
    image_size: int | tuple[int, int] = 256,
    augment: bool = False,
    layout: str | None = None,
    seed: int = 0,
) -> Dataset:
    """The ``split`` of dataset ``name`` under ``root``, giving the samples of ``tasks``.

    * ``"nyu"``: :class:`~lomt_train.data.nyu.NYUv2Dataset`; ``layout`` is ``"nyud_mt"``
      (40 classes) or ``"mtan"`` (13 classes), detected from the folders when ``None``.
      ``seed`` is unused: the release fixes the splits (see :func:`~lomt_train.data.nyu.split_ids`).
    * ``"celeba"``: :class:`~lomt_train.data.celeba.CelebAMaskHQDataset`; ``layout`` must be
      ``None`` or ``"celebamask_hq"``; ``seed`` picks the 60/20/20 split (training uses the
      default, so that every run of a dataset has the same split).

    The dataset has ``num_classes``, ``class_names``, ``tasks`` and ``layout``. ``augment``
    applies to the train split only.
    """
    if name == "nyu":
        return NYUv2Dataset(root, split, tasks, image_size=image_size, augment=augment, layout=layout)
    if name == "celeba":
        if layout not in (None, CelebAMaskHQDataset.layout):
            raise ValueError(f"CelebAMask-HQ has one layout, {CelebAMaskHQDataset.layout!r}; got {layout!r}")
        return CelebAMaskHQDataset(root, split, tasks, image_size=image_size, augment=augment, seed=seed)
    raise ValueError(f"unknown dataset {name!r}; known datasets are {list(DATASET_NAMES)}")
