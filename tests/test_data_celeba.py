"""The CelebAMask-HQ loader on hand-built fixtures in the release layout (lomt_train.data.celeba)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lomt_train.data import (
    CELEBA_ATTRIBUTES,
    CELEBA_TASKS,
    CELEBAMASK_CLASS_NAMES,
    CELEBAMASK_PARTS,
    CelebAMaskHQDataset,
    CorruptFileError,
    DatasetLayoutError,
    build_dataset,
    compose_mask3,
    make_synthetic_celeba,
)
from lomt_train.data.celeba import make_split, part_mask_path

IDS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 2001]  # 2001 lives in mask folder 1
MALE, SMILING = CELEBA_ATTRIBUTES.index("Male"), CELEBA_ATTRIBUTES.index("Smiling")


def _parts() -> dict[str, np.ndarray]:
    """An 8x8 face: skin below row 2, hair rows 0-3 (over the skin's top), a hat over the hair's
    left half, a nose, a neck pixel and a cloth row."""
    parts = {name: np.zeros((8, 8), dtype=bool) for name in ("skin", "hair", "hat", "nose", "neck", "cloth")}
    parts["skin"][2:] = True
    parts["hair"][:4] = True
    parts["hat"][:2, :4] = True
    parts["nose"][5, 4] = True
    parts["neck"][6, 0] = True
    parts["cloth"][7] = True
    return parts


EXPECTED_MASK3 = np.array([[0, 0, 0, 0, 1, 1, 1, 1]] * 2 + [[1] * 8] * 2 + [[2] * 8] * 2 + [[0] + [2] * 7] + [[0] * 8])


def _attribute_row(n: int) -> list[int]:
    row = [-1] * 40
    row[MALE] = 1 if n % 2 else -1
    row[SMILING] = 1 if n % 3 == 0 else -1
    return row


def write_celeba(root: Path) -> Path:
    """The release layout for IDS: 16x16 JPEG images, 8x8 part masks (RGB, as in the release),
    and the attribute file (Male = odd n, Smiling = n divisible by 3)."""
    (root / "CelebA-HQ-img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for n in IDS:
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "CelebA-HQ-img" / f"{n}.jpg")
        for part, mask in _parts().items():
            path = part_mask_path(root, n, part)
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.repeat(mask[..., None], 3, -1).astype(np.uint8) * 255).save(path)
    rows = [f"{n}.jpg  " + " ".join(map(str, _attribute_row(n))) for n in IDS]
    (root / "CelebAMask-HQ-attribute-anno.txt").write_text(
        "\n".join([str(len(IDS)), " ".join(CELEBA_ATTRIBUTES), *rows]) + "\n"
    )
    return root


def test_names_are_shipped():
    assert CELEBAMASK_PARTS == (
        "skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear", "mouth",
        "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth",
    )  # fmt: skip
    assert len(CELEBAMASK_CLASS_NAMES) == 19 and CELEBAMASK_CLASS_NAMES[0] == "background"
    assert len(CELEBA_ATTRIBUTES) == 40 and CELEBA_ATTRIBUTES[20] == "Male" and CELEBA_ATTRIBUTES[31] == "Smiling"
    assert CELEBA_TASKS[0] == "seg" and {"male", "smiling", "eyeglasses", "5_o_clock_shadow"} <= set(CELEBA_TASKS)


def test_compose_mask3_hand_built():
    mask3 = compose_mask3({k: torch.from_numpy(v) for k, v in _parts().items()})
    assert mask3.dtype == torch.uint8
    np.testing.assert_array_equal(mask3.numpy(), EXPECTED_MASK3)


def test_compose_mask3_paints_in_release_order():
    full = torch.ones(2, 2, dtype=torch.bool)
    assert (compose_mask3({"u_lip": full, "hair": full}) == 1).all()  # hair comes after the lips
    assert (compose_mask3({"hair": full, "neck_l": full}) == 0).all()  # a necklace is background
    assert (compose_mask3({"eye_g": full}) == 2).all()
    with pytest.raises(ValueError, match="unknown parts \\['beard'\\]"):
        compose_mask3({"beard": full})


def test_part_mask_path_uses_the_release_folders():
    assert part_mask_path("r", 2001, "l_eye") == Path("r/CelebAMask-HQ-mask-anno/1/02001_l_eye.png")
    assert part_mask_path("r", 7, "skin") == Path("r/CelebAMask-HQ-mask-anno/0/00007_skin.png")


def test_sample_contract(tmp_path):
    root = write_celeba(tmp_path)
    ds = build_dataset("celeba", root, "train", ["seg", "male", "smiling"], image_size=8)
    assert isinstance(ds, CelebAMaskHQDataset)
    assert ds.num_classes == 3 and ds.class_names == ["background", "hair", "skin"] and ds.layout == "celebamask_hq"
    assert ds.tasks == ("seg", "male", "smiling") and len(ds) == 6
    for index, n in enumerate(ds.ids):
        s = ds[index]
        assert s["index"] == index
        assert s["image"].shape == (3, 8, 8) and s["image"].dtype == torch.float32
        assert s["seg"].dtype == torch.int64
        np.testing.assert_array_equal(s["seg"].numpy(), EXPECTED_MASK3)
        assert s["male"].shape == () and s["male"].dtype == torch.float32
        assert s["male"].item() == float(n % 2) and s["smiling"].item() == float(n % 3 == 0)
    # Images (16x16) and masks (8x8) are resized independently to the same output size.
    big = build_dataset("celeba", root, "val", ["seg"], image_size=(32, 24))[0]
    assert big["image"].shape == (3, 32, 24) and big["seg"].shape == (32, 24)


def test_mask_cache_is_written_and_reused(tmp_path):
    root = write_celeba(tmp_path)
    ds = build_dataset("celeba", root, "test", ["seg"], image_size=8)
    n = ds.ids[0]
    first = ds[0]["seg"]
    cached = root / "lomt_masks3" / f"{n}.png"
    with Image.open(cached) as image:
        np.testing.assert_array_equal(np.array(image), EXPECTED_MASK3)
    for part in _parts():
        part_mask_path(root, n, part).unlink()
    assert torch.equal(ds[0]["seg"], first)


def test_read_only_root_caches_under_the_cache_folder(tmp_path, monkeypatch):
    root = write_celeba(tmp_path / "data")
    cache = tmp_path / "cache"
    monkeypatch.setenv("LOMT_DATA_CACHE", str(cache))
    real_access = __import__("os").access
    monkeypatch.setattr("os.access", lambda p, mode: False if Path(p) == root else real_access(p, mode))
    ds = build_dataset("celeba", root, "train", ["seg"], image_size=8)
    ds[0]
    assert not list(root.glob("lomt_*"))
    assert len(list(cache.glob("celeba/*/lomt_split_seed0.json"))) == 1
    assert len(list(cache.glob("celeba/*/lomt_masks3/*.png"))) == 1


def test_split_is_seeded_disjoint_and_written(tmp_path):
    root = write_celeba(tmp_path)
    splits = {s: build_dataset("celeba", root, s, ["male"]).ids for s in ("train", "val", "test")}
    assert [len(splits[s]) for s in ("train", "val", "test")] == [6, 2, 2]
    assert sorted(sum(splits.values(), [])) == sorted(IDS)
    stored = json.loads((root / "lomt_split_seed0.json").read_text())
    assert stored["seed"] == 0 and stored["fractions"] == [0.6, 0.2, 0.2]
    assert {s: stored[s] for s in splits} == splits
    (root / "lomt_split_seed0.json").unlink()
    assert build_dataset("celeba", root, "train", ["male"]).ids == splits["train"]  # same seed, same split
    other = build_dataset("celeba", root, "train", ["male"], seed=1).ids
    assert other != splits["train"] and (root / "lomt_split_seed1.json").is_file()
    big = make_split(range(1000), seed=3)
    assert [len(big[s]) for s in ("train", "val", "test")] == [600, 200, 200]


def test_an_existing_split_file_is_used(tmp_path):
    root = write_celeba(tmp_path)
    custom = tmp_path / "my_split.json"
    custom.write_text(json.dumps({"train": [2001, 0], "val": [1], "test": [2]}))
    ds = CelebAMaskHQDataset(root, "train", ["male"], split_path=custom)
    assert ds.ids == [2001, 0]
    custom.write_text(json.dumps({"train": [99999], "val": [], "test": []}))
    with pytest.raises(CorruptFileError, match="my_split.json: 1 ids not in the attribute file"):
        CelebAMaskHQDataset(root, "train", ["male"], split_path=custom)


def test_unknown_task_lists_the_valid_ones(tmp_path):
    root = write_celeba(tmp_path)
    with pytest.raises(
        ValueError, match=r"unknown task\(s\) \['smile'\]; valid tasks are \['seg', '5_o_clock_shadow'.*'smiling'"
    ):
        build_dataset("celeba", root, "train", ["seg", "smile"])
    with pytest.raises(ValueError, match="one layout"):
        build_dataset("celeba", root, "train", ["seg"], layout="mtan")


@pytest.mark.parametrize("missing", ["CelebA-HQ-img", "CelebAMask-HQ-mask-anno", "CelebAMask-HQ-attribute-anno.txt"])
def test_missing_folder_shows_the_layout(tmp_path, missing):
    root = write_celeba(tmp_path)
    target = root / missing
    target.rename(root / "elsewhere")
    with pytest.raises(DatasetLayoutError) as err:
        build_dataset("celeba", root, "train", ["seg", "male"])
    message = str(err.value)
    assert str(target) in message
    assert "CelebA-HQ-img/<n>.jpg" in message and "<n // 2000>/<n:05d>_<part>.png" in message
    assert "skin, nose, eye_g" in message


def test_corrupt_attribute_file_names_the_line(tmp_path):
    root = write_celeba(tmp_path)
    path = root / "CelebAMask-HQ-attribute-anno.txt"
    lines = path.read_text().splitlines()
    lines[4] = lines[4].replace("-1", "0", 1)
    path.write_text("\n".join(lines))
    with pytest.raises(CorruptFileError, match=r"attribute-anno.txt, line 5: values must be 1 or -1"):
        build_dataset("celeba", root, "train", ["male"])
    path.write_text("\n".join(lines[:3]))
    with pytest.raises(CorruptFileError, match="line 1 says 10 images but 1 rows follow"):
        build_dataset("celeba", root, "train", ["male"])


def test_corrupt_or_missing_masks_are_named(tmp_path):
    root = write_celeba(tmp_path)
    ds = build_dataset("celeba", root, "train", ["seg"], image_size=8)
    n = ds.ids[0]
    part_mask_path(root, n, "nose").write_bytes(b"\x89PNG broken")
    with pytest.raises(CorruptFileError, match=rf"{n:05d}_nose.png: cannot decode image"):
        ds[0]
    for part in _parts():
        part_mask_path(root, n, part).unlink()
    with pytest.raises(FileNotFoundError, match=rf"no part masks for image {n}"):
        ds[0]
    (root / "CelebA-HQ-img" / f"{ds.ids[1]}.jpg").write_bytes(b"nope")
    with pytest.raises(CorruptFileError, match=rf"{ds.ids[1]}\.jpg: cannot decode image"):
        ds[1]


def test_masks_of_another_shape_than_their_image_are_named(tmp_path):
    root = write_celeba(tmp_path)  # 16x16 images with 8x8 masks, as the release's halves
    ds = build_dataset("celeba", root, "train", ["seg"], image_size=8)
    ds[0]
    n = ds.ids[1]
    for part in _parts():
        Image.fromarray(np.zeros((8, 6), dtype=np.uint8)).save(part_mask_path(root, n, part))
    with pytest.raises(CorruptFileError, match=rf"{n:05d}_\*\.png: its size 8x6 does not match its image .*{n}\.jpg"):
        ds[1]


def test_augmentation_is_reproducible(tmp_path):
    root = write_celeba(tmp_path)
    ds = build_dataset("celeba", root, "train", ["seg", "male"], image_size=8, augment=True)
    torch.manual_seed(0)
    a = ds[0]
    torch.manual_seed(0)
    b = ds[0]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["seg"], b["seg"])
    outcomes = set()
    for seed in range(20):
        torch.manual_seed(seed)
        outcomes.add(ds[0]["seg"].numpy().tobytes())
    assert len(outcomes) > 2
    assert set(torch.unique(ds[0]["seg"]).tolist()) <= {0, 1, 2}


def test_synthetic_fixture(tmp_path):
    root = make_synthetic_celeba(tmp_path, num_images=10, size=32)
    ds = build_dataset("celeba", root, "train", ["seg", "male", "smiling"], image_size=16)
    assert len(ds) == 6
    s = ds[0]
    assert s["image"].shape == (3, 16, 16) and set(s["seg"].unique().tolist()) == {0, 1, 2}
