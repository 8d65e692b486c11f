"""The one post-processing path for every runner: score filter, detection cap, mask pasting, RLE.

Each runner returns :class:`~cellseg_deploy.structures.Detections` (mask probabilities at the mask head's
resolution, boxes in original-image pixels); :func:`postprocess` turns them into
:class:`~cellseg_deploy.structures.Instances` (RLE masks at the original resolution). Because every backend
goes through this same function, a metric difference between backends comes from the model, never from two
copies of this step.

Mask pasting follows torchvision's ``paste_masks_in_image`` geometry: the ``M x M`` probabilities are padded
by one pixel, the box is scaled by ``(M + 2) / M`` about its centre and truncated to integers, the padded mask
is resized bilinearly (half-pixel centres) to the box's size, clipped to the image, and thresholded. Each mask
is pasted only inside its own box window and encoded from that window (:func:`~cellseg_deploy.data.rle.encode_crop`),
so time and memory grow with the number and size of cells, not with the image area times the cell count.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from cellseg_deploy import CLASS_NAMES
from cellseg_deploy.data.rle import encode_crop
from cellseg_deploy.errors import ConfigError, InvalidModelOutput
from cellseg_deploy.structures import Detections, Instances


@dataclass(frozen=True)
class PostprocessConfig:
    """Settings of :func:`postprocess`.

    Attributes:
        score_thresh: keep detections with ``score >= score_thresh``.
        mask_thresh: a pixel belongs to the mask when its pasted probability is ``> mask_thresh``.
        max_dets: keep at most this many detections (highest scores first); ``None`` keeps all.
    """

    score_thresh: float = 0.0
    mask_thresh: float = 0.5
    max_dets: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.score_thresh <= 1.0:
            raise ConfigError(f"score threshold must lie in [0, 1], got {self.score_thresh}")
        if not 0.0 <= self.mask_thresh < 1.0:
            raise ConfigError(f"mask threshold must lie in [0, 1), got {self.mask_thresh}")
        if self.max_dets is not None and self.max_dets < 1:
            raise ConfigError(f"max detections must be at least 1, got {self.max_dets}")


BOX_MARGIN_PX = 4.0
"""How far (pixels) a box may reach outside the image and still be taken as a rounding artefact (clipped).

