"""Reading and writing dataset files, with errors that name the file or show the expected layout.

Images, label PNGs and masks are decoded with Pillow (torchvision.io's image codecs are
deprecated since torchvision 0.29, and Pillow reads 16-bit and palette label PNGs as stored),
arrays with ``numpy.load``. Whatever those raise on a damaged file becomes a
:class:`CorruptFileError` whose message starts with the path, so a bad file among thousands
can be found and replaced.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor


class DatasetLayoutError(FileNotFoundError):
    """A folder or file the dataset layout requires is missing; the message shows the layout."""


class CorruptFileError(ValueError):
    """A dataset file exists but cannot be decoded, or holds values the layout does not allow."""


def require_dir(path: Path, layout: str) -> Path:
    """Return ``path`` if it is a folder, else raise :class:`DatasetLayoutError` showing ``layout``."""
    if not path.is_dir():
        raise DatasetLayoutError(f"missing folder {path}\n{layout}")
    return path


def require_file(path: Path, layout: str) -> Path:
    """Return ``path`` if it is a file, else raise :class:`DatasetLayoutError` showing ``layout``."""
    if not path.is_file():
        raise DatasetLayoutError(f"missing file {path}\n{layout}")
    return path


def _decode(path: Path, mode: str | None) -> np.ndarray:
    """The pixels of an image file as ``[H, W]`` or ``[H, W, C]``, converted to PIL ``mode``
    unless ``mode`` is None (then as stored)."""
    if not path.is_file():
        raise FileNotFoundError(f"missing file {path}")
    try:
        with Image.open(path) as image:
            return np.array(image if mode is None else image.convert(mode))  # a writable copy
    except (OSError, ValueError, SyntaxError) as err:  # PIL's errors for unknown or truncated data
        raise CorruptFileError(f"{path}: cannot decode image ({err})") from err


def read_image(path: Path) -> Tensor:
    """An RGB image file (JPEG/PNG) as uint8 ``[3, H, W]``; grey images are expanded."""
    return torch.from_numpy(_decode(path, "RGB")).permute(2, 0, 1).contiguous()


def read_label_png(path: Path) -> Tensor:
    """A single-channel label PNG (8- or 16-bit grey, or palette indices) as int64 ``[H, W]``
    holding the stored values."""
    labels = _decode(path, None)
    if labels.ndim != 2:
        raise CorruptFileError(f"{path}: expected a single-channel label PNG, got {labels.shape[-1]} channels")
    return torch.from_numpy(labels.astype(np.int64))


def read_mask_png(path: Path) -> Tensor:
    """A binary mask PNG (0 = off, 255 = on; grey or RGB) as bool ``[H, W]``."""
    # Threshold at half range rather than ``> 0`` so that a re-encoded (lossy) mask still reads right.
    return torch.from_numpy(_decode(path, "L") > 127)


def encode_image(array: np.ndarray, format: str) -> bytes:
    """A uint8 ``[H, W]`` or ``[H, W, 3]`` array as ``"PNG"`` or ``"JPEG"`` (quality 92) bytes."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=format, **({"quality": 92} if format == "JPEG" else {}))
    return buffer.getvalue()


def require_size(
    path: Path, target: Tensor, image: Tensor, image_path: Path, factors: tuple[int, ...] = (1,)
) -> Tensor:
    """Return ``target`` (``[..., h, w]``) if ``(h, w)`` is ``image``'s ``[..., H, W]`` divided
    by one of ``factors``, else :class:`CorruptFileError` naming ``path``: a map of another size
    would be resized onto the image and trained on, misaligned."""
    (h, w), (H, W) = target.shape[-2:], image.shape[-2:]
    if not any(h * f == H and w * f == W for f in factors):
        allowed = " or ".join(f"{H // f}x{W // f}" for f in factors)
        raise CorruptFileError(f"{path}: its size {h}x{w} does not match its image {image_path} ({allowed} expected)")
    return target


def read_split_ids(path: Path) -> list[str]:
    """The ids of a split file, one per line (blank lines skipped). An id is a plain file name:
    one holding a path separator or ``..`` is a :class:`CorruptFileError` naming the line, since
    it would read files outside the dataset folder."""
    ids = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        item = line.strip()
        if not item:
            continue
        if "/" in item or "\\" in item or ".." in item:
            raise CorruptFileError(f"{path}, line {number}: id {item!r} is not a plain name (no '/', '\\' or '..')")
        ids.append(item)
    return ids


def read_npy(path: Path) -> np.ndarray:
    """A ``.npy`` array, or :class:`CorruptFileError` naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"missing file {path}")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise CorruptFileError(f"{path}: cannot load array ({err})") from err


