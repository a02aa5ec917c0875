"""The NYU-v2 loader on hand-built fixtures in the NYUD_MT and MTAN layouts (lomt_train.data.nyu)."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lomt_train.data import (
    NYU13_CLASS_NAMES,
    NYU40_CLASS_NAMES,
    CorruptFileError,
    DatasetLayoutError,
    NYUv2Dataset,
    build_dataset,
    detect_nyu_layout,
    make_synthetic_nyu,
)
from lomt_train.data.nyu import carve_validation

H, W = 6, 8
TASKS = ["seg", "depth", "normal", "edge"]


def _stored_labels(k: int) -> np.ndarray:
    """PNG values 0..40 spread over the image (0 = void), different per image."""
    return ((np.arange(H * W) + k) % 41).reshape(H, W)


def write_nyud_mt(root: Path, with_test: bool = True) -> Path:
    """Three images (ids a, b, c): a JPEG, a PNG with a 16-bit label file, ...; train = [b, a],
    val = [c] and, ``with_test``, test = [c]: a release with its own test split, whose splits are
    taken as they are (without one, see test_splits_without_a_test_split_*)."""
    for folder in ("images", "segmentation", "depth", "normals", "edge", "gt_sets"):
        (root / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k, item in enumerate("abc"):
        image = Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8))
        image.save(root / "images" / (f"{item}.png" if item == "b" else f"{item}.jpg"))
        labels = _stored_labels(k)
        label_image = Image.fromarray(labels.astype(np.uint16 if item == "b" else np.uint8))
        label_image.save(root / "segmentation" / f"{item}.png")
        depth = np.full((H, W), 2.0 + k, dtype=np.float32)
        depth[0, 0] = 0.0
        np.save(root / "depth" / f"{item}.npy", depth)
        normals = np.zeros((H, W, 3), dtype=np.float32)
        normals[1:] = (0.0, 0.0, -2.0)  # stored non-unit; row 0 invalid
        np.save(root / "normals" / f"{item}.npy", normals)
        np.save(root / "edge" / f"{item}.npy", (labels % 2).astype(np.float32))
    (root / "gt_sets" / "train.txt").write_text("b\na\n")
    (root / "gt_sets" / "val.txt").write_text("c\n")
    if with_test:
        (root / "gt_sets" / "test.txt").write_text("c\n")
    return root


def write_mtan(root: Path, channels_last: bool = True, with_test: bool = True) -> Path:
    """Two train images, one val image and (``with_test``) one test image as MTAN arrays
    (channel-first if asked)."""
    rng = np.random.default_rng(1)
    for split, count in (("train", 2), ("val", 1), ("test", 1))[: 3 if with_test else 2]:
        for folder in ("image", "label", "depth", "normal"):
            (root / split / folder).mkdir(parents=True)
        for i in range(count):
            label = (np.arange(H * W) % 14 - 1).reshape(H, W).astype(np.float32)  # -1..12
            arrays = {
                "image": rng.random((H, W, 3), dtype=np.float32),
                "label": label,
                "depth": np.full((H, W, 1), 3.5, dtype=np.float32),
                "normal": np.tile(np.float32([0.0, 1.0, 0.0]), (H, W, 1)),
            }
            for folder, array in arrays.items():
                if not channels_last and array.ndim == 3:
                    array = np.moveaxis(array, -1, 0)
                np.save(root / split / folder / f"{i}.npy", array)
    return root


def test_class_names_are_shipped():
    assert len(NYU40_CLASS_NAMES) == 40 and len(set(NYU40_CLASS_NAMES)) == 40
    assert NYU40_CLASS_NAMES[:3] == ("wall", "floor", "cabinet")
    assert NYU40_CLASS_NAMES[21] == "ceiling" and NYU40_CLASS_NAMES[-1] == "otherprop"
    assert "refridgerator" in NYU40_CLASS_NAMES and "floor mat" in NYU40_CLASS_NAMES
    assert NYU13_CLASS_NAMES == (
        "bed", "books", "ceiling", "chair", "floor", "furniture", "objects", "picture", "sofa",
        "table", "tv", "wall", "window",
    )  # fmt: skip


def test_nyud_mt_sample_contract(tmp_path):
    ds = build_dataset("nyu", write_nyud_mt(tmp_path), "train", TASKS, image_size=(H, W))
    assert isinstance(ds, NYUv2Dataset)
    assert ds.layout == "nyud_mt" and ds.num_classes == 40 and ds.class_names == list(NYU40_CLASS_NAMES)
    assert ds.tasks == tuple(TASKS) and ds.ids == ["b", "a"] and len(ds) == 2
    for index, k in ((0, 1), (1, 0)):  # id b was written second, a first
        s = ds[index]
        assert s["index"] == index
        assert s["image"].shape == (3, H, W) and s["image"].dtype == torch.float32
        stored = torch.from_numpy(_stored_labels(k))
        expected = torch.where(stored == 0, 255, stored - 1)
        assert s["seg"].dtype == torch.int64 and torch.equal(s["seg"], expected)
        assert s["seg"][s["seg"] != 255].max() == 39 and s["seg"].min() == 0
        assert s["depth"].shape == (1, H, W) and s["depth"].dtype == torch.float32
        assert s["depth"][0, 0, 0] == 0.0 and s["depth"][0, 1, 1] == 2.0 + k
        assert s["normal"].shape == (3, H, W)
        torch.testing.assert_close(s["normal"][:, 1:], torch.tensor([0.0, 0.0, -1.0]).view(3, 1, 1).expand(3, H - 1, W))
        assert (s["normal"][:, 0] == 0).all()
        assert s["edge"].shape == (1, H, W) and set(s["edge"].unique().tolist()) <= {0.0, 1.0}


def test_resize_and_batching(tmp_path):
    ds = build_dataset("nyu", write_nyud_mt(tmp_path), "val", TASKS, image_size=16)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=1)))
    assert batch["image"].shape == (1, 3, 16, 16) and batch["seg"].shape == (1, 16, 16)
    assert batch["depth"].shape == (1, 1, 16, 16) and batch["normal"].shape == (1, 3, 16, 16)
    assert batch["index"].tolist() == [0]


def test_augmentation_only_for_train(tmp_path):
    root = write_nyud_mt(tmp_path)
    assert build_dataset("nyu", root, "train", ["depth"], image_size=8, augment=True).augment
    assert not build_dataset("nyu", root, "val", ["depth"], image_size=8, augment=True).augment
    ds = build_dataset("nyu", root, "train", ["depth"], image_size=(H, W), augment=True)
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        seen |= {round(d, 5) for d in ds[1]["depth"].unique().tolist()}  # id a: 2 m, one hole
    assert seen <= {0.0, 2.0, round(2.0 / 1.2, 5), round(2.0 / 1.5, 5)}
    assert len(seen - {0.0}) >= 2


def test_mtan_layout_either_channel_order(tmp_path):
    for channels_last in (True, False):
        root = write_mtan(tmp_path / str(channels_last), channels_last)
        assert detect_nyu_layout(root) == "mtan"
        ds = build_dataset("nyu", root, "train", ["seg", "depth", "normal"], image_size=(H, W))
        assert ds.layout == "mtan" and ds.num_classes == 13 and ds.class_names == list(NYU13_CLASS_NAMES)
        assert ds.ids == ["0", "1"]
        s = ds[0]
        expected = torch.from_numpy((np.arange(H * W) % 14 - 1).reshape(H, W)).to(torch.int64)
        assert torch.equal(s["seg"], torch.where(expected < 0, 255, expected))
        assert s["image"].shape == (3, H, W)
        assert (s["depth"] == 3.5).all() and s["normal"].shape == (3, H, W)
        torch.testing.assert_close(s["normal"][:, 2, 3], torch.tensor([0.0, 1.0, 0.0]))


def test_mtan_has_no_edge_and_its_val_is_our_test(tmp_path):
    root = write_mtan(tmp_path, with_test=False)
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['edge'\].*'seg', 'depth', 'normal'"):
        build_dataset("nyu", root, "train", ["seg", "edge"])
    assert build_dataset("nyu", root, "test", ["seg"]).ids == ["0"]  # the release's val
    train, val = (build_dataset("nyu", root, split, ["seg"]).ids for split in ("train", "val"))
    assert sorted(train + val) == ["0", "1"] and len(val) == 1  # carved from the release's train


def test_unknown_task_or_split_or_layout(tmp_path):
    root = write_nyud_mt(tmp_path)
    with pytest.raises(
        ValueError, match=r"unknown task\(s\) \['normals'\]; valid tasks are \['seg', 'depth', 'normal', 'edge'\]"
    ):
        build_dataset("nyu", root, "train", ["normals"])
    with pytest.raises(ValueError, match="split must be one of"):
        build_dataset("nyu", root, "training", ["seg"])
    with pytest.raises(ValueError, match="unknown NYU-v2 layout 'nyu40'"):
        build_dataset("nyu", root, "train", ["seg"], layout="nyu40")
    with pytest.raises(ValueError, match="unknown dataset 'kitti'"):
        build_dataset("kitti", root, "train", ["seg"])


def test_missing_split_file_lists_available_splits(tmp_path):
    root = write_nyud_mt(tmp_path, with_test=False)
    (root / "gt_sets" / "val.txt").unlink()
    with pytest.raises(DatasetLayoutError, match=r"no split 'val'.*val.txt; available splits: \['train'\]"):
        build_dataset("nyu", root, "test", ["seg"])


@pytest.mark.parametrize("write", [write_nyud_mt, write_mtan])
def test_splits_without_a_test_split_of_the_release(tmp_path, write):
    """NYUD_MT and MTAN ship train and val, their val being the standard test set: that is our
    test split, and our train and val are carved from the release's train: disjoint, covering
    it, the same every time (no run seed takes part)."""
    root = write(tmp_path, with_test=False)
    splits = {split: build_dataset("nyu", root, split, ["seg"]).ids for split in ("train", "val", "test")}
    release_train = sorted(build_dataset("nyu", write(tmp_path / "again", with_test=True), "train", ["seg"]).ids)
    assert sorted(splits["train"] + splits["val"]) == release_train and not set(splits["train"]) & set(splits["val"])
    assert splits["test"] == build_dataset("nyu", write(tmp_path / "again2", with_test=True), "val", ["seg"]).ids
    assert splits == {split: build_dataset("nyu", root, split, ["seg"]).ids for split in ("train", "val", "test")}


def test_validation_is_a_fixed_tenth_of_the_release_train():
    ids = [f"{i:04d}" for i in range(795)]  # NYUD_MT's training set size
    train, val = carve_validation(ids)
    assert len(val) == 80 and len(train) == 715 and sorted(train + val) == ids
    assert carve_validation(ids) == (train, val) and train == sorted(train)  # file order kept
    with pytest.raises(DatasetLayoutError, match="at least 2 training images"):
        carve_validation(["only"])


def test_missing_folder_shows_the_layout(tmp_path):
    root = write_nyud_mt(tmp_path)
    (root / "normals" / "a.npy").unlink()
    (root / "normals" / "b.npy").unlink()
    (root / "normals" / "c.npy").unlink()
    (root / "normals").rmdir()
    build_dataset("nyu", root, "train", ["seg", "depth"])  # normals not needed
    with pytest.raises(DatasetLayoutError) as err:
        build_dataset("nyu", root, "train", ["seg", "normal"])
    message = str(err.value)
    assert f"missing folder {root / 'normals'}" in message
    assert "normals/<id>.npy" in message and "gt_sets/train.txt" in message
    assert isinstance(err.value, FileNotFoundError)


def test_unrecognised_root_shows_both_layouts(tmp_path):
    with pytest.raises(DatasetLayoutError) as err:
        build_dataset("nyu", tmp_path / "nowhere", "train", ["seg"])
    assert "missing folder" in str(err.value)
    assert "segmentation/<id>.png" in str(err.value) and "train/label/<i>.npy" in str(err.value)


def test_missing_file_is_named(tmp_path):
    root = write_nyud_mt(tmp_path)
    (root / "depth" / "a.npy").unlink()
    ds = build_dataset("nyu", root, "train", ["depth"])
    with pytest.raises(FileNotFoundError, match=r"depth/a\.npy"):
        ds[1]


@pytest.mark.parametrize(
    ("path", "content", "task", "match"),
    [
        ("depth/a.npy", b"\x93NUMPY not really", "depth", "cannot load array"),
        ("images/a.jpg", b"not a jpeg", "depth", "cannot decode image"),
        ("normals/a.npy", None, "normal", r"expected an array with 3 channel\(s\), got shape \(6, 8, 2\)"),
    ],
)
def test_corrupt_file_is_named(tmp_path, path, content, task, match):
    root = write_nyud_mt(tmp_path)
    if content is None:
        np.save(root / path, np.zeros((H, W, 2), dtype=np.float32))
    else:
        (root / path).write_bytes(content)
    ds = build_dataset("nyu", root, "train", [task])
    with pytest.raises(CorruptFileError, match=match) as err:
        ds[1]
    assert str(err.value).startswith(str(root / path))


@pytest.mark.parametrize(
    ("task", "path", "write"),
    [
        ("seg", "segmentation/a.png", lambda p: Image.fromarray(np.ones((H + 2, W), dtype=np.uint8)).save(p)),
        ("depth", "depth/a.npy", lambda p: np.save(p, np.ones((H, W - 2), dtype=np.float32))),
        ("normal", "normals/a.npy", lambda p: np.save(p, np.ones((H // 2, W // 2, 3), dtype=np.float32))),
        ("edge", "edge/a.npy", lambda p: np.save(p, np.ones((2 * H, 2 * W), dtype=np.float32))),
    ],
)
def test_a_target_of_another_size_than_its_image_is_named(tmp_path, task, path, write):
    root = write_nyud_mt(tmp_path)
    write(root / path)
    ds = build_dataset("nyu", root, "train", [task])
    with pytest.raises(CorruptFileError, match=rf"does not match its image .*a\.jpg \({H}x{W} expected\)") as err:
        ds[1]
    assert str(err.value).startswith(str(root / path))


@pytest.mark.parametrize("bad", ["../../outside/x", "sub/a", "..", "a\\..\\b"])
def test_split_ids_must_be_plain_names(tmp_path, bad):
    root = write_nyud_mt(tmp_path / "nyu")
    (root / "gt_sets" / "train.txt").write_text(f"b\n\n{bad}\n")
    with pytest.raises(CorruptFileError, match=rf"train\.txt, line 3: id {re.escape(repr(bad))} is not a plain name"):
        build_dataset("nyu", root, "train", ["seg"])


def test_labels_outside_the_layout_are_rejected(tmp_path):
    root = write_nyud_mt(tmp_path)
    Image.fromarray(np.full((H, W), 200, dtype=np.uint8)).save(root / "segmentation" / "c.png")
    ds = build_dataset("nyu", root, "val", ["seg"])
    with pytest.raises(CorruptFileError, match=r"c\.png: label 199 outside 0\.\.39"):
        ds[0]


def test_synthetic_fixture_in_both_layouts(tmp_path):
    root = make_synthetic_nyu(tmp_path / "nyu", num_train=3, num_val=2, num_test=1, size=(24, 32))
    for split, count in (("train", 3), ("val", 2), ("test", 1)):
        ds = build_dataset("nyu", root, split, TASKS, image_size=16)
        assert len(ds) == count and ds.layout == "nyud_mt"
        s = ds[0]
        assert s["depth"][s["depth"] > 0].min() > 0.5 and s["depth"].max() < 10.0
    root = make_synthetic_nyu(tmp_path / "mtan", num_train=3, num_val=2, size=(24, 32), layout="mtan")
    ds = build_dataset("nyu", root, "test", ["seg", "depth", "normal"], image_size=16)  # the release's val
    assert ds.layout == "mtan" and len(ds) == 2
    assert set(ds[0]["seg"].unique().tolist()) <= set(range(13)) | {255}


def test_mean_depth_is_over_the_valid_pixels_of_the_split(tmp_path):
    root = write_nyud_mt(tmp_path)
    # train = [b, a]: depth 3 and 2 m everywhere but one invalid (0) pixel each.
    assert build_dataset("nyu", root, "train", TASKS, image_size=(H, W)).mean_depth() == pytest.approx(2.5, abs=1e-12)
    assert build_dataset("nyu", root, "val", TASKS, image_size=(H, W)).mean_depth() == pytest.approx(4.0, abs=1e-12)
    with pytest.raises(ValueError, match="without the depth task"):
        build_dataset("nyu", root, "train", ["seg"], image_size=(H, W)).mean_depth()