torchvision clips boxes to the image before returning them, so a faithful runner's boxes lie inside it; a
half-precision graph may round a coordinate at the border by up to a few pixels (fp16 steps are 2 px beyond
2048). Anything further out is a broken model, not rounding."""

SCORE_EPS = 1e-3
"""Scores may exceed [0, 1] by this much (half-precision rounding of a sigmoid/softmax) and are clipped."""


def validate_detections(det: Detections, num_classes: int = len(CLASS_NAMES)) -> Detections:
    """Check a runner's raw output against the contract and return it with boxes and scores clipped.

    Checked, in this order: finite boxes; ``x1 <= x2`` and ``y1 <= y2``; boxes within
    :data:`BOX_MARGIN_PX` of the image (then clipped to ``[0, W] x [0, H]``); finite scores in ``[0, 1]``
    (within :data:`SCORE_EPS`, then clipped); labels in ``1..num_classes``; finite mask probabilities.
    The clipped arrays are new (the runner's own buffers are never modified).

    Raises:
        InvalidModelOutput: the first rule broken, with how many rows break it and the first such row.
    """
    n = len(det)
    if n == 0:
        return det
    height, width = det.image_size
    boxes = det.boxes.astype(np.float32, copy=False)
    scores = det.scores.astype(np.float32, copy=False)

    def fail(rows: Any, what: str, show: np.ndarray) -> None:
        bad = np.flatnonzero(rows)
        if len(bad):
            first = int(bad[0])
            value = np.array2string(np.asarray(show[first]), precision=2, separator=", ")
            raise InvalidModelOutput(
                f"{len(bad)} of {n} detections {what} (first: detection {first} = {value}); "
                "the model file is broken or not a cellseg-deploy export"
            )

    fail(~np.isfinite(boxes).all(axis=1), "have non-finite boxes", boxes)
    fail(
        (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1]),
        "have inverted boxes (x2 < x1 or y2 < y1)",
        boxes,
    )
    limit = np.array([width, height, width, height], np.float32)
    outside = (boxes < -BOX_MARGIN_PX) | (boxes > limit + BOX_MARGIN_PX)
    fail(outside.any(axis=1), f"have boxes outside the {width}x{height} image", boxes)
    fail(~np.isfinite(scores), "have non-finite scores", scores)
    fail((scores < -SCORE_EPS) | (scores > 1 + SCORE_EPS), "have scores outside [0, 1]", scores)
    labels = det.labels
    fail((labels < 1) | (labels > num_classes), f"have labels outside 1..{num_classes}", labels)
    fail(
        ~np.isfinite(det.mask_probs.reshape(n, -1)).all(axis=1),
        "have non-finite mask probabilities",
        np.zeros(n),
    )
    clipped = np.clip(boxes, 0.0, limit)
    clipped_scores = np.clip(scores, 0.0, 1.0)
    if np.array_equal(clipped, boxes) and np.array_equal(clipped_scores, scores):
        return det
    return dataclasses.replace(det, boxes=clipped, scores=clipped_scores)


def select_detections(det: Detections, config: PostprocessConfig) -> np.ndarray:
    """Indices (int64) of the detections kept by the score threshold and the cap, best score first."""
    order = np.argsort(-det.scores, kind="stable")
    order = order[det.scores[order] >= config.score_thresh]
    if config.max_dets is not None:
        order = order[: config.max_dets]
    return order


def paste_mask(
    probs: np.ndarray, box: np.ndarray, image_size: tuple[int, int], mask_thresh: float = 0.5
) -> tuple[np.ndarray, int, int]:
    """Paste one mask into the image, returning only its window.

    Args:
        probs: float32 ``[M, M]`` mask probabilities relative to ``box``.
        box: float ``[4]`` ``x1, y1, x2, y2`` in image pixels.
        image_size: ``(H, W)``.
        mask_thresh: probability threshold.

    Returns:
        ``(crop, x0, y0)``: bool ``[h, w]`` mask inside the image window whose top-left pixel is
        ``(y0, x0)``; the window lies inside the image (it may be empty, ``h == 0`` or ``w == 0``).
    """
    height, width = image_size
    m = probs.shape[-1]
    scale = (m + 2.0) / m
    padded = np.zeros((m + 2, m + 2), np.float32)
    padded[1:-1, 1:-1] = probs
    cx, cy = (box[0] + box[2]) * 0.5, (box[1] + box[3]) * 0.5
    hw, hh = (box[2] - box[0]) * 0.5 * scale, (box[3] - box[1]) * 0.5 * scale
    bx0, by0, bx1, by1 = (
        int(v) for v in np.trunc(np.array([cx - hw, cy - hh, cx + hw, cy + hh], np.float32))
    )
    w = max(bx1 - bx0 + 1, 1)
    h = max(by1 - by0 + 1, 1)
    resized = cv2.resize(padded, (w, h), interpolation=cv2.INTER_LINEAR)
    x0, x1 = max(bx0, 0), min(bx1 + 1, width)
    y0, y1 = max(by0, 0), min(by1 + 1, height)
    if x1 <= x0 or y1 <= y0:
        return np.zeros((0, 0), bool), min(max(x0, 0), width), min(max(y0, 0), height)
    crop = resized[y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0] > mask_thresh
    return crop, x0, y0


def postprocess(det: Detections, config: PostprocessConfig | None = None) -> Instances:
    """Raw detections -> instances with RLE masks at the original resolution.

    The raw output is validated first (:func:`validate_detections`): a broken model raises
    :class:`~cellseg_deploy.errors.InvalidModelOutput` before anything uses its numbers. The kept rows' mask
    probabilities (float32 ``[N, M, M]``, before pasting) travel along as :attr:`Instances.mask_probs`, for
    parity. Adds ``"paste"`` and ``"rle"`` (seconds) to the runner's ``det.timings``.
    """
    config = config or PostprocessConfig()
    det = validate_detections(det)
    keep = select_detections(det, config)
    boxes = det.boxes[keep].astype(np.float32, copy=False)
    probs = det.mask_probs[keep].astype(np.float32, copy=False)  # a copy of the kept rows only
    paste_s = rle_s = 0.0
    rles = []
    for i in range(len(keep)):
        t0 = time.perf_counter()
        crop, x0, y0 = paste_mask(probs[i], boxes[i], det.image_size, config.mask_thresh)
        t1 = time.perf_counter()
        rles.append(encode_crop(crop, x0, y0, det.image_size))
        t2 = time.perf_counter()
        paste_s += t1 - t0
        rle_s += t2 - t1
    det.timings["paste"] = paste_s
    det.timings["rle"] = rle_s
    return Instances(
        boxes=boxes,
        labels=det.labels[keep].astype(np.int64, copy=False),
        scores=det.scores[keep].astype(np.float32, copy=False),
        rles=rles,
        image_size=det.image_size,
        mask_probs=probs,
    )
