"""Small synthetic ground truth and predictions for the evaluation tests (numpy masks -> RLEs)."""

from __future__ import annotations

from typing import Any

import numpy as np

from cellseg_deploy import CLASS_NAMES
from cellseg_deploy.data.rle import encode_mask, rle_area
from cellseg_deploy.evaluation.coco_eval import coco_categories
from cellseg_deploy.structures import Instances


def ellipse_mask(size: tuple[int, int], cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    """bool ``[H, W]`` ellipse."""
    yy, xx = np.mgrid[: size[0], : size[1]]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def random_instances(
    rng: np.random.Generator, size: tuple[int, int], n: int, labels: tuple[int, ...] = (1, 2, 3, 4)
) -> Instances:
    """``n`` random ellipses with boxes = their tight boxes (x2/y2 exclusive), random labels, score 1."""
    h, w = size
    boxes, rles = [], []
    for _ in range(n):
        ry, rx = rng.uniform(2.5, max(3.0, h / 6)), rng.uniform(2.5, max(3.0, w / 6))
        cy, cx = rng.uniform(0, h - 1), rng.uniform(0, w - 1)
        m = ellipse_mask(size, cy, cx, ry, rx)
        if not m.any():
            m[int(cy), int(cx)] = True
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        rles.append(encode_mask(m))
    return Instances(
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        labels=rng.choice(np.asarray(labels, np.int64), size=n),
        scores=np.ones(n, np.float32),
        rles=rles,
        image_size=size,
    )


def gt_dict(images: dict[int, Instances]) -> dict[str, Any]:
    """A COCO GT dict written by hand (independent of gt_from_instances): bbox = mask tight box."""
    from pycocotools import mask as mask_utils

    anns = []
    for image_id, inst in images.items():
        for label, rle in zip(inst.labels, inst.rles, strict=True):
            b = mask_utils.toBbox({"size": rle["size"], "counts": rle["counts"].encode()})
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": int(label),
                    "iscrowd": 0,
                    "segmentation": dict(rle),
                    "area": float(rle_area(rle)),
                    "bbox": [float(v) for v in b],
                }
            )
    return {
        "images": [
            {"id": i, "height": inst.image_size[0], "width": inst.image_size[1], "file_name": f"{i}.tif"}
            for i, inst in images.items()
        ],
        "annotations": anns,
        "categories": coco_categories(CLASS_NAMES),
    }


def perturb(rng: np.random.Generator, inst: Instances) -> Instances:
    """Predictions from ground truth: shifted masks/boxes, random scores, some dropped, some labels wrong,
    plus false positives."""
    h, w = inst.image_size
    keep = rng.random(len(inst)) > 0.2
    kept = inst.select(keep)
    masks = kept.masks()
    boxes, rles = [], []
    for m, b in zip(masks, kept.boxes, strict=True):
        dy, dx = rng.integers(-2, 3, size=2)
        m2 = np.roll(np.roll(m, dy, axis=0), dx, axis=1)
        rles.append(encode_mask(m2))
        boxes.append(b + np.array([dx, dy, dx, dy], np.float32) + rng.normal(0, 0.5, 4).astype(np.float32))
    labels = kept.labels.copy()
    flip = rng.random(len(labels)) < 0.1
    labels[flip] = rng.integers(1, 5, size=int(flip.sum()))
    fp = random_instances(rng, (h, w), int(rng.integers(1, 4)))
    return Instances(
        boxes=np.concatenate([np.asarray(boxes, np.float32).reshape(-1, 4), fp.boxes]),
        labels=np.concatenate([labels, fp.labels]),
        scores=rng.random(len(boxes) + len(fp)).astype(np.float32),
        rles=rles + fp.rles,
        image_size=(h, w),
    )
