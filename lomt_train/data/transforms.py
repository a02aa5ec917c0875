"""Resizing, augmentation and normalisation shared by every dataset.

A loader reads the image and its dense targets, each at its file's own resolution (CelebAMask-HQ
images are 1024x1024 while its masks are 512x512), and hands them to :func:`prepare_sample`:

* ``"image"``: uint8 or float in [0, 1], ``[3, h, w]``
* ``"seg"``: int64 ``[h, w]`` (255 = ignore)
* ``"depth"``: float ``[1, h, w]`` metres (0 = invalid)
* ``"normal"``: float ``[3, h, w]`` unit vectors (all-zero = invalid), x pointing right
* ``"edge"``: float ``[1, h, w]`` in {0, 1}

Every tensor is cropped to the same *fractional* box (so tensors of different resolutions stay
aligned) and resized to the output size in one step: bilinear with antialiasing for the image,
nearest for everything else. Nearest keeps labels exact and never blends a valid depth or normal
with an invalid (zero) neighbour, which would invent values at the edges of holes.

Augmentation is the MTAN recipe: a random crop of 1/s of each side with s drawn from
:data:`SCALES`, resized back (so the scene looks s times closer: depth is divided by s), and a
horizontal flip with probability 1/2 (mirroring negates the normals' x component).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
SCALES: tuple[float, ...] = (1.0, 1.2, 1.5)


@dataclass(frozen=True)
class View:
    """Which part of a sample to show: a box in fractions of the image, and whether to mirror it.

    ``scale`` is how much the box magnifies the scene (1 / its side as a fraction), by which
    depth is divided.
    """

    top: float = 0.0
    left: float = 0.0
    height: float = 1.0
    width: float = 1.0
    flip: bool = False

    @property
    def scale(self) -> float:
        return 1.0 / self.height


FULL_VIEW = View()


def as_size(image_size: int | tuple[int, int]) -> tuple[int, int]:
    """``256`` -> ``(256, 256)``; ``(H, W)`` is checked and returned."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f"image_size must be a positive int or (height, width), got {image_size!r}")
    return size  # type: ignore[return-value]


def random_view(generator: torch.Generator | None = None) -> View:
    """A random scale-crop and flip. ``generator=None`` draws from torch's global RNG, which the
    DataLoader seeds per worker from the main process, so ``torch.manual_seed`` fixes it."""
    scale = SCALES[int(torch.randint(len(SCALES), (), generator=generator))]
    top, left, flip = torch.rand(3, generator=generator).tolist()
    side = 1.0 / scale
    return View(top=top * (1 - side), left=left * (1 - side), height=side, width=side, flip=flip < 0.5)


def _resized_crop(tensor: Tensor, view: View, size: tuple[int, int], smooth: bool) -> Tensor:
    """Crop ``tensor [C, h, w]`` to ``view``'s box in its own pixel grid and resize to ``size``."""
    h, w = tensor.shape[-2:]
    crop_h = max(1, round(view.height * h))
    crop_w = max(1, round(view.width * w))
    top = min(round(view.top * h), h - crop_h)
    left = min(round(view.left * w), w - crop_w)
    mode = InterpolationMode.BILINEAR if smooth else InterpolationMode.NEAREST
    return TF.resized_crop(tensor, top, left, crop_h, crop_w, list(size), interpolation=mode, antialias=smooth)


def apply_view(raw: Mapping[str, Tensor], view: View, size: tuple[int, int]) -> dict[str, Tensor]:
    """Crop, resize and flip every dense tensor of ``raw`` (shapes in the module docstring).

    Returns the same keys at ``size``; the image comes back as float in [0, 1], not yet normalised.
    """
    out: dict[str, Tensor] = {}
    for key, value in raw.items():
        if key == "image":
            value = TF.to_dtype(value, torch.float32, scale=True)
        elif key == "seg":
            value = value.unsqueeze(0)  # torchvision resizes [C, H, W]
        value = _resized_crop(value, view, size, smooth=key == "image")
        if view.flip:
            value = TF.horizontal_flip(value)
        out[key] = value
    if "seg" in out:
        out["seg"] = out["seg"].squeeze(0)
    if "depth" in out and view.scale != 1.0:
        out["depth"] = out["depth"] / view.scale
    if "normal" in out and view.flip:
        out["normal"] = out["normal"] * torch.tensor([-1.0, 1.0, 1.0]).view(3, 1, 1)
    return out


def prepare_sample(
    raw: Mapping[str, Tensor],
    size: tuple[int, int],
    augment: bool = False,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Turn a loader's raw tensors into a model-ready sample at ``size``.

    With ``augment`` a :func:`random_view` is applied, else the whole image. The image is
    ImageNet-normalised float32 ``[3, H, W]``; targets keep their dtypes (loaders pass int64
    seg and float32 depth, normal and edge).
    """
    view = random_view(generator) if augment else FULL_VIEW
    out = apply_view(raw, view, size)
    if "image" in out:
        out["image"] = TF.normalize(out["image"], list(IMAGENET_MEAN), list(IMAGENET_STD))
    return out
