"""Overlays: run-length decoding into the tight box, colours by class, legend, tiny and large images."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import cv2
import numpy as np
from eval_synth import random_instances
from pycocotools import mask as mask_utils

from cellseg_deploy.data.rle import encode_crop, encode_mask
from cellseg_deploy.evaluation.overlays import (
    _decode_tight,
    class_color,
    draw_overlay,
    rle_counts,
    write_overlay,
)
from cellseg_deploy.structures import Instances


def test_rle_counts_matches_pycocotools() -> None:
    runs = [0, 5, 4_750_000 - 12, 7]  # leading foreground, a run longer than 2**22
    counts = mask_utils.frPyObjects({"size": [1900, 2500], "counts": runs}, 1900, 2500)["counts"]
    assert rle_counts(counts) == runs
    assert rle_counts(counts.decode()) == runs


def test_decode_tight_equals_full_decode() -> None:
    rng = np.random.default_rng(0)
    for t in range(200):
        h, w = (int(v) for v in rng.integers(1, 30, 2))
        mask = rng.random((h, w)) < rng.random() * 0.3
        if t % 7 == 0:
            mask[:] = t % 2 == 0  # all or nothing
        crop, x, y = _decode_tight(encode_mask(mask))
        full = np.zeros((h, w), bool)
        full[y : y + crop.shape[0], x : x + crop.shape[1]] = crop > 0
        assert (full == mask).all(), t
        if mask.any():
            ys, xs = np.nonzero(mask)
            assert (x, y, crop.shape[1], crop.shape[0]) == (
                xs.min(),
                ys.min(),
                np.ptp(xs) + 1,
                np.ptp(ys) + 1,
            )


def test_overlay_colours_pixels_by_class(tmp_path: Path) -> None:
    h, w = 60, 80
    masks = np.zeros((2, h, w), bool)
    masks[0, 5:20, 5:25] = True
    masks[1, 30:50, 40:70] = True
    inst = Instances(
        boxes=np.array([[5, 5, 25, 20], [40, 30, 70, 50]], np.float32),
        labels=np.array([1, 3], np.int64),
        scores=np.array([0.9, 0.8], np.float32),
        rles=[encode_mask(m) for m in masks],
        image_size=(h, w),
    )
    image = np.full((h, w, 3), 100, np.uint8)
    out = draw_overlay(image, inst, alpha=0.5)
    scale = out.shape[1] // w  # small images are enlarged by an integer factor
    assert scale >= 2 and out.shape[0] > h * scale, "legend strip below the image"
    inside1 = out[12 * scale, 15 * scale].astype(int)
    inside3 = out[40 * scale, 55 * scale].astype(int)
    outside = out[55 * scale, 5 * scale].astype(int)
    assert np.abs(inside1 - (np.array(class_color(1)) + 100) / 2).max() <= 1
    assert np.abs(inside3 - (np.array(class_color(3)) + 100) / 2).max() <= 1
    assert (outside == 100).all()
    path = write_overlay(tmp_path / "o.png", image, inst, alpha=0.5)
    back = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    assert (back == out).all()


def test_overlay_of_tiny_and_empty() -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (33, 35, 3), dtype=np.uint8)
    out = draw_overlay(image, random_instances(rng, (33, 35), 3))
    assert out.dtype == np.uint8 and out.shape[0] > 33
    empty = Instances(
        np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32), [], (33, 35)
    )
    assert draw_overlay(image, empty).shape == out.shape


def test_large_dense_overlay_never_builds_n_by_h_by_w() -> None:
    """2500 x 1900 with 400 cells: peak traced memory stays at a few image-sized buffers (N x H x W: 1.9 GB)."""
    rng = np.random.default_rng(2)
    h, w, n = 1900, 2500, 400
    rles, boxes = [], []
    for _ in range(n):
        r = rng.uniform(5, 12)
        cy, cx = rng.uniform(r, h - r - 1), rng.uniform(r, w - r - 1)
        y0, x0, s = int(cy - r), int(cx - r), int(2 * r) + 2
        yy, xx = np.mgrid[:s, :s]
        rles.append(encode_crop(((yy + y0 - cy) ** 2 + (xx + x0 - cx) ** 2) <= r * r, x0, y0, (h, w)))
        boxes.append([x0, y0, x0 + s, y0 + s])
    inst = Instances(
        np.array(boxes, np.float32), rng.integers(1, 5, n), rng.random(n).astype(np.float32), rles, (h, w)
    )
    image = np.full((h, w, 3), 90, np.uint8)
    tracemalloc.start()
    try:
        out = draw_overlay(image, inst)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.shape[1] == w
    assert peak < 8 * h * w * 3, f"peak {peak / 1e6:.0f} MB"


def test_thin_images_are_stretched_along_their_short_side() -> None:
    from cellseg_deploy.evaluation.overlays import MIN_OVERLAY_SHORT_SIDE, overlay_scale

    assert overlay_scale(257, 1) == (1, MIN_OVERLAY_SHORT_SIDE)
    assert overlay_scale(1, 600) == (MIN_OVERLAY_SHORT_SIDE, 1)
    assert overlay_scale(33, 35) == (8, 8)  # small images: one factor for both sides, as before
    assert overlay_scale(500, 400) == (1, 1)
    image = np.zeros((257, 1, 3), np.uint8)
    inst = Instances(
        boxes=np.zeros((0, 4), np.float32),
        labels=np.zeros((0,), np.int64),
        scores=np.zeros((0,), np.float32),
        rles=[],
        image_size=(257, 1),
    )
    out = draw_overlay(image, inst)
    assert out.shape[0] > 257 and np.all(out[:257, :MIN_OVERLAY_SHORT_SIDE] == 0)
