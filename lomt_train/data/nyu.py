"""NYU-v2 for multi-task learning, read from either of its two common preprocessed releases.

* ``"nyud_mt"``: the 40-class NYUD_MT release used by ASTMT / MTI-Net and by the papers.
* ``"mtan"``: the 13-class arrays of MTAN / LibMTL (288x384, channel-last ``.npy``).

Both produce the samples described in :mod:`lomt_train.data.transforms`; ``"edge"`` exists in
the NYUD_MT release only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .class_names import NYU13_CLASS_NAMES, NYU40_CLASS_NAMES
from .files import (
    CorruptFileError, DatasetLayoutError, read_image, read_label_png, read_npy, read_split_ids, require_dir, require_size,
)
from .tasks import NYU_TASKS, check_tasks
from .transforms import as_size, prepare_sample

IGNORE_INDEX = 255
SPLITS = ("train", "val", "test")

NYUD_MT_TREE = """NYU-v2 40-class layout (NYUD_MT) expected under the root:
  images/<id>.jpg (or .png)
  segmentation/<id>.png       labels 1..40, 0 = void
  depth/<id>.npy              [H, W] metres, 0 = invalid
  normals/<id>.npy            [H, W, 3] unit vectors
  edge/<id>.npy               [H, W] in {0, 1} (only for the edge task)
  gt_sets/train.txt, val.txt (test.txt optional), one <id> per line"""

MTAN_TREE = """NYU-v2 13-class layout (MTAN / LibMTL) expected under the root:
  train/image/<i>.npy         [288, 384, 3] float in [0, 1]
  train/label/<i>.npy         [288, 384] classes 0..12, -1 = ignore
  train/depth/<i>.npy         [288, 384, 1] metres, 0 = invalid
  train/normal/<i>.npy        [288, 384, 3] unit vectors
  val/...                     the same four folders"""


def _channels_first(array: np.ndarray, channels: int, path: Path) -> np.ndarray:
    """``[H, W]``, ``[H, W, C]`` or ``[C, H, W]`` -> ``[C, H, W]``.

    The MTAN arrays are channel-last, other exports channel-first; when both readings fit
    (a width equal to C) channel-last wins, as in the MTAN release.
    """
    if array.ndim == 2 and channels == 1:
        return array[None]
    if array.ndim == 3 and array.shape[-1] == channels:
        return np.moveaxis(array, -1, 0)
    if array.ndim == 3 and array.shape[0] == channels:
        return array
    raise CorruptFileError(f"{path}: expected an array with {channels} channel(s), got shape {array.shape}")


def _check_labels(seg: Tensor, num_classes: int, path: Path) -> Tensor:
    bad = (seg >= num_classes) & (seg != IGNORE_INDEX)
    if bad.any():
        raise CorruptFileError(
            f"{path}: label {int(seg[bad].max())} outside 0..{num_classes - 1} "
            f"(is this the {num_classes}-class layout?)"
        )
    return seg


def _read_nyu40_labels(path: Path) -> Tensor:
    """Label PNG with 1..40 and 0 = void -> int64 ``[H, W]`` with 0..39 and 255 = ignore."""
    stored = read_label_png(path)
    seg = torch.where(stored == 0, IGNORE_INDEX, stored - 1)
    return _check_labels(seg, 40, path)


def _read_nyu13_labels(path: Path) -> Tensor:
    """MTAN label array with 0..12 and -1 = ignore -> int64 ``[H, W]`` with 255 = ignore."""
    stored = torch.from_numpy(_channels_first(read_npy(path), 1, path)[0].astype(np.float32))
    seg = torch.where(stored < 0, IGNORE_INDEX, stored.round()).to(torch.int64)
    return _check_labels(seg, 13, path)


def _read_array_image(path: Path) -> Tensor:
    """MTAN image array -> float32 ``[3, H, W]`` in [0, 1]."""
    array = _channels_first(read_npy(path), 3, path)
    image = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if array.dtype == np.uint8 or image.max() > 1.5:
        # The release stores [0, 1]; some re-exports keep 0..255. Anything above 1.5 is the latter.
        image = image / 255.0
    return image.clamp_(0.0, 1.0)


def _read_float_map(path: Path, channels: int) -> Tensor:
    array = _channels_first(read_npy(path), channels, path)
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return torch.nan_to_num(tensor, nan=0.0, posinf=0.0, neginf=0.0)  # some exports mark holes NaN


def _read_depth(path: Path) -> Tensor:
    """Depth array -> float32 ``[1, H, W]`` metres; non-finite or negative values become 0 (invalid)."""
    return _read_float_map(path, 1).clamp_(min=0.0)


def _read_normal(path: Path) -> Tensor:
    """Normal array -> float32 ``[3, H, W]``, renormalised to unit length where non-zero so the
    sample contract holds for files stored with rounding; near-zero vectors become exactly 0."""
    normal = _read_float_map(path, 3)
    norm = normal.norm(dim=0, keepdim=True)
    return torch.where(norm > 1e-6, normal / norm.clamp(min=1e-6), 0.0)


def _read_edge(path: Path) -> Tensor:
    """Edge array -> float32 ``[1, H, W]`` in {0, 1}."""
    return (_read_float_map(path, 1) > 0.5).to(torch.float32)


@dataclass(frozen=True)
class _Source:
    """Where one key of a sample is stored in a layout, and how to read it."""

    folder: str
    suffixes: tuple[str, ...]
    read: Callable[[Path], Tensor]


@dataclass(frozen=True)
class _Layout:
    tree: str
    class_names: tuple[str, ...]
    sources: dict[str, _Source]  # "image" plus every task the layout provides

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(t for t in NYU_TASKS if t in self.sources)


LAYOUTS: dict[str, _Layout] = {
    "nyud_mt": _Layout(
        tree=NYUD_MT_TREE,
        class_names=NYU40_CLASS_NAMES,
        sources={
            "image": _Source("images", (".jpg", ".png"), read_image),
            "seg": _Source("segmentation", (".png",), _read_nyu40_labels),
            "depth": _Source("depth", (".npy",), _read_depth),
            "normal": _Source("normals", (".npy",), _read_normal),
            "edge": _Source("edge", (".npy",), _read_edge),
        },
    ),
    "mtan": _Layout(
        tree=MTAN_TREE,
        class_names=NYU13_CLASS_NAMES,
        sources={
            "image": _Source("image", (".npy",), _read_array_image),
            "seg": _Source("label", (".npy",), _read_nyu13_labels),
            "depth": _Source("depth", (".npy",), _read_depth),
            "normal": _Source("normal", (".npy",), _read_normal),
        },
    ),
}


def detect_nyu_layout(root: str | Path) -> str:
    """``"nyud_mt"`` if ``root`` has ``gt_sets/`` or ``images/``, ``"mtan"`` if it has
    ``train/image/`` or ``val/image/``; otherwise :class:`DatasetLayoutError` showing both."""
    root = Path(root)
    if (root / "gt_sets").is_dir() or (root / "images").is_dir():
        return "nyud_mt"
    if (root / "train" / "image").is_dir() or (root / "val" / "image").is_dir():
        return "mtan"
    what = "missing folder" if not root.is_dir() else "unrecognised NYU-v2 layout in"
    raise DatasetLayoutError(f"{what} {root}\n{NYUD_MT_TREE}\nor\n{MTAN_TREE}")


#: The share of the release's training images held out for validation when the release has no
#: test split of its own, and the seed of that draw: fixed for the dataset, never the run's, so
#: that every run and seed selects its model on the same images and none on the test images.
VAL_FRACTION = 0.1
VAL_SEED = 0


def carve_validation(ids: Sequence[str]) -> tuple[list[str], list[str]]:
    """``ids`` split into train and validation ids (both in ``ids``' order): a fixed
    :data:`VAL_FRACTION` of them, at least one, drawn with :data:`VAL_SEED`."""
    if len(ids) < 2:
        raise DatasetLayoutError(f"a validation split needs at least 2 training images, the release has {len(ids)}")
    held = max(1, round(len(ids) * VAL_FRACTION))
    chosen = set(torch.randperm(len(ids), generator=torch.Generator().manual_seed(VAL_SEED))[:held].tolist())
    return [i for k, i in enumerate(ids) if k not in chosen], [i for k, i in enumerate(ids) if k in chosen]


def split_ids(root: Path, layout: str, split: str) -> tuple[Path, list[str]]:
    """Our ``split`` of the release: its folder and ids.

    A release with a test split of its own keeps its train, val and test splits. NYUD_MT and the
    MTAN arrays ship train and val only, and their val is the standard 654-image test set: there
    ``test`` is the release's val, and ``train`` and ``val`` are carved from the release's train
    (:func:`carve_validation`), so that model selection never sees a test image.
    """
    if _has_split(root, layout, "test"):
        return release_split_ids(root, layout, split)
    if split == "test":
        return release_split_ids(root, layout, "val")
    base, ids = release_split_ids(root, layout, "train")
    train, val = carve_validation(ids)
    return base, train if split == "train" else val


def _has_split(root: Path, layout: str, split: str) -> bool:
    if layout == "nyud_mt":
        return (root / "gt_sets" / f"{split}.txt").is_file()
    return (root / split / "image").is_dir()


def release_split_ids(root: Path, layout: str, split: str) -> tuple[Path, list[str]]:
    """The folder the release's own ``split`` is under, and its ids in file order."""
    tree = LAYOUTS[layout].tree
    if layout == "nyud_mt":
        sets = require_dir(root / "gt_sets", tree)
        split_file = sets / f"{split}.txt"
        if not split_file.is_file():
            have = sorted(p.stem for p in sets.glob("*.txt"))
            raise DatasetLayoutError(f"no split {split!r}: missing {split_file}; available splits: {have}\n{tree}")
        ids = read_split_ids(split_file)
        where = split_file
        base = root
    else:
        base = root / split
        if not base.is_dir():
            have = sorted(p.name for p in root.iterdir() if (p / "image").is_dir())
            raise DatasetLayoutError(f"no split {split!r}: missing folder {base}; available splits: {have}\n{tree}")
        image_dir = require_dir(base / "image", tree)
        # Files are 0.npy, 1.npy, ...; sort numerically so the order is the release's.
        ids = sorted((p.stem for p in image_dir.glob("*.npy")), key=lambda s: (len(s), s))
        where = image_dir
    if not ids:
        raise DatasetLayoutError(f"split {split!r} is empty: no ids in {where}\n{tree}")
    return base, ids


class NYUv2Dataset(Dataset):
    """NYU-v2 samples: ``image`` float32 ``[3, H, W]`` (ImageNet-normalised), and per task
    ``seg`` int64 ``[H, W]`` (255 = ignore), ``depth`` float32 ``[1, H, W]`` metres (0 = invalid),
    ``normal`` float32 ``[3, H, W]`` unit vectors (0 = invalid), ``edge`` float32 ``[1, H, W]``
    in {0, 1}; plus ``index``. ``(H, W)`` is ``image_size``.

    ``layout`` is detected from the folders unless given; ``split`` is ``"train"``, ``"val"`` or
    ``"test"`` as :func:`split_ids` maps them onto the release. ``augment`` (random scale-crop and
    flip, see :mod:`~lomt_train.data.transforms`) applies to the ``"train"`` split only, so the
    same flag can be passed for every split.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        tasks: Sequence[str],
        image_size: int | tuple[int, int] = 256,
        augment: bool = False,
        layout: str | None = None,
    ) -> None:
        self.root = Path(root)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if layout is None:
            layout = detect_nyu_layout(self.root)
        elif layout not in LAYOUTS:
            raise ValueError(f"unknown NYU-v2 layout {layout!r}; known layouts are {list(LAYOUTS)}")
        spec = LAYOUTS[layout]
        self.layout = layout
        self.split = split
        self.tasks = check_tasks(tasks, spec.tasks, f"NYU-v2 ({layout} layout)")
        self.image_size = as_size(image_size)
        self.augment = augment and split == "train"
        self.class_names = list(spec.class_names)
        self.num_classes = len(self.class_names)
        self._base, self.ids = split_ids(self.root, layout, split)
        self._sources = {key: spec.sources[key] for key in ("image", *self.tasks)}
        for source in self._sources.values():
            require_dir(self._base / source.folder, spec.tree)

    def __len__(self) -> int:
        return len(self.ids)

    def mean_depth(self) -> float:
        """Mean depth in metres over the valid pixels (``> 0``) of every depth map of the split.

        Read from the files at their own resolution, without resizing or augmentation. It is the
        depth head's starting output (:func:`lomt_train.trainer.output_bias_for`).
        """
        if "depth" not in self._sources:
            raise ValueError(f"mean_depth: this dataset was built without the depth task (tasks {list(self.tasks)})")
        total, count = 0.0, 0
        for item in self.ids:
            depth = self._read("depth", item)[1]
            valid = depth > 0
            total += float(depth[valid].double().sum())
            count += int(valid.sum())
        if count == 0:
            raise ValueError(f"mean_depth: no valid depth pixel (> 0) in split {self.split!r} of {self.root}")
        return total / count

    def _read(self, key: str, item: str) -> tuple[Path, Tensor]:
        source = self._sources[key]
        candidates = [self._base / source.folder / f"{item}{suffix}" for suffix in source.suffixes]
        for path in candidates:
            if path.is_file():
                return path, source.read(path)
        raise FileNotFoundError(f"missing file {' or '.join(map(str, candidates))} for id {item!r}")

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.ids[index]
        image_path, image = self._read("image", item)
        raw = {"image": image}
        for key in self.tasks:
            path, target = self._read(key, item)
            raw[key] = require_size(path, target, image, image_path)
        sample: dict[str, Any] = prepare_sample(raw, self.image_size, self.augment)
        sample["index"] = index
        return sample
