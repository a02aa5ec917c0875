"""Synthetic NYU-v2: rendered indoor rooms written in the real release layouts.

Each image is a room (floor, ceiling, back and side walls) with a few pieces of furniture
(axis-aligned boxes standing on the floor) and flat decorations on the walls (pictures,
windows, televisions), seen through a pinhole camera with a random height, yaw and pitch.
Every pixel's ray is intersected with the planes and boxes in numpy, so depth (z in the camera
frame, metres), surface normals (camera frame: x right, y down, z forward; pointing towards the
camera) and labels all come from the same geometry.

The rendering is built so that the three tasks need features of different depth in a network,
which is what LOMT's probe (:mod:`lomt_train.lomt`) is meant to find:

* **segmentation is local**: every kind of surface has its own hue (:data:`KINDS`, jittered by a
  few percent per scene) and its own fine stripe texture, so a pixel's class is readable from a
  small patch;
* **normals are local shading**: one light from a fixed direction (jittered slightly per scene)
  with a wrapped Lambertian term, so each orientation of surface has its own brightness;
  brightness over the surface's hue gives the normal from the same small patch;
* **depth is global layout**: nothing in a patch tells its distance (no fall-off with distance,
  the texture is drawn in image space so its scale does not shrink with depth, and room sizes,
  camera height and pitch vary widely); a pixel's depth follows from where it lies relative to
  the room's corners, the horizon and the floor line of the furniture, i.e. from the whole image.

As in the real data, some pixels are void (label 0 in the PNG) and some have no depth (0) and
so no normal (0): the window panes, where a Kinect sees through the glass, and a random blob.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cache import clear_generated, is_current, mark_generated
from .class_names import NYU13_CLASS_NAMES, NYU40_CLASS_NAMES
from ..atomic import atomic_write_bytes
from .files import encode_image
from .transforms import as_size

GENERATOR_VERSION = 2
# Everything either layout writes, cleared before regenerating.
GENERATED = ("images", "segmentation", "depth", "normals", "edge", "gt_sets", "train", "val")


@dataclass(frozen=True)
class _Kind:
    """A kind of surface: its NYU-40 and NYU-13 class names and its base colour (RGB in [0, 1]).

    The colours are spread over the hue circle, so that no two kinds share a hue."""

    name40: str
    name13: str
    colour: tuple[float, float, float]

    @property
    def label40(self) -> int:
        return NYU40_CLASS_NAMES.index(self.name40) + 1  # PNG values are 1-based, 0 is void

    @property
    def label13(self) -> int:
        return NYU13_CLASS_NAMES.index(self.name13)


WALL = _Kind("wall", "wall", (0.95, 0.29, 0.29))
FLOOR = _Kind("floor", "floor", (0.41, 0.75, 0.46))
CEILING = _Kind("ceiling", "ceiling", (0.47, 0.29, 0.95))
# Furniture kinds with (width, height, depth) ranges in metres.
FURNITURE: tuple[tuple[_Kind, tuple[tuple[float, float], ...]], ...] = (
    (_Kind("cabinet", "furniture", (0.95, 0.89, 0.52)), ((0.6, 1.2), (0.8, 2.0), (0.4, 0.6))),
    (_Kind("bed", "bed", (0.23, 0.75, 0.75)), ((1.4, 2.0), (0.4, 0.6), (1.9, 2.2))),
    (_Kind("sofa", "sofa", (0.95, 0.52, 0.89)), ((1.6, 2.4), (0.7, 0.9), (0.8, 1.0))),
    (_Kind("table", "table", (0.48, 0.95, 0.29)), ((0.8, 1.6), (0.7, 0.8), (0.6, 1.0))),
    (_Kind("bookshelf", "furniture", (0.41, 0.46, 0.75)), ((0.8, 1.2), (1.6, 2.2), (0.3, 0.4))),
    (_Kind("dresser", "furniture", (0.95, 0.57, 0.29)), ((0.8, 1.4), (0.8, 1.1), (0.45, 0.6))),
    (_Kind("night stand", "furniture", (0.52, 0.95, 0.77)), ((0.4, 0.6), (0.5, 0.7), (0.4, 0.5))),
    (_Kind("box", "objects", (0.60, 0.23, 0.75)), ((0.3, 0.6), (0.3, 0.5), (0.3, 0.6))),
)
WINDOW = _Kind("window", "window", (0.83, 0.95, 0.52))
# Wall decorations with (width, height) ranges and the range of their centre's height above the floor.
DECOR: tuple[tuple[_Kind, tuple[tuple[float, float], ...]], ...] = (
    (_Kind("picture", "picture", (0.29, 0.67, 0.95)), ((0.4, 1.0), (0.3, 0.8), (1.4, 1.9))),
    (WINDOW, ((0.9, 1.6), (1.0, 1.4), (1.4, 1.8))),
    (_Kind("television", "tv", (0.75, 0.41, 0.56)), ((0.8, 1.3), (0.5, 0.75), (1.0, 1.4))),
)
KINDS: tuple[_Kind, ...] = (WALL, FLOOR, CEILING, *(k for k, _ in FURNITURE), *(k for k, _ in DECOR))


@dataclass
class RenderedView:
    """One rendered image and its ground truth, all ``[H, W, ...]`` numpy arrays.

    ``kind``: int index into :data:`KINDS`, -1 = void; ``depth``: float32 metres, 0 = invalid;
    ``normal``: float32 ``[H, W, 3]``, 0 = invalid; ``image``: uint8 ``[H, W, 3]``.
    """

    image: np.ndarray
    kind: np.ndarray
    depth: np.ndarray
    normal: np.ndarray

    def labels40(self) -> np.ndarray:
        """uint8 ``[H, W]``, NYU-40 ids 1..40, 0 = void (the NYUD_MT PNG encoding)."""
        return np.where(self.kind >= 0, np.array([k.label40 for k in KINDS])[self.kind], 0).astype(np.uint8)

    def labels13(self) -> np.ndarray:
        """float32 ``[H, W]``, NYU-13 classes 0..12, -1 = void (the MTAN encoding)."""
        return np.where(self.kind >= 0, np.array([k.label13 for k in KINDS])[self.kind], -1).astype(np.float32)


def _rotation(yaw: float, pitch: float) -> np.ndarray:
    cy, sy, cp, sp = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch)
    yaw_m = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    pitch_m = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    return yaw_m @ pitch_m


def render_room(rng: np.random.Generator, size: tuple[int, int]) -> RenderedView:
    """Draw a random room and render it at ``size = (H, W)``.

    World frame: camera at the origin, x right, y down, z forward; the camera frame is the
    world frame turned by a small yaw and pitch.
    """
    h, w = size
    # Wide ranges, so that depth is a matter of each room's layout rather than of a typical room.
    cam_height, room_height = rng.uniform(1.2, 1.6), rng.uniform(2.5, 3.2)
    floor_y, ceiling_y = cam_height, cam_height - room_height
    left_x, right_x, back_z = -rng.uniform(1.2, 3.5), rng.uniform(1.2, 3.5), rng.uniform(4.0, 8.5)
    rot = _rotation(rng.uniform(-0.25, 0.25), rng.uniform(-0.12, 0.12))

    # Camera-frame rays with unit z, so the ray parameter t is the depth; turned into the world.
    focal = 0.8 * w
    v, u = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    rays = np.stack([(u - w / 2) / focal, (v - h / 2) / focal, np.ones_like(u)], axis=-1) @ rot.T

    t = np.full((h, w), np.inf)
    kind = np.full((h, w), -1)
    normal = np.zeros((h, w, 3))
    surface = np.full((h, w), -1)  # which room plane (0..4) a pixel sees, for the decorations

    # The camera is inside the convex room, so the nearest positive plane hit is the visible one.
    planes = [
        (1, floor_y, (0, -1, 0), FLOOR), (1, ceiling_y, (0, 1, 0), CEILING), (2, back_z, (0, 0, -1), WALL),
        (0, left_x, (1, 0, 0), WALL), (0, right_x, (-1, 0, 0), WALL),
    ]  # fmt: skip
    with np.errstate(divide="ignore", invalid="ignore"):
        for index, (axis, offset, plane_normal, plane_kind) in enumerate(planes):
            hit_t = offset / rays[..., axis]
            nearer = (hit_t > 0) & (hit_t < t)
            t[nearer], kind[nearer], surface[nearer] = hit_t[nearer], KINDS.index(plane_kind), index
            normal[nearer] = plane_normal
        points = rays * t[..., None]

        # Decorations: rectangles on the back wall (in x) or a side wall (in z).
        for _ in range(rng.integers(1, 3)):
            decor_kind, (width, height, centre) = DECOR[rng.integers(len(DECOR))]
            dw, dh, cy = rng.uniform(*width), rng.uniform(*height), floor_y - rng.uniform(*centre)
            plane = int(rng.integers(2, 5))
            along = 0 if plane == 2 else 2
            lo, hi = (left_x, right_x) if plane == 2 else (1.0, back_z)
            cx = rng.uniform(lo + dw / 2, max(lo + dw / 2, hi - dw / 2))
            inside = (
                (surface == plane) & (np.abs(points[..., along] - cx) < dw / 2) & (np.abs(points[..., 1] - cy) < dh / 2)
            )
            kind[inside] = KINDS.index(decor_kind)

        # Furniture: boxes on the floor, intersected with the slab method.
        for _ in range(rng.integers(1, 4)):
            box_kind, (width, height, depth) = FURNITURE[rng.integers(len(FURNITURE))]
            bw, bh, bd = rng.uniform(*width), rng.uniform(*height), rng.uniform(*depth)
            x0 = rng.uniform(left_x, max(left_x, right_x - bw))
            z0 = back_z - bd if rng.random() < 0.5 else rng.uniform(2.0, max(2.0, back_z - bd))
            lo, hi = np.array([x0, floor_y - bh, z0]), np.array([x0 + bw, floor_y, z0 + bd])
            t_lo, t_hi = lo / rays, hi / rays
            t_near = np.minimum(t_lo, t_hi)
            entry = t_near.max(axis=-1)
            hit = (entry < np.maximum(t_lo, t_hi).min(axis=-1)) & (entry > 0) & (entry < t)
            face_axis = t_near.argmax(axis=-1)
            face_normal = np.zeros((h, w, 3))
            np.put_along_axis(
                face_normal, face_axis[..., None], -np.sign(np.take_along_axis(rays, face_axis[..., None], -1)), -1
            )
            t[hit], kind[hit], normal[hit] = entry[hit], KINDS.index(box_kind), face_normal[hit]
            surface[hit] = -1

    normal_cam = normal @ rot  # world -> camera frame (rot is orthonormal)
    image = _shade(rng, kind, normal_cam)

    # Missing depth, as from a Kinect: window panes and a random blob.
    no_depth = kind == KINDS.index(WINDOW)
    by, bx, br = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.03, 0.08) * min(h, w)
    no_depth |= (v - by) ** 2 + (u - bx) ** 2 < br**2
    depth = np.where(no_depth, 0.0, t)
    normal_cam[no_depth] = 0.0
    # Void labels: a thin border on one side (as the NYU crops leave) and a small rectangle.
    border = int(rng.integers(1, 3))
    kind[:, :border] = -1
    ry, rx = int(rng.integers(0, h)), int(rng.integers(0, w))
    kind[ry : ry + max(1, h // 16), rx : rx + max(1, w // 16)] = -1
    return RenderedView(image, kind, depth.astype(np.float32), normal_cam.astype(np.float32))


# The light, in the camera frame: each orientation of a room's surfaces (floor, ceiling, back
# wall, left and right walls) gets a distinct n . LIGHT (0.81, -0.81, 0.55, 0.2, -0.2).
LIGHT = np.array([0.2, -0.81, -0.55])


def _shade(rng: np.random.Generator, kind: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """The image: each kind's colour (jittered a little per scene) times its image-space stripe
    texture times a wrapped Lambertian shading of the camera-frame ``normal``, plus pixel noise.

    Shading and texture are local by construction: brightness depends on the normal only (not on
    the distance), and the stripes have a fixed size in pixels whatever the surface's depth.
    """
    h, w = kind.shape
    colours = np.array([k.colour for k in KINDS]) * rng.uniform(0.96, 1.04, size=(len(KINDS), 3))
    light = LIGHT + rng.uniform(-0.05, 0.05, size=3)
    light /= np.linalg.norm(light)
    # A stripe orientation and period (pixels) per kind, the same in every scene.
    angle = np.pi * np.arange(len(KINDS)) / len(KINDS)
    period = 3.0 + np.arange(len(KINDS)) % 3
    v, u = np.mgrid[0:h, 0:w] + 0.5
    phase = 2 * np.pi * (u * np.cos(angle[kind]) + v * np.sin(angle[kind])) / period[kind]
    texture = 1.0 + 0.06 * np.sin(phase)
    brightness = 0.5 + 0.45 * (normal @ light)
    image = colours[kind] * (texture * brightness)[..., None] + rng.normal(0.0, 0.02, size=kind.shape + (3,))
    return (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)


def label_edges(labels: np.ndarray, void: int) -> np.ndarray:
    """float32 ``[H, W]``: 1 where a 4-neighbour has a different label, ignoring ``void`` pixels."""
    edges = np.zeros(labels.shape, dtype=bool)
    for axis in (0, 1):
        a, b = np.swapaxes(labels, 0, axis)[:-1], np.swapaxes(labels, 0, axis)[1:]
        change = (a != b) & (a != void) & (b != void)
        view = np.swapaxes(edges, 0, axis)
        view[:-1] |= change
        view[1:] |= change
    return edges.astype(np.float32)


def _write_nyud_mt(root: Path, item: str, view: RenderedView) -> None:
    for folder in ("depth", "normals", "edge"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    labels = view.labels40()
    atomic_write_bytes(encode_image(view.image, "JPEG"), root / "images" / f"{item}.jpg")
    atomic_write_bytes(encode_image(labels, "PNG"), root / "segmentation" / f"{item}.png")
    np.save(root / "depth" / f"{item}.npy", view.depth)
    np.save(root / "normals" / f"{item}.npy", view.normal)
    np.save(root / "edge" / f"{item}.npy", label_edges(labels, void=0))


def _write_mtan(split_root: Path, item: str, view: RenderedView) -> None:
    arrays = {
        "image": view.image.astype(np.float32) / 255.0,
        "label": view.labels13(),
        "depth": view.depth[..., None],
        "normal": view.normal,
    }
    for folder, array in arrays.items():
        (split_root / folder).mkdir(parents=True, exist_ok=True)
        np.save(split_root / folder / f"{item}.npy", array)


def make_synthetic_nyu(
    root: str | Path,
    num_train: int = 64,
    num_val: int = 16,
    num_test: int = 0,
    size: int | tuple[int, int] = (96, 128),
    seed: int = 0,
    layout: str = "nyud_mt",
) -> Path:
    """Write a synthetic NYU-v2 under ``root`` in the ``"nyud_mt"`` (40-class, with
    ``gt_sets/{train,val[,test]}.txt``) or ``"mtan"`` (13-class, ``train/`` and ``val/``) layout.

    Image ``i`` (counting train, then val, then test) depends only on ``(seed, i)``. Does
    nothing if ``root`` already holds exactly this dataset; regenerates if its parameters differ.
    Returns ``root``.
    """
    root = Path(root)
    size = as_size(size)
    if layout not in ("nyud_mt", "mtan"):
        raise ValueError(f"layout must be 'nyud_mt' or 'mtan', got {layout!r}")
    if layout == "mtan" and num_test:
        raise ValueError("the MTAN layout has only train and val splits; pass num_test=0")
    if min(num_train, num_val, num_test) < 0:
        raise ValueError("image counts must be non-negative")
    params = {
        "generator": "synthetic_nyu", "version": GENERATOR_VERSION, "num_train": num_train,
        "num_val": num_val, "num_test": num_test, "size": list(size), "seed": seed, "layout": layout,
    }  # fmt: skip
    if is_current(root, params):
        return root
    clear_generated(root, GENERATED)
    root.mkdir(parents=True, exist_ok=True)
    counts = {"train": num_train, "val": num_val, "test": num_test}
    index = 0
    for split, count in counts.items():
        items = [f"{index + i:06d}" if layout == "nyud_mt" else str(i) for i in range(count)]
        for i, item in enumerate(items):
            view = render_room(np.random.default_rng([seed, index + i]), size)
            if layout == "nyud_mt":
                _write_nyud_mt(root, item, view)
            else:
                _write_mtan(root / split, item, view)
        if layout == "nyud_mt" and (count or split != "test"):
            (root / "gt_sets").mkdir(exist_ok=True)
            (root / "gt_sets" / f"{split}.txt").write_text("".join(f"{item}\n" for item in items))
        index += count
    mark_generated(root, params)
    return root
