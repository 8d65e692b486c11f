"""COCO evaluation: the project's numbers against pycocotools' own COCOeval, caps, absent classes."""

from __future__ import annotations

import contextlib
import copy
import io
import tracemalloc

import numpy as np
import pytest
from eval_synth import gt_dict, perturb, random_instances
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cellseg_deploy.errors import ConfigError, DataError
from cellseg_deploy.evaluation import (
    evaluate,
    gt_from_instances,
    instances_to_results,
    predictions_to_results,
)
from cellseg_deploy.evaluation.coco_eval import cap_max_dets
from cellseg_deploy.structures import Instances


@pytest.fixture(scope="module")
def synthetic() -> tuple[dict, list[dict]]:
    """Ground truth for 6 images (various sizes, 3-12 objects) and perturbed predictions."""
    rng = np.random.default_rng(0)
    sizes = [(40, 56), (64, 64), (33, 35), (80, 48), (50, 90), (64, 40)]
    gt_inst = {i + 1: random_instances(rng, s, int(rng.integers(3, 13))) for i, s in enumerate(sizes)}
    preds = {i: perturb(rng, inst) for i, inst in gt_inst.items()}
    return gt_dict(gt_inst), predictions_to_results(preds)


def direct_cocoeval(
    gt: dict, results: list[dict], iou_type: str, cat_ids: list[int] | None = None
) -> np.ndarray:
    """The textbook pycocotools run (loadRes, evaluate, accumulate, summarize) on copies of the inputs."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(results))
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        if cat_ids is not None:
            ev.params.catIds = cat_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats)


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_equals_cocoeval_bit_for_bit_at_default_cap(
    synthetic: tuple[dict, list[dict]], iou_type: str
) -> None:
    gt, results = synthetic
    ours = evaluate(gt, results, iou_types=(iou_type,)).metrics[iou_type]
    stats = direct_cocoeval(gt, results, iou_type)
    assert 0.05 < stats[1] < 0.99, "the perturbed predictions should score neither 0 nor 1"
    assert (ours["AP"], ours["AP50"], ours["AP75"]) == (stats[0], stats[1], stats[2])
    # Per-class AP50: COCOeval restricted to one category gives the class's AP50 as stats[1].
    for k, name in enumerate(["class1", "class2", "class3", "class4"], start=1):
        assert ours["per_class_AP50"][name] == direct_cocoeval(gt, results, iou_type, cat_ids=[k])[1]
    assert ours["num_detections"] == len(results)
    assert ours["max_dets"] == 100


def test_inputs_are_not_modified(synthetic: tuple[dict, list[dict]]) -> None:
    gt, results = synthetic
    gt_before, results_before = copy.deepcopy(gt), copy.deepcopy(results)
    evaluate(gt, results)
    assert gt == gt_before
    assert results == results_before


def test_ground_truth_as_predictions_scores_one() -> None:
    rng = np.random.default_rng(1)
    images = {1: random_instances(rng, (60, 70), 9), 7: random_instances(rng, (33, 35), 4)}
    gt = gt_from_instances(images, score_thresh=0.5)
    res = evaluate(gt, predictions_to_results(images))
    for iou_type in ("segm", "bbox"):
        m = res.metrics[iou_type]
        assert m["AP"] == 1.0 and m["AP50"] == 1.0 and m["AP75"] == 1.0, (iou_type, m)
        present = {f"class{k}" for k in np.unique(np.concatenate([i.labels for i in images.values()]))}
        for name, ap50 in m["per_class_AP50"].items():
            assert ap50 == (1.0 if name in present else None)


def test_absent_class_is_none_not_zero() -> None:
    rng = np.random.default_rng(2)
    images = {1: random_instances(rng, (48, 48), 6, labels=(1, 2))}
    gt = gt_from_instances(images, score_thresh=0.0)
    res = evaluate(gt, predictions_to_results(images))
    per_class = res.metrics["segm"]["per_class_AP50"]
    assert per_class["class3"] is None and per_class["class4"] is None
    assert res.num_gt["class3"] == 0
    table = res.table()
    assert "n/a" in table and "no ground-truth instance" in table
    assert res.to_dict()["metrics"]["segm"]["per_class_AP50"]["class4"] is None


def test_no_detections_scores_zero_without_crashing(synthetic: tuple[dict, list[dict]]) -> None:
    gt, _ = synthetic
    res = evaluate(gt, [])
    for iou_type in ("segm", "bbox"):
        m = res.metrics[iou_type]
        assert m["AP"] == 0.0 and m["AP50"] == 0.0 and m["num_detections"] == 0
        assert m["num_detections_evaluated"] == 0


def test_cap_above_100_includes_more_detections() -> None:
    """120 perfect detections of 120 objects in one image: the cap of 100 per image and class cuts recall."""
    rng = np.random.default_rng(3)
    images = {1: random_instances(rng, (300, 300), 120, labels=(1,))}
    images[1].scores[:] = np.linspace(1.0, 0.5, 120, dtype=np.float32)
    gt = gt_from_instances(images, score_thresh=0.0)
    results = predictions_to_results(images)
    capped = evaluate(gt, results, iou_types=("bbox",))
    wide = evaluate(gt, results, max_dets=200, iou_types=("bbox",))
    assert capped.metrics["bbox"]["num_detections_evaluated"] == 100
    assert wide.metrics["bbox"]["num_detections_evaluated"] == 120
    assert capped.metrics["bbox"]["AP50"] < 0.9
    assert wide.metrics["bbox"]["AP50"] == 1.0
    assert wide.max_dets == 200 and "maxDets=200" in wide.table()
    # The default-cap number is pycocotools' own.
    assert capped.metrics["bbox"]["AP50"] == direct_cocoeval(gt, results, "bbox")[1]


def test_small_cap_is_last_max_dets() -> None:
    assert cap_max_dets(100) == [1, 10, 100]
    assert cap_max_dets(5) == [1, 5]
    assert cap_max_dets(1) == [1]
    assert cap_max_dets(300) == [1, 10, 300]
    with pytest.raises(ConfigError):
        evaluate({"images": [], "annotations": [], "categories": []}, [], max_dets=0)


def test_results_for_unknown_image_is_a_clear_error(synthetic: tuple[dict, list[dict]]) -> None:
    gt, results = synthetic
    bad = [{**results[0], "image_id": 999}]
    with pytest.raises(DataError, match="not in the ground truth"):
        evaluate(gt, bad)


def test_instances_to_results_format() -> None:
    rng = np.random.default_rng(4)
    inst = random_instances(rng, (33, 35), 3)
    inst.boxes[0] = [1.5, 2.25, 11.5, 20.25]
    inst.scores[:] = [0.9, 0.5, 0.25]
    res = instances_to_results(5, inst)
    assert [list(r) for r in res] == [["image_id", "bbox", "score", "category_id", "segmentation"]] * 3
    r = res[0]
    assert r["image_id"] == 5 and type(r["image_id"]) is int and type(r["category_id"]) is int
    assert r["bbox"] == [1.5, 2.25, 10.0, 18.0]  # detector box, x1 y1 x2 y2 -> x y w h
    assert all(type(v) is float for v in r["bbox"]) and type(r["score"]) is float
    assert r["segmentation"]["size"] == [33, 35] and isinstance(r["segmentation"]["counts"], str)
    assert instances_to_results(1, inst.select(np.zeros(3, bool))) == []


def test_gt_from_instances_threshold_and_ids() -> None:
    rng = np.random.default_rng(5)
    inst = random_instances(rng, (40, 40), 4)
    inst.scores[:] = [0.9, 0.2, 0.6, 0.1]
    empty = Instances(
        np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32), [], (20, 30)
    )
    gt = gt_from_instances({3: inst, 4: empty}, score_thresh=0.5)
    assert [a["id"] for a in gt["annotations"]] == [1, 2]
    assert [im["id"] for im in gt["images"]] == [3, 4] and gt["images"][1]["height"] == 20
    assert all(a["iscrowd"] == 0 and a["area"] > 0 for a in gt["annotations"])
    with pytest.raises(ConfigError):
        gt_from_instances({3: inst}, score_thresh=1.5)


def test_large_dense_image_evaluates_in_bounded_memory() -> None:
    """2500 x 1900 with 100 cells: traced memory stays far below one N x H x W mask stack (475 MB)."""
    from cellseg_deploy.data.rle import encode_crop

    rng = np.random.default_rng(6)
    h, w, n = 1900, 2500, 100
    rles, boxes = [], []
    for _ in range(n):
        r = rng.uniform(5, 12)
        cy, cx = rng.uniform(r, h - r - 1), rng.uniform(r, w - r - 1)
        y0, x0, s = int(cy - r), int(cx - r), int(2 * r) + 2
        yy, xx = np.mgrid[:s, :s]
        rles.append(encode_crop(((yy + y0 - cy) ** 2 + (xx + x0 - cx) ** 2) <= r * r, x0, y0, (h, w)))
        boxes.append([x0, y0, x0 + s, y0 + s])
    inst = Instances(np.array(boxes, np.float32), rng.integers(1, 5, n), np.ones(n, np.float32), rles, (h, w))
    tracemalloc.start()
    try:
        res = evaluate(
            gt_from_instances({1: inst}, 0.0), predictions_to_results({1: inst}), iou_types=("segm",)
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert res.metrics["segm"]["AP50"] == 1.0
    assert peak < h * w * 4, f"peak {peak / 1e6:.0f} MB"
