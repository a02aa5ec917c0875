"""CelebAMask-HQ as the papers use it: 3-class face segmentation plus binary attributes.

The release annotates 18 parts, one PNG per part present. The papers' segmentation has three
classes, composed here by painting the parts in the release's own order (later parts over
earlier ones, as its ``g_mask.py`` does), each with its class in :data:`PART_TO_CLASS3`:

* 1 hair: ``hair``;
* 2 skin: the face and everything on it: ``skin, nose, eye_g, l_eye, r_eye, l_brow, r_brow,
  l_ear, r_ear, mouth, u_lip, l_lip``;
* 0 background: everything else, including ``hat, ear_r`` (earrings), ``neck_l`` (necklace),
  ``neck`` and ``cloth`` (painting them as 0 means a hat hides the hair under it).

A horizontal flip needs no label swap: none of the three classes has a left and a right
variant (the release's ``l_eye`` / ``r_eye`` would).

Composing reads up to 18 files, so the result is cached as ``lomt_masks3/<n>.png`` under the
root (or under the cache folder if the root is read-only) and read from there afterwards.

The release has no official split; a seeded 60/20/20 train/val/test split is drawn once and
written as JSON (``lomt_split_seed<seed>.json`` beside the masks unless ``split_path`` names
a file), and read from that file afterwards. Training takes seed 0 whatever the run's seed, so
that every run of the dataset has the same split.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .cache import writable_home
from .class_names import CELEBA_SEG_CLASS_NAMES, CELEBAMASK_PARTS
from ..atomic import atomic_write_bytes
from .files import (
    CorruptFileError,
    encode_image,
    read_image,
    read_label_png,
    read_mask_png,
    require_dir,
    require_file,
    require_size,
)
from .tasks import check_tasks
from .transforms import as_size, prepare_sample

IMAGE_DIR = "CelebA-HQ-img"
MASK_DIR = "CelebAMask-HQ-mask-anno"
ATTRIBUTE_FILE = "CelebAMask-HQ-attribute-anno.txt"
MASKS_PER_FOLDER = 2000
MASK3_DIR = "lomt_masks3"
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)
SPLITS = ("train", "val", "test")

CELEBA_TREE = f"""CelebAMask-HQ layout expected under the root:
  {IMAGE_DIR}/<n>.jpg                                   (1024x1024)
  {MASK_DIR}/<n // {MASKS_PER_FOLDER}>/<n:05d>_<part>.png    (512x512, one per part present)
  {ATTRIBUTE_FILE}                     count, the 40 names, then '<n>.jpg a1 ... a40' (1 / -1)
  parts: {", ".join(CELEBAMASK_PARTS)}"""

BACKGROUND, HAIR, SKIN = 0, 1, 2
PART_TO_CLASS3: dict[str, int] = {
    **dict.fromkeys(CELEBAMASK_PARTS, BACKGROUND),
    **dict.fromkeys(
        ("skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear", "mouth", "u_lip", "l_lip"),
        SKIN,
    ),
    "hair": HAIR,
}


def part_mask_path(root: str | Path, n: int, part: str) -> Path:
    """Where the release keeps image ``n``'s mask of ``part``."""
    return Path(root) / MASK_DIR / str(n // MASKS_PER_FOLDER) / f"{n:05d}_{part}.png"


def compose_mask3(part_masks: Mapping[str, Tensor]) -> Tensor:
    """Bool ``[H, W]`` masks of the parts present -> the 3-class uint8 ``[H, W]`` mask.

    Parts are painted in :data:`CELEBAMASK_PARTS` order, later over earlier, each with its
    :data:`PART_TO_CLASS3` class; unpainted pixels are background.
    """
    unknown = set(part_masks) - set(CELEBAMASK_PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; parts are {list(CELEBAMASK_PARTS)}")
    if not part_masks:
        raise ValueError("no part masks to compose")
    shape = next(iter(part_masks.values())).shape
    mask3 = torch.full(shape, BACKGROUND, dtype=torch.uint8)
    for part in CELEBAMASK_PARTS:
        if part in part_masks:
            mask3[part_masks[part]] = PART_TO_CLASS3[part]
    return mask3


def read_part_masks(root: str | Path, n: int) -> dict[str, Tensor]:
    """The part masks the release has for image ``n``, as bool ``[H, W]`` tensors."""
    masks = {}
    for part in CELEBAMASK_PARTS:
        path = part_mask_path(root, n, part)
        if path.is_file():
            masks[part] = read_mask_png(path)
    if not masks:
        raise FileNotFoundError(f"no part masks for image {n}: expected files like {part_mask_path(root, n, 'skin')}")
    shapes = {tuple(m.shape) for m in masks.values()}
    if len(shapes) > 1:
        raise CorruptFileError(
            f"part masks of image {n} under {part_mask_path(root, n, 'skin').parent} differ in size: {shapes}"
        )
    return masks


def read_attributes(path: Path) -> tuple[list[str], dict[int, np.ndarray]]:
    """Parse the attribute file: the attribute names, and for each image ``n`` its row of 1/-1."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if len(lines) < 2 or not lines[0].strip().isdigit():
        raise CorruptFileError(f"{path}: expected the image count on line 1 and the attribute names on line 2")
    names = lines[1].split()
    rows: dict[int, np.ndarray] = {}
    for number, line in enumerate(lines[2:], start=3):
        fields = line.split()
        try:
            if len(fields) != len(names) + 1:
                raise ValueError(f"{len(fields) - 1} values for {len(names)} attributes")
            values = np.array([int(v) for v in fields[1:]], dtype=np.int8)
            if not np.isin(values, (1, -1)).all():
                raise ValueError("values must be 1 or -1")
            rows[int(Path(fields[0]).stem)] = values
        except ValueError as err:
            raise CorruptFileError(f"{path}, line {number}: {err}") from err
    if len(rows) != int(lines[0]):
        raise CorruptFileError(f"{path}: line 1 says {int(lines[0])} images but {len(rows)} rows follow")
    return names, rows


def make_split(ids: Sequence[int], seed: int) -> dict[str, list[int]]:
    """A seeded 60/20/20 split of ``ids`` into disjoint, sorted train/val/test lists."""
    order = np.random.default_rng(seed).permutation(sorted(ids)).tolist()
    n_train = round(SPLIT_FRACTIONS[0] * len(order))
    n_val = round(SPLIT_FRACTIONS[1] * len(order))
    parts = (order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :])
    return {name: sorted(part) for name, part in zip(SPLITS, parts, strict=True)}


def load_or_make_split(path: Path, ids: Sequence[int], seed: int) -> dict[str, list[int]]:
    """Read the split JSON at ``path``, or draw it with :func:`make_split` and write it there."""
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
            split = {name: [int(n) for n in stored[name]] for name in SPLITS}
        except (ValueError, KeyError, TypeError) as err:
            raise CorruptFileError(f"{path}: not a train/val/test split file ({err})") from err
        strays = set().union(*split.values()) - set(ids)
        if strays:
            raise CorruptFileError(f"{path}: {len(strays)} ids not in the attribute file, e.g. {min(strays)}")
        return split
    split = make_split(ids, seed)
    record = {"seed": seed, "fractions": list(SPLIT_FRACTIONS), **split}
    atomic_write_bytes(json.dumps(record).encode(), path)
    return split


class CelebAMaskHQDataset(Dataset):
    """CelebAMask-HQ samples: ``image`` float32 ``[3, H, W]`` (ImageNet-normalised); ``seg``
    int64 ``[H, W]`` with 0 background, 1 hair, 2 skin; each attribute task (the lowercased
    attribute name, e.g. ``"male"``, ``"smiling"``) a float32 scalar 0./1.; plus ``index``.
    ``(H, W)`` is ``image_size``.

    ``seed`` picks the split (see the module docstring). ``augment`` applies to ``"train"`` only.
    """

    layout = "celebamask_hq"

    def __init__(
        self,
        root: str | Path,
        split: str,
        tasks: Sequence[str],
        image_size: int | tuple[int, int] = 256,
        augment: bool = False,
        seed: int = 0,
        split_path: str | Path | None = None,
    ) -> None:
        self.root = Path(root)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        require_dir(self.root, CELEBA_TREE)
        names, self._attributes = read_attributes(require_file(self.root / ATTRIBUTE_FILE, CELEBA_TREE))
        self._columns = {name.lower(): column for column, name in enumerate(names)}
        self.tasks = check_tasks(tasks, ("seg", *self._columns), "CelebAMask-HQ")
        self.split = split
        self.image_size = as_size(image_size)
        self.augment = augment and split == "train"
        self.class_names = list(CELEBA_SEG_CLASS_NAMES)
        self.num_classes = len(self.class_names)
        require_dir(self.root / IMAGE_DIR, CELEBA_TREE)
        if "seg" in self.tasks:
            require_dir(self.root / MASK_DIR, CELEBA_TREE)
        home = writable_home(self.root, "celeba")
        self._mask3_dir = home / MASK3_DIR
        split_file = Path(split_path) if split_path is not None else home / f"lomt_split_seed{seed}.json"
        self.ids: list[int] = load_or_make_split(split_file, list(self._attributes), seed)[split]

    def __len__(self) -> int:
        return len(self.ids)

    def mask3(self, n: int) -> Tensor:
        """Image ``n``'s 3-class mask as int64 ``[h, w]`` at the release's mask resolution,
        composed once and then read from the cache."""
        cached = self._mask3_dir / f"{n}.png"
        if cached.is_file():
            mask = read_label_png(cached)
            if mask.max() > SKIN:
                raise CorruptFileError(f"{cached}: values above {SKIN}; delete it to recompose")
            return mask
        mask = compose_mask3(read_part_masks(self.root, n))
        atomic_write_bytes(encode_image(mask.numpy(), "PNG"), cached)
        return mask.to(torch.int64)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = self.ids[index]
        image_path = self.root / IMAGE_DIR / f"{n}.jpg"
        raw = {"image": read_image(image_path)}
        if "seg" in self.tasks:
            # The release's masks are half its images' size; the synthetic set's are the same size.
            masks = part_mask_path(self.root, n, "*")
            raw["seg"] = require_size(masks, self.mask3(n), raw["image"], image_path, factors=(1, 2))
        sample: dict[str, Any] = prepare_sample(raw, self.image_size, self.augment)
        row = self._attributes[n]
        for task in self.tasks:
            if task != "seg":
                sample[task] = torch.tensor(float(row[self._columns[task]] > 0))
        sample["index"] = index
        return sample
