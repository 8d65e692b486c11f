"""COCO evaluation of instance predictions: result dicts, ground truth from instances, and pycocotools' COCOeval.

The project only *builds* the ground truth and the result list; the scoring itself is pycocotools'
``COCO`` / ``COCOeval`` (``evaluate`` then ``accumulate``). What this module adds around it:

- **The detection cap is a setting.** COCOeval keeps at most ``params.maxDets[-1]`` detections per image
  *and category* (highest scores first). Its ``summarize()`` only works for the default ``[1, 10, 100]``:
  ``stats[0]`` (AP) looks up a hard-coded ``maxDets=100`` and ``stats[1:3]`` read ``maxDets[2]``, so with
  another cap AP silently becomes ``-1``. :func:`evaluate` sets ``maxDets`` to ``[1, 10, cap]`` (the
  entries below ``cap`` only) and reads AP, AP50 and AP75 from ``eval["precision"]`` at the cap's index,
  with exactly the arithmetic of ``summarize()`` (mean over the entries that are not ``-1``), so for the
  default cap the numbers equal ``COCOeval.stats[0:3]`` bit for bit.
- **Per-class AP50** is ``precision[IoU=0.50, :, k, area=all, cap]``, averaged over recall thresholds;
  a class with no ground truth instance has only ``-1`` entries there and is reported as ``None``
  (JSON ``null``, "n/a" in the table), never as 0.
- **No detections at all** do not crash (``COCO.loadRes`` fails on an empty list): the result set is
  built empty and every class with ground truth scores 0.
- Everything stays in RLE form; no ``N x H x W`` mask array is ever built, so 2500 x 1900 images with
  hundreds of cells evaluate in bounded memory.

Boxes in result dicts: ``bbox`` is the **detector's box** (the runner's ``x1, y1, x2, y2`` converted to COCO
``[x, y, w, h]``), as in torchvision's reference evaluator, not the mask's tight box. bbox AP therefore scores
the box head; segm AP (the competition metric) scores the masks and does not read ``bbox`` at all.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cellseg_deploy import CLASS_NAMES
from cellseg_deploy.data.coco import categories
from cellseg_deploy.data.rle import rle_area
from cellseg_deploy.errors import ConfigError, DataError
from cellseg_deploy.structures import Instances

IOU_TYPES: tuple[str, ...] = ("segm", "bbox")
"""IoU types :func:`evaluate` knows: mask IoU (the competition metric) and box IoU."""

DEFAULT_MAX_DETS = 100
"""COCOeval's default cap on detections per image and category."""

_SUMMARY_KEYS = ("AP", "AP50", "AP75")


