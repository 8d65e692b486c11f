"""The windowed RLE encoder gives exactly pycocotools' encoding of the full mask (random cases)."""

from __future__ import annotations

import numpy as np
import pytest

from cellseg_deploy.data.rle import encode_crop, encode_mask
from cellseg_deploy.postprocess import PostprocessConfig, paste_mask, postprocess
from cellseg_deploy.structures import Detections


def _full(crop: np.ndarray, x0: int, y0: int, size: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(size, bool)
    mask[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] = crop
    return mask


def test_encode_crop_equals_full_mask_encoding_on_random_windows() -> None:
    rng = np.random.default_rng(0)
    for _ in range(3000):
        height, width = (int(v) for v in rng.integers(1, 24, size=2))
        y0, x0 = int(rng.integers(0, height)), int(rng.integers(0, width))
        h, w = int(rng.integers(0, height - y0 + 1)), int(rng.integers(0, width - x0 + 1))
        crop = rng.random((h, w)) < rng.choice([0.0, 0.05, 0.5, 0.95, 1.0])
        assert encode_crop(crop, x0, y0, (height, width)) == encode_mask(_full(crop, x0, y0, (height, width)))


@pytest.mark.parametrize(
    ("size", "window"),
    [
        ((7, 5), (0, 0, 7, 5)),  # the whole image, all ones: one run of ones, no trailing zeros
        ((7, 5), (0, 2, 7, 3)),  # full-height columns: runs continue across column boundaries
        ((7, 5), (3, 4, 4, 1)),  # touches the bottom-right corner
        ((1, 1), (0, 0, 1, 1)),
        ((6, 9), (2, 3, 0, 4)),  # empty window
    ],
)
def test_encode_crop_edge_cases(size: tuple[int, int], window: tuple[int, int, int, int]) -> None:
    y0, x0, h, w = window
    for crop in (np.ones((h, w), bool), np.zeros((h, w), bool), np.indices((h, w)).sum(0) % 2 == 0):
        assert encode_crop(crop, x0, y0, size) == encode_mask(_full(crop, x0, y0, size))


def test_encode_crop_rejects_windows_outside_the_image() -> None:
    with pytest.raises(ValueError, match="outside"):
        encode_crop(np.ones((3, 3), bool), 8, 0, (10, 10))


def test_postprocess_rles_equal_dense_encoding_for_many_cells() -> None:
    """500 cells in a 700 x 900 image, many boxes on its border (clipped to it, as every runner returns them),
    so the pasted window (the box grown by (M + 2) / M) reaches outside: every RLE equals the dense mask's."""
    rng = np.random.default_rng(1)
    n, size = 500, (700, 900)
    xy = rng.uniform(-20, [900, 700], size=(n, 2))
    wh = rng.uniform(3, 60, size=(n, 2))
    boxes = np.clip(np.concatenate([xy, xy + wh], axis=1), 0, [900, 700, 900, 700])
    assert (boxes[:, :2] == 0).any() and (boxes[:, 2] == 900).any() and (boxes[:, 3] == 700).any()
    det = Detections(
        boxes=boxes.astype(np.float32),
        labels=rng.integers(1, 5, n).astype(np.int64),
        scores=np.sort(rng.random(n).astype(np.float32))[::-1].copy(),
        mask_probs=rng.random((n, 28, 28)).astype(np.float32),
        image_size=size,
    )
    inst = postprocess(det, PostprocessConfig())
    assert len(inst) == n
    for i in rng.choice(n, 60, replace=False):
        crop, x0, y0 = paste_mask(det.mask_probs[i], det.boxes[i], size)
        assert inst.rles[i] == encode_mask(_full(crop, x0, y0, size))
