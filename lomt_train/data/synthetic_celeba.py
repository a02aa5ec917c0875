"""Synthetic CelebAMask-HQ: drawn faces written in the real release layout.

A face is a skin ellipse with ears, nose, eyes, brows and a mouth, framed by hair, on a neck
and clothes, over a gradient background; it is shifted, scaled and turned at random. The
attributes the papers predict are drawn independently and are visible in the image:

* ``Male``: short hair only on top of the head, thicker brows and often a beard; otherwise long
  hair falling behind the face to the shoulders.
* ``Smiling``: an open mouth curving up, showing teeth; otherwise closed, flat lips.

Eyeglasses, a hat, hair colour, bangs and lipstick vary too and set their attributes; the other
attributes are random. The drawing is a map of CelebAMask-HQ parts, so each part's mask file is
exactly what is visible of it, as in the release.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .cache import clear_generated, is_current, mark_generated
from .celeba import ATTRIBUTE_FILE, IMAGE_DIR, MASK3_DIR, MASK_DIR, part_mask_path
from .class_names import CELEBA_ATTRIBUTES, CELEBAMASK_PARTS
from ..atomic import atomic_write_bytes
from .files import encode_image
from .transforms import as_size

GENERATOR_VERSION = 1
GENERATED = (IMAGE_DIR, MASK_DIR, ATTRIBUTE_FILE, MASK3_DIR, "lomt_split_seed*.json")

HAIR_COLOURS = {
    "Black_Hair": (0.08, 0.07, 0.06), "Brown_Hair": (0.35, 0.22, 0.12),
    "Blond_Hair": (0.85, 0.72, 0.42), "Gray_Hair": (0.62, 0.62, 0.62),
}  # fmt: skip
SKIN_TONES = ((0.96, 0.80, 0.69), (0.87, 0.67, 0.53), (0.70, 0.50, 0.36), (0.45, 0.31, 0.22))


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0


def draw_face(rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, dict[str, bool]]:
    """Draw a random face at ``size = (H, W)``.

    Returns the uint8 image ``[H, W, 3]``, the part map int ``[H, W]`` (0 background, ``i + 1``
    for ``CELEBAMASK_PARTS[i]``) and the attributes that the drawing decides.
    """
    h, w = size
    male, smiling = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
    beard = male and bool(rng.random() < 0.6)
    glasses, hat = bool(rng.random() < 0.15), bool(rng.random() < 0.12)
    bangs = not male and bool(rng.random() < 0.4)
    lipstick = not male and bool(rng.random() < 0.5)
    hair_name = list(HAIR_COLOURS)[rng.integers(len(HAIR_COLOURS))]

    # Face-local coordinates: the image spans [-1, 1], moved, scaled and turned by the pose.
    gy, gx = (np.mgrid[0:h, 0:w] + 0.5) / np.array([h, w])[:, None, None] * 2 - 1
    angle, scale = rng.uniform(-0.25, 0.25), rng.uniform(0.85, 1.1)
    dx, dy = gx - rng.normal(0, 0.05), gy - rng.normal(0.05, 0.04)
    x = (np.cos(angle) * dx + np.sin(angle) * dy) / scale
    y = (-np.sin(angle) * dx + np.cos(angle) * dy) / scale

    skin = np.array(SKIN_TONES[rng.integers(len(SKIN_TONES))]) * rng.uniform(0.93, 1.07, 3)
    hair = np.array(HAIR_COLOURS[hair_name]) * rng.uniform(0.85, 1.15, 3)
    c0, c1 = rng.uniform(0.1, 0.9, (2, 3))
    ramp = (gx * np.cos(rng.uniform(0, 2 * np.pi)) + 1) / 2
    image = c0 + (c1 - c0) * ramp[..., None]
    parts = np.zeros((h, w), dtype=np.int64)

    def paint(mask: np.ndarray, colour: np.ndarray | tuple[float, ...], part: str | None) -> None:
        image[mask] = colour
        if part is not None:  # None: recolour only (a beard is still skin)
            parts[mask] = CELEBAMASK_PARTS.index(part) + 1

    face_rx, face_ry = rng.uniform(0.36, 0.42) * (1.06 if male else 1.0), rng.uniform(0.5, 0.56)
    paint((y > 0.72 + 0.2 * x**2) & (np.abs(x) < 0.95), rng.uniform(0.05, 0.95, 3), "cloth")
    paint((np.abs(x) < 0.16) & (y > 0.3) & (y < 0.9), skin * 0.85, "neck")
    if not male:
        paint(_ellipse(x, y, 0, 0.12, rng.uniform(0.58, 0.66), rng.uniform(0.8, 0.9)) & (y < 0.78), hair, "hair")
    for side, part in ((1, "l_ear"), (-1, "r_ear")):  # the subject's left is the image's right
        paint(_ellipse(x, y, side * face_rx, 0.0, 0.06, 0.11), skin * 0.92, part)
    paint(_ellipse(x, y, 0, 0, face_rx, face_ry), skin, "skin")
    if beard:
        paint(_ellipse(x, y, 0, 0, face_rx, face_ry) & (y > 0.12), 0.5 * skin + 0.5 * hair, None)
    paint(_ellipse(x, y, 0, 0.08, 0.045, 0.1), skin * 0.82, "nose")
    brow_ry = 0.035 if male else 0.02
    for side, eye, brow in ((1, "l_eye", "l_brow"), (-1, "r_eye", "r_brow")):
        paint(_ellipse(x, y, side * 0.16, -0.08, 0.075, 0.035), (0.95, 0.95, 0.95), eye)
        paint(
            _ellipse(x, y, side * 0.16, -0.08, 0.03, 0.03) & (parts == CELEBAMASK_PARTS.index(eye) + 1),
            (0.2, 0.15, 0.1),
            eye,
        )
        paint(_ellipse(x, y, side * 0.16, -0.19, 0.09, brow_ry), hair * 0.7, brow)

    lip_colour = (0.75, 0.1, 0.2) if lipstick else skin * 0.7
    half_width = 0.19 if smiling else 0.14
    across = np.clip(1 - (x / half_width) ** 2, 0, None) * (np.abs(x) < half_width)
    if smiling:  # an open mouth curving up: both lip lines sag in the middle, the lower more
        top, bottom = 0.27 + 0.05 * across, 0.27 + 0.15 * across
        inner = (y > top) & (y < bottom) & (across > 0)
        paint((y > top - 0.03) & (y <= top) & (across > 0), lip_colour, "u_lip")
        paint((y >= bottom) & (y < bottom + 0.035) & (across > 0), lip_colour, "l_lip")
        paint(inner, (0.35, 0.05, 0.08), "mouth")
        paint(inner & (y < top + 0.035), (0.97, 0.97, 0.92), "mouth")  # teeth
    else:
        paint((y > 0.29) & (y <= 0.32) & (across > 0), lip_colour, "u_lip")
        paint((y > 0.32) & (y < 0.355) & (across > 0), lip_colour, "l_lip")
    if glasses:
        frame = np.zeros((h, w), dtype=bool)
        for side in (1, -1):
            frame |= _ellipse(x, y, side * 0.16, -0.08, 0.11, 0.075) & ~_ellipse(x, y, side * 0.16, -0.08, 0.09, 0.058)
        frame |= (np.abs(x) < 0.07) & (np.abs(y + 0.09) < 0.012)
        paint(frame, (0.1, 0.1, 0.1), "eye_g")
    top_hair = _ellipse(x, y, 0, -0.06, face_rx + 0.04, face_ry + 0.06)
    hairline = -0.22 if bangs else -0.3 + rng.uniform(-0.04, 0.04)
    paint(top_hair & (y < hairline), hair, "hair")
    if hat:
        crown = _ellipse(x, y, 0, -0.5, 0.5, 0.32) & (y < -0.32)
        paint(crown | ((np.abs(y + 0.34) < 0.04) & (np.abs(x) < 0.62)), rng.uniform(0.05, 0.95, 3), "hat")

    light = 1 + 0.12 * (rng.uniform(-1, 1) * gx + rng.uniform(-1, 1) * gy)
    image = image * light[..., None] + rng.normal(0, 0.02, image.shape)
    attributes = {
        "Male": male, "Smiling": smiling, "Mouth_Slightly_Open": smiling, "No_Beard": not beard,
        "Eyeglasses": glasses, "Wearing_Hat": hat, "Bangs": bangs, "Wearing_Lipstick": lipstick,
        **{name: name == hair_name for name in HAIR_COLOURS},
    }  # fmt: skip
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), parts, attributes


def make_synthetic_celeba(
    root: str | Path,
    num_images: int = 100,
    size: int | tuple[int, int] = 96,
    seed: int = 0,
) -> Path:
    """Write a synthetic CelebAMask-HQ under ``root``: ``CelebA-HQ-img/<n>.jpg``, one mask PNG per
    part present under ``CelebAMask-HQ-mask-anno/<n // 2000>/``, and the attribute file with all
    40 attributes (those :func:`draw_face` does not decide are random). Images and masks are
    both ``size`` (the release's masks are half its images' size; the loader handles either).

    Image ``n`` depends only on ``(seed, n)``. Does nothing if ``root`` already holds exactly this
    dataset; regenerates (clearing cached masks and splits) if its parameters differ. Returns ``root``.
    """
    root = Path(root)
    size = as_size(size)
    if num_images < 1:
        raise ValueError(f"num_images must be positive, got {num_images}")
    params = {
        "generator": "synthetic_celeba",
        "version": GENERATOR_VERSION,
        "num_images": num_images,
        "size": list(size),
        "seed": seed,
    }
    if is_current(root, params):
        return root
    clear_generated(root, GENERATED)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in range(num_images):
        rng = np.random.default_rng([seed, n])
        image, parts, drawn = draw_face(rng, size)
        atomic_write_bytes(encode_image(image, "JPEG"), root / IMAGE_DIR / f"{n}.jpg")
        for index in np.unique(parts[parts > 0]):
            mask = (parts == index).astype(np.uint8) * 255
            atomic_write_bytes(encode_image(mask, "PNG"), part_mask_path(root, n, CELEBAMASK_PARTS[index - 1]))
        values = [drawn.get(name, bool(rng.random() < 0.3)) for name in CELEBA_ATTRIBUTES]
        rows.append(f"{n}.jpg " + " ".join("1" if v else "-1" for v in values))
    header = [str(num_images), " ".join(CELEBA_ATTRIBUTES)]
    (root / ATTRIBUTE_FILE).write_text("\n".join(header + rows) + "\n")
    mark_generated(root, params)
    return root