# ----------------------------------------------------------------------------------------------------------
# Instances -> COCO dicts
# ----------------------------------------------------------------------------------------------------------
def xyxy_to_xywh(box: Sequence[float] | np.ndarray) -> list[float]:
    """``[x1, y1, x2, y2]`` -> COCO ``[x, y, w, h]`` as Python floats (same pixel units)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1, y1, x2 - x1, y2 - y1]


def instances_to_results(image_id: int, inst: Instances) -> list[dict[str, Any]]:
    """COCO result dicts (the competition's ``test-results.json`` entries) for one image.

    Args:
        image_id: the image's id in the ground truth (``test_image_name_to_ids.json`` for the test set).
        inst: post-processed instances; masks as RLEs at the original ``H x W``.

    Instances whose mask is empty (no pixel above the mask threshold) are left out: they can match nothing in
    segm AP and are not cells; :func:`count_empty_masks` says how many there were.

    Returns:
        One dict per non-empty instance, keys in the competition example's order: ``image_id`` (int), ``bbox``
        (the detector's box as ``[x, y, w, h]`` floats, pixels), ``score`` (float), ``category_id`` (int
        label 1..4), ``segmentation`` (``{"size": [H, W], "counts": str}``, compressed RLE). Plain Python
        types only, so the list is JSON-serialisable as is.
    """
    image_id = int(image_id)
    results = []
    for box, label, score, rle in zip(inst.boxes, inst.labels, inst.scores, inst.rles, strict=True):
        if rle_area(rle) == 0:
            continue
        results.append(
            {
                "image_id": image_id,
                "bbox": xyxy_to_xywh(box),
                "score": float(score),
                "category_id": int(label),
                "segmentation": {
                    "size": [int(rle["size"][0]), int(rle["size"][1])],
                    "counts": _str_counts(rle),
                },
            }
        )
    return results


def count_empty_masks(inst: Instances) -> int:
    """How many of ``inst``'s masks are empty (left out of results by :func:`instances_to_results`)."""
    return sum(1 for rle in inst.rles if rle_area(rle) == 0)


def predictions_to_results(predictions: Mapping[int, Instances]) -> list[dict[str, Any]]:
    """:func:`instances_to_results` over ``{image_id: Instances}``, images in ascending id order."""
    results: list[dict[str, Any]] = []
    for image_id in sorted(predictions):
        results.extend(instances_to_results(image_id, predictions[image_id]))
    return results


def coco_categories(class_names: Sequence[str] = CLASS_NAMES) -> list[dict[str, Any]]:
    """COCO ``categories``: id ``k`` (1-based label) named ``class_names[k - 1]``; the one list is
    :func:`cellseg_deploy.data.coco.categories`."""
    return categories(class_names)


def gt_from_instances(
    images: Mapping[int, Instances], score_thresh: float, *, class_names: Sequence[str] = CLASS_NAMES
) -> dict[str, Any]:
    """A COCO ground-truth dict made of predicted instances (e.g. a reference backend's output).

    For scoring one prediction set against another. Not a fidelity measure of a backend: COCOeval of a set
    against itself stays below 1.0 when it holds overlapping same-class instances or empty masks (parity
    uses the agreement of its own matching instead). Instances with
    ``score >= score_thresh`` become ground-truth objects (``iscrowd`` 0, ``area`` the mask's pixel
    count, ``bbox`` the detector's box as ``[x, y, w, h]``); annotation ids run from 1 (COCOeval treats
    id 0 as "no match"). Every image in ``images`` is listed, including images with no instance left.

    Args:
        images: ``{image_id: Instances}``.
        score_thresh: minimum score for an instance to count as ground truth, in [0, 1].
        class_names: category names, label ``k`` is ``class_names[k - 1]``.
    """
    if not 0.0 <= score_thresh <= 1.0:
        raise ConfigError(f"score threshold must lie in [0, 1], got {score_thresh}")
    gt_images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id in sorted(images):
        inst = images[image_id]
        height, width = (int(v) for v in inst.image_size)
        gt_images.append(
            {"id": int(image_id), "height": height, "width": width, "file_name": f"{int(image_id)}"}
        )
        for box, label, score, rle in zip(inst.boxes, inst.labels, inst.scores, inst.rles, strict=True):
            if float(score) < score_thresh:
                continue
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": int(image_id),
                    "category_id": int(label),
                    "segmentation": {"size": [height, width], "counts": _str_counts(rle)},
                    "area": float(rle_area(rle)),
                    "bbox": xyxy_to_xywh(box),
                    "iscrowd": 0,
                }
            )
    return {"images": gt_images, "annotations": annotations, "categories": coco_categories(class_names)}


def _str_counts(rle: Mapping[str, Any]) -> str:
    counts = rle["counts"]
    if isinstance(counts, bytes):
        return counts.decode("ascii")
    if isinstance(counts, str):
        return counts
    raise ValueError(
        f"expected a compressed RLE (str or bytes counts), got counts of type {type(counts).__name__}"
    )


