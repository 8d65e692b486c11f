"""COCO run-length encoding (RLE) helpers over pycocotools.

RLEs are pycocotools' *compressed* form with ``counts`` decoded to ``str`` (the competition format):
``{"size": [H, W], "counts": "<str>"}``. Masks are column-major (Fortran order) inside, as in COCO.

:func:`encode_crop` encodes a mask known only inside a window ``[y0:y0+h, x0:x0+w]`` of an ``H x W`` image
without materialising the full image, so encoding cost scales with the box, not the image: this is what
keeps post-processing of hundreds of cells in a 2500 x 1900 image cheap.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

RLE = dict[str, Any]


def _to_str_counts(rle: dict[str, Any]) -> RLE:
    counts = rle["counts"]
    return {
        "size": [int(rle["size"][0]), int(rle["size"][1])],
        "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
    }


def _to_bytes_counts(rle: RLE) -> dict[str, Any]:
    counts = rle["counts"]
    return {
        "size": list(rle["size"]),
        "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
    }


def encode_mask(mask: np.ndarray) -> RLE:
    """Encode a binary mask (bool or 0/1, ``H x W``) as a compressed RLE with ``str`` counts."""
    if mask.ndim != 2:
        raise ValueError(f"encode_mask expects an H x W mask, got shape {mask.shape}")
    return _to_str_counts(mask_utils.encode(np.asfortranarray(mask.astype(np.uint8))))


def encode_crop(crop: np.ndarray, x0: int, y0: int, image_size: tuple[int, int]) -> RLE:
    """Encode a binary mask given as a window of the image.

    Args:
        crop: bool ``[h, w]``, the mask inside the window whose top-left pixel is ``(y0, x0)``; the
            window must lie inside the image (clip it first).
        x0, y0: the window's top-left corner in image pixels (``x0 >= 0``, ``y0 >= 0``).
        image_size: ``(H, W)`` of the full image.

    Returns:
        The same compressed RLE that :func:`encode_mask` gives for the full ``H x W`` mask. Cost is
        ``O(h * w)`` plus the number of runs, independent of the image size.
    """
    height, width = image_size
    h, w = crop.shape
    if x0 < 0 or y0 < 0 or x0 + w > width or y0 + h > height:
        raise ValueError(f"window x0={x0} y0={y0} w={w} h={h} lies outside the {height}x{width} image")
    total = height * width
    if h == 0 or w == 0 or not crop.any():
        counts = [total]
    else:
        # Each window column padded with a zero above and below, flattened column-major: every change between
        # neighbours is a run boundary (the zero pads keep runs from joining across columns); position p in
        # the padded column is window row p - 1, i.e. full-image index (x0 + col) * H + (y0 + p - 1).
        padded = np.zeros((w, h + 2), np.bool_)
        padded[:, 1:-1] = crop.T
        flat = padded.ravel()
        col, pos = np.divmod(np.flatnonzero(flat[1:] != flat[:-1]) + 1, h + 2)
        bounds = (col + x0) * height + (pos - 1 + y0)  # start, end, start, end, ...
        if h == height:  # a run ending at the bottom of a column and one starting atop the next are one run
            touching = np.flatnonzero(bounds[1:-1:2] == bounds[2::2])
            if touching.size:
                bounds = np.delete(bounds, np.concatenate((2 * touching + 1, 2 * touching + 2)))
        edges = [np.zeros(1, np.int64), bounds] + (
            [np.full(1, total, np.int64)] if bounds[-1] != total else []
        )
        counts = np.diff(np.concatenate(edges)).tolist()
    return _to_str_counts(mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width))


def decode_rle(rle: RLE) -> np.ndarray:
    """Decode one RLE to a bool ``H x W`` mask."""
    return mask_utils.decode(_to_bytes_counts(rle)).astype(bool)


def decode_rles(rles: list[RLE], image_size: tuple[int, int]) -> np.ndarray:
    """Decode RLEs to bool ``[N, H, W]`` (``N`` may be 0)."""
    if not rles:
        return np.zeros((0, *image_size), dtype=bool)
    return np.ascontiguousarray(
        mask_utils.decode([_to_bytes_counts(r) for r in rles]).transpose(2, 0, 1)
    ).astype(bool)


def rle_area(rle: RLE) -> int:
    """Number of foreground pixels."""
    return int(mask_utils.area(_to_bytes_counts(rle)))


def rle_iou(a: list[RLE], b: list[RLE]) -> np.ndarray:
    """Mask IoU matrix float64 ``[len(a), len(b)]`` (non-crowd)."""
    if not a or not b:
        return np.zeros((len(a), len(b)), dtype=np.float64)
    return np.asarray(
        mask_utils.iou([_to_bytes_counts(r) for r in a], [_to_bytes_counts(r) for r in b], [0] * len(b)),
        dtype=np.float64,
    ).reshape(len(a), len(b))
