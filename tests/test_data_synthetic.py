"""The synthetic datasets and their cache (lomt_train.data.synthetic_nyu, synthetic_celeba, cache)."""

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lomt_train.data import (
    CELEBA_ATTRIBUTES,
    CELEBAMASK_PARTS,
    make_synthetic_celeba,
    generate_cached,
    make_synthetic_nyu,
    synthetic_root,
)
from lomt_train.config import RunConfig
from lomt_train.data.cache import MARKER_NAME
from lomt_train.trainer import dataset_root
from lomt_train.data.synthetic_celeba import draw_face
from lomt_train.data.synthetic_nyu import KINDS, LIGHT, WALL, label_edges, render_room


def _read(path: Path) -> tuple[np.ndarray, str, str]:
    """An image file's pixels, format and mode."""
    with Image.open(path) as image:
        return np.array(image), image.format, image.mode


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "make",
    [
        lambda root, seed: make_synthetic_nyu(root, num_train=3, num_val=2, num_test=1, size=(24, 32), seed=seed),
        lambda root, seed: make_synthetic_nyu(root, num_train=3, num_val=2, size=(24, 32), seed=seed, layout="mtan"),
        lambda root, seed: make_synthetic_celeba(root, num_images=5, size=32, seed=seed),
    ],
    ids=["nyud_mt", "mtan", "celeba"],
)
def test_generation_is_deterministic_given_the_seed(tmp_path, make):
    a, b, c = _files(make(tmp_path / "a", 0)), _files(make(tmp_path / "b", 0)), _files(make(tmp_path / "c", 1))
    assert a == b
    assert a != c


def test_generation_is_idempotent_and_regenerates_on_new_parameters(tmp_path):
    root = make_synthetic_celeba(tmp_path / "celeba", num_images=5, size=32)
    stamp = {p: p.stat().st_mtime_ns for p in root.rglob("*.jpg")}
    assert make_synthetic_celeba(root, num_images=5, size=32) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.jpg")} == stamp
    (root / "lomt_masks3").mkdir()  # a derived cache, stale once the images change
    make_synthetic_celeba(root, num_images=3, size=32)
    assert sorted(p.name for p in (root / "CelebA-HQ-img").iterdir()) == ["0.jpg", "1.jpg", "2.jpg"]
    assert not (root / "lomt_masks3").exists()
    nyu = make_synthetic_nyu(tmp_path / "nyu", num_train=2, num_val=1, size=(16, 16))
    make_synthetic_nyu(nyu, num_train=2, num_val=1, size=(16, 16), layout="mtan")
    assert sorted(p.name for p in nyu.iterdir()) == ["lomt_synthetic.json", "train", "val"]


def test_generation_refuses_to_overwrite_foreign_data(tmp_path):
    (tmp_path / "my_data.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not empty and has no lomt_synthetic.json"):
        make_synthetic_nyu(tmp_path, num_train=1, num_val=1, size=(8, 8))
    assert (tmp_path / "my_data.txt").read_text() == "precious"


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="only train and val"):
        make_synthetic_nyu(tmp_path, num_test=2, layout="mtan")
    with pytest.raises(ValueError, match="layout must be"):
        make_synthetic_nyu(tmp_path, layout="nyu13")
    with pytest.raises(ValueError, match="num_images must be positive"):
        make_synthetic_celeba(tmp_path, num_images=0)


def test_synthetic_root(tmp_path, monkeypatch):
    monkeypatch.setenv("LOMT_DATA_CACHE", str(tmp_path))
    assert synthetic_root("nyu") == tmp_path / "synthetic" / "nyu"
    sized = synthetic_root("nyu", num_train=96, size=(64, 64))
    assert sized.parent == tmp_path / "synthetic" and sized.name.startswith("nyu-")
    assert sized == synthetic_root("nyu", size=(64, 64), num_train=96) != synthetic_root("nyu", num_train=32)
    monkeypatch.delenv("LOMT_DATA_CACHE")
    assert synthetic_root("celeba") == Path.home() / ".cache" / "lomt" / "synthetic" / "celeba"