# ----------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------
@dataclass
class EvalResult:
    """COCO metrics of one set of predictions against one ground truth.

    Attributes:
        metrics: per IoU type (``"segm"``, ``"bbox"``) a dict with ``AP`` (IoU 0.50:0.95), ``AP50``,
            ``AP75`` (area "all", at the cap; ``None`` when the ground truth has no object at all),
            ``per_class_AP50`` ``{class name: AP50 or None}`` (``None``: the class has no ground truth
            instance), ``num_detections`` (all detections given), ``num_detections_evaluated`` (those
            left after the cap of ``max_dets`` per image and category) and ``max_dets``.
        max_dets: the cap COCOeval applied: at most this many detections per image **and category**,
            highest scores first.
        num_images: images in the ground truth.
        num_gt: ground-truth instances per class name.
        class_names: category names in id order.
        notes: things a reader must know to interpret the numbers (e.g. the model's own detection cap).
        info: free-form provenance (runner info, data root, split, thresholds), filled by callers.
    """

    metrics: dict[str, dict[str, Any]]
    max_dets: int
    num_images: int
    num_gt: dict[str, int]
    class_names: list[str]
    notes: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (absent values are ``None``)."""
        return {
            "max_dets": self.max_dets,
            "cap": f"at most {self.max_dets} detections per image and category (COCOeval maxDets)",
            "num_images": self.num_images,
            "num_gt": dict(self.num_gt),
            "class_names": list(self.class_names),
            "metrics": {
                k: {**v, "per_class_AP50": dict(v["per_class_AP50"])} for k, v in self.metrics.items()
            },
            "notes": list(self.notes),
            "info": dict(self.info),
        }

    def table(self) -> str:
        """A readable text report: AP, AP50, AP75 and detections per IoU type, then per-class AP50."""
        from cellseg_deploy.tables import format_metric, format_table

        iou_types = list(self.metrics)
        lines = [
            f"COCO evaluation: {self.num_images} images, {sum(self.num_gt.values())} ground-truth instances; "
            f"cap: at most {self.max_dets} detections per image and category (COCOeval maxDets={self.max_dets})",
            "",
        ]
        rows = [
            [
                t,
                *(format_metric(self.metrics[t][k]) for k in _SUMMARY_KEYS),
                self.metrics[t]["num_detections"],
                self.metrics[t]["num_detections_evaluated"],
            ]
            for t in iou_types
        ]
        lines.append(
            format_table(
                rows, ["iou", "AP", "AP50", "AP75", "detections", f"evaluated (cap {self.max_dets})"]
            )
        )
        lines.append("")
        class_rows = [
            [
                name,
                self.num_gt.get(name, 0),
                *(format_metric(self.metrics[t]["per_class_AP50"][name]) for t in iou_types),
            ]
            for name in self.class_names
        ]
        lines.append(format_table(class_rows, ["class", "gt", *(f"{t} AP50" for t in iou_types)]))
        if any(v is None for t in iou_types for v in self.metrics[t]["per_class_AP50"].values()):
            lines.append(
                "n/a: the class has no ground-truth instance in this set (excluded from AP, not scored 0)"
            )
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def evaluate(
    gt: dict[str, Any],
    results: list[dict[str, Any]],
    *,
    max_dets: int = DEFAULT_MAX_DETS,
    iou_types: tuple[str, ...] = IOU_TYPES,
) -> EvalResult:
    """Score ``results`` against ``gt`` with pycocotools' COCOeval.

    Args:
        gt: a COCO ground-truth dict (``images``, ``annotations`` with RLE or polygon ``segmentation``,
            ``area``, ``bbox`` ``[x, y, w, h]``, ``iscrowd``, ids >= 1; ``categories``). Not modified.
        results: COCO result dicts (:func:`instances_to_results`); may be empty. Not modified.
        max_dets: COCOeval's cap, detections kept per image **and category** (highest scores first).
        iou_types: any of ``"segm"``, ``"bbox"``.

    Returns:
        :class:`EvalResult`. For ``max_dets == 100`` AP, AP50 and AP75 equal ``COCOeval.stats[0:3]``
        exactly.

    Raises:
        ConfigError: ``max_dets < 1`` or an unknown IoU type.
        DataError: results name images that are not in the ground truth, or categories it lacks.
    """
    if max_dets < 1:
        raise ConfigError(f"max detections must be at least 1, got {max_dets}")
    unknown = [t for t in iou_types if t not in IOU_TYPES]
    if unknown or not iou_types:
        raise ConfigError(f"unknown IoU type(s) {unknown}; expected one or more of {list(IOU_TYPES)}")
    _check_results_match(gt, results)

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    categories = sorted(gt.get("categories", []), key=lambda c: int(c["id"]))
    class_names = [str(c["name"]) for c in categories]
    cat_ids = [int(c["id"]) for c in categories]
    num_gt = {name: 0 for name in class_names}
    name_of = dict(zip(cat_ids, class_names, strict=True))
    for ann in gt.get("annotations", []):
        cat = int(ann["category_id"])
        if cat not in name_of:
            raise DataError(
                f"ground-truth annotation {ann.get('id')!r} has category {cat}, which is not among the "
                f"ground truth's categories {cat_ids}"
            )
        if not ann.get("iscrowd", 0):
            num_gt[name_of[cat]] += 1

    metrics: dict[str, dict[str, Any]] = {}
    with _quiet():
        coco_gt = COCO()
        coco_gt.dataset = _copy_gt(gt)
        coco_gt.createIndex()
        for iou_type in iou_types:
            coco_dt = _load_results(coco_gt, results)
            ev = COCOeval(coco_gt, coco_dt, iouType=iou_type)
            ev.params.maxDets = cap_max_dets(max_dets)
            ev.evaluate()
            ev.accumulate()
            metrics[iou_type] = _metrics_from_eval(ev, max_dets, name_of)
            metrics[iou_type]["num_detections"] = len(results)
            metrics[iou_type]["num_detections_evaluated"] = _count_evaluated(ev)
    return EvalResult(
        metrics=metrics,
        max_dets=max_dets,
        num_images=len(gt.get("images", [])),
        num_gt=num_gt,
        class_names=class_names,
    )


def cap_max_dets(max_dets: int) -> list[int]:
    """COCOeval ``params.maxDets`` for a cap: ``[1, 10, cap]`` keeping only the entries below the cap.

    The cap must be the last (largest) entry: ``evaluate()`` applies ``maxDets[-1]`` per image and category.
    """
    return [m for m in (1, 10) if m < max_dets] + [max_dets]


def _metrics_from_eval(ev: Any, max_dets: int, name_of: Mapping[int, str]) -> dict[str, Any]:
    """AP, AP50, AP75 and per-class AP50 from ``ev.eval["precision"]`` ``[T, R, K, A, M]`` at the cap."""
    p = ev.params
    precision = ev.eval["precision"]
    m = list(p.maxDets).index(max_dets)
    a = list(p.areaRngLbl).index("all")

    def mean_valid(s: np.ndarray) -> float | None:
        # summarize()'s arithmetic: the mean over entries that are not -1 (-1: no ground truth).
        valid = s[s > -1]
        return None if valid.size == 0 else float(np.mean(valid))

    t50 = _iou_index(p.iouThrs, 0.5)
    t75 = _iou_index(p.iouThrs, 0.75)
    out: dict[str, Any] = {
        "AP": mean_valid(precision[:, :, :, [a], [m]]),
        "AP50": mean_valid(precision[t50][:, :, :, [a], [m]]),
        "AP75": mean_valid(precision[t75][:, :, :, [a], [m]]),
    }
    per_class: dict[str, float | None] = {}
    for k, cat_id in enumerate(p.catIds):
        per_class[name_of[int(cat_id)]] = mean_valid(precision[t50][:, :, [k], [a], [m]])
    out["per_class_AP50"] = per_class
    out["max_dets"] = max_dets
    return out


def _iou_index(iou_thrs: np.ndarray, iou: float) -> np.ndarray:
    """Index array of ``iou`` in COCOeval's IoU thresholds (as ``summarize()`` looks it up)."""
    idx = np.flatnonzero(np.isclose(iou_thrs, iou, rtol=0.0, atol=1e-9))
    if idx.size != 1:
        raise ConfigError(f"IoU threshold {iou} is not among COCOeval's thresholds {list(iou_thrs)}")
    return idx


