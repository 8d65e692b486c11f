"""Augmentations move the image, masks and boxes together and are a pure function of their generator."""

from __future__ import annotations

import numpy as np
import pytest

from cellseg_deploy.training.augment import (
    Target,
    augment,
    boxes_from_masks,
    color_jitter,
    hflip,
    rescale,
    rot90,
    vflip,
)
from cellseg_deploy.training.recipe import AugmentSettings


def _scene(h: int = 37, w: int = 53) -> tuple[np.ndarray, Target]:
    """An image whose red channel is 255 exactly on the instances' pixels (so alignment is checkable)."""
    rng = np.random.default_rng(0)
    masks = np.zeros((3, h, w), np.uint8)
    masks[0, 2:9, 3:20] = 1
    masks[1, 20:35, 40:52] = 1
    masks[2, 10:14, 0:5] = 1
    masks[2, 12, 5] = 1  # not a rectangle
    image = rng.integers(0, 100, (h, w, 3), dtype=np.uint8)
    image[..., 0] = np.where(masks.any(0), 255, 0)
    return image, Target(masks, boxes_from_masks(masks), np.array([1, 2, 4], np.int64))


def _check_consistent(image: np.ndarray, target: Target) -> None:
    assert target.masks.shape[1:] == image.shape[:2]
    np.testing.assert_array_equal(target.boxes, boxes_from_masks(target.masks))
    np.testing.assert_array_equal(target.masks.any(0), image[..., 0] > 127)


def test_boxes_from_masks_use_exclusive_edges() -> None:
    masks = np.zeros((2, 10, 12), np.uint8)
    masks[0, 2:5, 3:7] = 1
    np.testing.assert_array_equal(boxes_from_masks(masks), [[3, 2, 7, 5], [0, 0, 0, 0]])


@pytest.mark.parametrize(
    "op",
    [hflip, vflip, lambda i, t: rot90(i, t, 1), lambda i, t: rot90(i, t, 2), lambda i, t: rot90(i, t, 3)],
)
def test_geometric_ops_transform_boxes_exactly_like_masks(op) -> None:  # type: ignore[no-untyped-def]
    image, target = _scene()
    out_image, out_target = op(image, target)
    _check_consistent(np.ascontiguousarray(out_image), out_target)
    np.testing.assert_array_equal(out_target.labels, target.labels)


def test_rot90_matches_numpy_orientation() -> None:
    image, target = _scene()
    out, _ = rot90(image, target, 1)
    np.testing.assert_array_equal(out, np.rot90(image))
    assert out.shape[:2] == (image.shape[1], image.shape[0])


def test_rescale_keeps_masks_on_the_image() -> None:
    image, target = _scene()
    out_image, out_target = rescale(image, target, 2.0)
    assert out_image.shape[:2] == (74, 106)
    np.testing.assert_array_equal(out_target.boxes, boxes_from_masks(out_target.masks))
    np.testing.assert_allclose(out_target.boxes, target.boxes * 2, atol=2)


def test_full_augment_is_consistent_and_deterministic() -> None:
    settings = AugmentSettings(hflip=0.5, vflip=0.5, rot90=0.5, scale_range=(0.7, 1.4), crop_size=30)
    image, target = _scene()
    shapes: set[bytes] = set()
    for seed in range(12):
        a_img, a_t = augment(image, target, settings, np.random.default_rng(seed))
        b_img, b_t = augment(image, target, settings, np.random.default_rng(seed))
        np.testing.assert_array_equal(a_img, b_img)
        np.testing.assert_array_equal(a_t.masks, b_t.masks)
        assert a_img.flags.c_contiguous and a_t.masks.flags.c_contiguous
        assert max(a_img.shape[:2]) <= 30
        np.testing.assert_array_equal(a_t.boxes, boxes_from_masks(a_t.masks))
        assert (a_t.boxes[:, 2] > a_t.boxes[:, 0]).all(), "empty instances are dropped"
        # bilinear image vs nearest masks can disagree on edge pixels only after rescaling
        red = a_img[..., 0] > 127
        inside = a_t.masks.any(0)
        assert (red == inside).mean() > 0.9
        shapes.add(a_img.tobytes())
    assert len(shapes) > 6, "the draws vary with the seed"


def test_crop_drops_instances_that_leave_the_window() -> None:
    image, target = _scene()
    settings = AugmentSettings(hflip=0, vflip=0, rot90=0, crop_size=16)
    labels_seen = set()
    for seed in range(20):
        _, t = augment(image, target, settings, np.random.default_rng(seed))
        labels_seen.add(len(t))
    assert 0 in labels_seen or 1 in labels_seen


def test_color_jitter_changes_colour_only_and_grayscale_is_grey() -> None:
    image, _ = _scene()
    settings = AugmentSettings(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1, stain=0.1)
    out = color_jitter(image, settings, np.random.default_rng(1))
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert not np.array_equal(out, image)
    grey = color_jitter(image, AugmentSettings(grayscale=1.0), np.random.default_rng(1))
    np.testing.assert_array_equal(grey[..., 0], grey[..., 1])
    np.testing.assert_array_equal(grey[..., 1], grey[..., 2])
    same = color_jitter(image, AugmentSettings(), np.random.default_rng(1))
    np.testing.assert_array_equal(same, image)


def test_no_augmentation_is_identity() -> None:
    image, target = _scene()
    off = AugmentSettings(hflip=0, vflip=0, rot90=0)
    out, t = augment(image, target, off, np.random.default_rng(0))
    np.testing.assert_array_equal(out, image)
    np.testing.assert_array_equal(t.masks, target.masks)
    np.testing.assert_array_equal(t.boxes, target.boxes)