def test_nyu_files_follow_the_release_conventions(tmp_path):
    root = make_synthetic_nyu(tmp_path, num_train=4, num_val=2, num_test=2, size=(48, 64))
    assert (root / "gt_sets" / "train.txt").read_text().split() == ["000000", "000001", "000002", "000003"]
    assert (root / "gt_sets" / "test.txt").read_text().split() == ["000006", "000007"]
    for item in ("000000", "000005"):
        image, image_format, mode = _read(root / "images" / f"{item}.jpg")
        assert image_format == "JPEG" and image.shape == (48, 64, 3) and mode == "RGB"
        labels = _read(root / "segmentation" / f"{item}.png")[0]
        depth = np.load(root / "depth" / f"{item}.npy")
        normals = np.load(root / "normals" / f"{item}.npy")
        edge = np.load(root / "edge" / f"{item}.npy")
        assert labels.dtype == np.uint8 and labels.shape == (48, 64)
        assert {1, 2, 22} <= set(np.unique(labels)) and labels.max() <= 40 and (labels == 0).any()
        assert depth.dtype == np.float32 and depth.shape == (48, 64)
        valid = depth > 0
        assert 0.3 < valid.mean() < 1.0 and depth[valid].min() > 0.5 and depth.max() < 10.0
        assert normals.shape == (48, 64, 3)
        np.testing.assert_allclose(np.linalg.norm(normals[valid], axis=-1), 1.0, atol=1e-5)
        assert (normals[~valid] == 0).all()
        np.testing.assert_array_equal(edge, label_edges(labels, void=0))
        assert set(np.unique(edge)) == {0.0, 1.0}


def test_nyu_geometry_is_consistent():
    view = render_room(np.random.default_rng(7), (48, 64))
    floor = view.labels40() == 2
    # The floor faces up (-y in the camera frame, up to the small pitch) and gets nearer downwards.
    assert (view.normal[floor & (view.depth > 0)][:, 1] < -0.9).all()
    rows = np.where(floor.any(axis=1))[0]
    near, far = view.depth[rows[-1]], view.depth[rows[0]]
    assert near[near > 0].mean() < far[far > 0].mean()
    # Normals point at the camera: against the viewing ray.
    v, u = np.mgrid[0:48, 0:64] + 0.5
    rays = np.stack([(u - 32) / 51.2, (v - 24) / 51.2, np.ones_like(u)], -1)
    assert ((view.normal * rays).sum(-1) <= 1e-6).all()


@pytest.fixture(scope="module")
def rooms():
    """Forty rendered rooms: enough for correlations across scenes to be clear of chance (about 0.16)."""
    return [render_room(np.random.default_rng([3, i]), (48, 64)) for i in range(40)]


def test_nyu_segmentation_is_readable_from_a_pixels_colour(rooms):
    # Nearest kind by chromaticity (colour over its sum), pixel by pixel: no context at all.
    colours = np.array([k.colour for k in KINDS])
    chroma = colours / colours.sum(1, keepdims=True)
    for view in rooms:
        labelled = view.kind >= 0
        pixels = view.image[labelled].astype(float)
        pixel_chroma = pixels / pixels.sum(1, keepdims=True).clip(1)
        nearest = np.argmin(((pixel_chroma[:, None] - chroma) ** 2).sum(-1), 1)
        assert (nearest == view.kind[labelled]).mean() > 0.85


def test_nyu_normals_are_readable_from_a_pixels_shading(rooms):
    # A pixel's brightness over its kind's colour is the shading 0.5 + 0.45 n.light, up to texture and noise.
    ratio, shading = [], []
    for view in rooms:
        valid = (view.kind >= 0) & (view.depth > 0)
        colours = np.array([k.colour for k in KINDS])[view.kind[valid]]
        ratio.append(view.image[valid].astype(float).sum(1) / (255 * colours.sum(1)))
        shading.append(view.normal[valid] @ LIGHT)
    assert np.corrcoef(np.concatenate(ratio), np.concatenate(shading))[0, 1] > 0.95


def test_nyu_depth_follows_the_rooms_layout_not_the_local_look(rooms):
    # The back wall: its depth against its height in the image (global layout) and against its look (local).
    height, depth, brightness = [], [], []
    for view in rooms:
        back = (view.kind == KINDS.index(WALL)) & (view.normal[..., 2] < -0.95) & (view.depth > 0)
        height.append(back.sum(0).max())
        depth.append(np.median(view.depth[back]))
        brightness.append(view.image[back].mean())
    assert np.corrcoef(np.log(height), np.log(depth))[0, 1] < -0.85
    assert abs(np.corrcoef(brightness, depth)[0, 1]) < 0.4


def test_label_edges():
    labels = np.array([[1, 1, 2], [1, 1, 2], [0, 0, 2]])
    np.testing.assert_array_equal(label_edges(labels, void=0), [[0, 1, 1], [0, 1, 1], [0, 0, 0]])


def test_celeba_files_follow_the_release_conventions(tmp_path):
    root = make_synthetic_celeba(tmp_path, num_images=6, size=(40, 32))
    lines = (root / "CelebAMask-HQ-attribute-anno.txt").read_text().splitlines()
    assert lines[0] == "6" and lines[1].split() == list(CELEBA_ATTRIBUTES)
    assert [line.split()[0] for line in lines[2:]] == [f"{n}.jpg" for n in range(6)]
    assert all(set(line.split()[1:]) <= {"1", "-1"} and len(line.split()) == 41 for line in lines[2:])
    assert _read(root / "CelebA-HQ-img" / "3.jpg")[0].shape == (40, 32, 3)
    masks = sorted((root / "CelebAMask-HQ-mask-anno" / "0").iterdir())
    assert {m.name.split("_", 1)[1][:-4] for m in masks} <= set(CELEBAMASK_PARTS)
    skin = _read(root / "CelebAMask-HQ-mask-anno" / "0" / "00003_skin.png")[0]
    assert skin.shape == (40, 32) and set(np.unique(skin)) == {0, 255}


def test_celeba_attributes_are_visible_in_the_drawing():
    hair, mouth = CELEBAMASK_PARTS.index("hair") + 1, CELEBAMASK_PARTS.index("mouth") + 1
    for n in range(40):
        image, parts, attrs = draw_face(np.random.default_rng([0, n]), (64, 64))
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        # Long hair (not male) falls below the eyes; short hair stays on top of the head.
        assert (parts[40:] == hair).any() != attrs["Male"]
        # A smile opens the mouth.
        assert (parts == mouth).any() == attrs["Smiling"]


def test_generation_is_fast(tmp_path):
    start = time.perf_counter()
    make_synthetic_nyu(tmp_path / "nyu", num_train=200, num_val=0, size=(64, 64))
    make_synthetic_celeba(tmp_path / "celeba", num_images=200, size=64)
    assert time.perf_counter() - start < 2 * 20.0  # each of the two must take under 20 s


def test_the_trainers_cache_is_keyed_on_every_generation_parameter(tmp_path, monkeypatch):
    monkeypatch.setenv("LOMT_DATA_CACHE", str(tmp_path))
    base = RunConfig(dataset="nyu", tasks=["seg"], synthetic=True, image_size=16, synthetic_images=4)
    roots = [dataset_root(base), dataset_root(dataclasses.replace(base, image_size=24)),
             dataset_root(dataclasses.replace(base, synthetic_images=8))]
    assert len(set(roots)) == 3
    for root, side, count in zip(roots, (16, 24, 16), (4, 4, 8)):
        assert _read(root / "images" / "000000.jpg")[0].shape == (side, side, 3)
        assert len((root / "gt_sets" / "train.txt").read_text().split()) == count


def test_a_cached_set_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    monkeypatch.setenv("LOMT_DATA_CACHE", str(tmp_path))

    def killed(root, **params):
        make_synthetic_nyu(root, **{**params, "num_val": 0})  # some files written, then the process dies
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_cached("nyu", killed, num_train=2, num_val=1, size=[16, 16])
    root = synthetic_root("nyu", num_train=2, num_val=1, size=[16, 16])
    assert not root.exists() and not list(root.parent.glob(f".{root.name}.*.tmp"))
    orphan = root.parent / f".{root.name}.abc123.tmp"  # as a SIGKILL would leave it
    (orphan / "images").mkdir(parents=True)
    assert generate_cached("nyu", make_synthetic_nyu, num_train=2, num_val=1, size=[16, 16]) == root
    assert not orphan.exists() and (root / "gt_sets" / "val.txt").read_text() == "000002\n"


def test_concurrent_users_of_one_cached_set_generate_it_once(tmp_path, monkeypatch):
    monkeypatch.setenv("LOMT_DATA_CACHE", str(tmp_path))
    generated = []

    def slow(root, **params):
        if not (root / MARKER_NAME).exists():
            generated.append(root)
            time.sleep(0.5)  # long enough for the other thread to look for the set meanwhile
        return make_synthetic_nyu(root, **params)

    with ThreadPoolExecutor(2) as pool:
        roots = list(pool.map(lambda _: generate_cached("nyu", slow, num_train=2, num_val=1, size=[16, 16]), range(2)))
    assert roots[0] == roots[1] and len(generated) == 1