def _count_evaluated(ev: Any) -> int:
    """Detections COCOeval actually scored: those left after its cap per image and category.

    ``ev.evalImgs`` is ordered category-major, then area range, then image; each entry holds the
    detection ids kept (``dtIds``, already cut to ``maxDets[-1]``).
    """
    n_img = len(ev.params.imgIds)
    a_all = list(ev.params.areaRngLbl).index("all")
    total = 0
    for k in range(len(ev.params.catIds)):
        start = (k * len(ev.params.areaRng) + a_all) * n_img
        total += sum(len(e["dtIds"]) for e in ev.evalImgs[start : start + n_img] if e is not None)
    return total


def _copy_gt(gt: dict[str, Any]) -> dict[str, Any]:
    """A copy COCOeval may annotate (it writes ``ignore`` / ``segmentation`` into annotations)."""
    out = dict(gt)
    out["images"] = [dict(im) for im in gt.get("images", [])]
    out["annotations"] = [dict(a) for a in gt.get("annotations", [])]
    out["categories"] = [dict(c) for c in gt.get("categories", [])]
    return out


def _load_results(coco_gt: Any, results: list[dict[str, Any]]) -> Any:
    """``coco_gt.loadRes`` on copies of the result dicts; an empty result set when there is none."""
    from pycocotools.coco import COCO

    if results:
        return coco_gt.loadRes([{**r, "segmentation": dict(r["segmentation"])} for r in results])
    empty = COCO()
    empty.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": [dict(c) for c in coco_gt.dataset["categories"]],
        "annotations": [],
    }
    empty.createIndex()
    return empty


def _check_results_match(gt: dict[str, Any], results: Iterable[dict[str, Any]]) -> None:
    """Raise :class:`DataError` when results name unknown images or categories (loadRes only asserts)."""
    image_ids = {int(im["id"]) for im in gt.get("images", [])}
    cat_ids = {int(c["id"]) for c in gt.get("categories", [])}
    bad_images: set[int] = set()
    bad_cats: set[int] = set()
    for r in results:
        if int(r["image_id"]) not in image_ids:
            bad_images.add(int(r["image_id"]))
        if int(r["category_id"]) not in cat_ids:
            bad_cats.add(int(r["category_id"]))
    if bad_images:
        shown = sorted(bad_images)[:5]
        raise DataError(
            f"results name {len(bad_images)} image id(s) that are not in the ground truth (e.g. {shown}); "
            f"the ground truth has {len(image_ids)} images: use the ids of its id map"
        )
    if bad_cats:
        raise DataError(
            f"results use category id(s) {sorted(bad_cats)} that the ground truth lacks; expected {sorted(cat_ids)}"
        )


@contextlib.contextmanager
def _quiet() -> Any:
    """Silence pycocotools' progress prints (they go to stdout, not to logging) for this block only."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield
