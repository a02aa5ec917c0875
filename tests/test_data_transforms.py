"""Resizing, scale-crop, flip and normalisation of samples (lomt_train.data.transforms)."""

import pytest
import torch

from lomt_train.data.transforms import (
    FULL_VIEW,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SCALES,
    View,
    apply_view,
    as_size,
    prepare_sample,
    random_view,
)


def _raw(h: int = 8, w: int = 12) -> dict[str, torch.Tensor]:
    """A sample whose every pixel is distinguishable: values encode the position."""
    pos = torch.arange(h * w, dtype=torch.float32).view(h, w)
    normal = torch.stack([torch.full((h, w), 0.6), torch.full((h, w), 0.0), torch.full((h, w), -0.8)])
    normal[:, 0, 0] = 0.0  # one invalid normal
    depth = 1.0 + pos[None] / (h * w)
    depth[:, 1, 2] = 0.0  # one invalid depth
    return {
        "image": (pos / (h * w)).expand(3, h, w).clone(),
        "seg": (torch.arange(h * w) % 7).view(h, w).to(torch.int64),
        "depth": depth,
        "normal": normal,
        "edge": (pos[None] % 2 == 0).to(torch.float32),
    }


def test_as_size():
    assert as_size(64) == (64, 64)
    assert as_size((32, 48)) == (32, 48)
    for bad in (0, (1, 2, 3), (4.0, 5), -3):
        with pytest.raises(ValueError, match="image_size"):
            as_size(bad)


def test_full_view_at_native_size_is_exact():
    raw = _raw()
    out = apply_view(raw, FULL_VIEW, (8, 12))
    for key in ("seg", "depth", "normal", "edge"):
        torch.testing.assert_close(out[key], raw[key])
    torch.testing.assert_close(out["image"], raw["image"])
    assert out["seg"].dtype == torch.int64 and out["image"].dtype == torch.float32


def test_resize_uses_nearest_for_targets_and_keeps_invalid_pixels_exact():
    raw = _raw()
    out = apply_view(raw, FULL_VIEW, (16, 24))
    up = lambda t: t.repeat_interleave(2, -2).repeat_interleave(2, -1)  # noqa: E731
    torch.testing.assert_close(out["seg"], up(raw["seg"]))
    torch.testing.assert_close(out["depth"], up(raw["depth"]))
    torch.testing.assert_close(out["normal"], up(raw["normal"]))
    assert set(out["seg"].unique().tolist()) <= set(raw["seg"].unique().tolist())
    # Down-sampling never blends a hole into its neighbours.
    small = apply_view(raw, FULL_VIEW, (4, 6))
    assert set(small["depth"].flatten().tolist()) <= set(raw["depth"].flatten().tolist())


def test_uint8_image_becomes_float_in_unit_range():
    raw = {"image": torch.full((3, 4, 4), 255, dtype=torch.uint8)}
    out = apply_view(raw, FULL_VIEW, (2, 2))
    torch.testing.assert_close(out["image"], torch.ones(3, 2, 2))


def test_flip_mirrors_everything_and_negates_normal_x():
    raw = _raw()
    out = apply_view(raw, View(flip=True), (8, 12))
    for key in ("image", "seg", "depth", "edge"):
        torch.testing.assert_close(out[key], raw[key].flip(-1))
    expected = raw["normal"].flip(-1)
    expected[0] = -expected[0]
    torch.testing.assert_close(out["normal"], expected)
    assert out["normal"][0, 0, -1] == 0.0  # the invalid normal stays all-zero


def test_scale_crop_magnifies_a_box_and_divides_depth():
    raw = _raw()
    view = View(top=0.5, left=0.5, height=0.5, width=0.5)
    assert view.scale == 2.0
    out = apply_view(raw, view, (8, 12))
    quadrant = lambda t: t[..., 4:, 6:].repeat_interleave(2, -2).repeat_interleave(2, -1)  # noqa: E731
    torch.testing.assert_close(out["seg"], quadrant(raw["seg"]))
    torch.testing.assert_close(out["depth"], quadrant(raw["depth"]) / 2.0)
    torch.testing.assert_close(out["normal"], quadrant(raw["normal"]))


def test_view_aligns_tensors_of_different_resolutions():
    # CelebAMask-HQ: the image is twice the mask's resolution; a crop must cut the same region.
    rows, cols = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    mask = (rows // 4) * 4 + cols // 4  # 16 blocks of 4x4, labels 0..15
    image = mask.repeat_interleave(2, 0).repeat_interleave(2, 1).to(torch.float32).expand(3, 32, 32) / 16
    view = View(top=0.25, left=0.125, height=1 / 1.5, width=1 / 1.5, flip=True)
    out = apply_view({"image": image, "seg": mask}, view, (24, 24))
    # Inside the blocks the (smoothly resized) image shows the label the mask has there.
    agree = (out["image"][0] * 16 - out["seg"]).abs() < 0.01
    assert agree.float().mean() > 0.6
    assert out["seg"][0, -1] == mask[4, 2]  # top-left of the box, mirrored to the right


def test_random_view_is_reproducible_and_covers_the_recipe():
    torch.manual_seed(3)
    first = [random_view() for _ in range(60)]
    torch.manual_seed(3)
    assert [random_view() for _ in range(60)] == first
    assert {round(v.scale, 6) for v in first} == set(SCALES)
    assert {v.flip for v in first} == {True, False}
    for v in first:
        assert 0 <= v.top <= 1 - v.height + 1e-9 and 0 <= v.left <= 1 - v.width + 1e-9
    gen = torch.Generator().manual_seed(5)
    assert random_view(gen) == random_view(torch.Generator().manual_seed(5))


def test_prepare_sample_normalises_with_imagenet_statistics():
    image = torch.tensor(IMAGENET_MEAN).view(3, 1, 1).expand(3, 4, 4).clone()
    out = prepare_sample({"image": image}, (4, 4))
    torch.testing.assert_close(out["image"], torch.zeros(3, 4, 4))
    out = prepare_sample({"image": torch.ones(3, 4, 4)}, (2, 2))
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out["image"][:, 0, 0], expected)


def test_prepare_sample_augmentation_is_seeded_by_torch():
    raw = _raw()
    torch.manual_seed(0)
    a = prepare_sample(raw, (8, 12), augment=True)
    torch.manual_seed(0)
    b = prepare_sample(raw, (8, 12), augment=True)
    for key in a:
        torch.testing.assert_close(a[key], b[key])
