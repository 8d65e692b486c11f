"""Instance matching, counting at the score threshold, tolerance profiles and verdicts, on hand-made instances."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from cellseg_deploy.data.rle import encode_mask
from cellseg_deploy.errors import ConfigError
from cellseg_deploy.evaluation.parity import (
    PROFILES,
    ToleranceProfile,
    compare_instances,
    compare_runs,
    get_profile,
    parse_tolerances,
)
from cellseg_deploy.structures import Instances

H, W = 40, 60


def make(
    spans: list[tuple[int, int, int, int]], scores: list[float], labels: list[int] | None = None
) -> Instances:
    """Rectangles ``(x0, y0, x1, y1)`` (exclusive ends) as instances with the same detector boxes."""
    masks = []
    for x0, y0, x1, y1 in spans:
        m = np.zeros((H, W), bool)
        m[y0:y1, x0:x1] = True
        masks.append(m)
    n = len(spans)
    return Instances(
        boxes=np.array(spans, np.float32).reshape(n, 4),
        labels=np.array(labels or [1] * n, np.int64),
        scores=np.array(scores, np.float32),
        rles=[encode_mask(m) for m in masks],
        image_size=(H, W),
    )


CELLS = [(2, 2, 12, 12), (20, 5, 30, 15), (40, 20, 55, 35), (5, 25, 15, 38)]


def test_identical_instances_match_perfectly() -> None:
    ref = make(CELLS, [0.9, 0.8, 0.7, 0.6])
    p = compare_instances(ref, ref, score_thresh=0.5)
    assert (p.n_ref, p.matched, p.missed, p.extra, p.strong_matched) == (4, 4, 0, 0, 4)
    s = p.summary()
    assert s["max_box_diff"] == 0.0 and s["min_iou"] == 1.0 and s["max_score_diff"] == 0.0
    assert p.ap50_vs_ref == pytest.approx(1.0)


def test_score_crossing_the_threshold_is_a_score_difference_not_a_miss() -> None:
    ref = make(CELLS, [0.9, 0.51, 0.7, 0.2])
    cand = make(CELLS, [0.9, 0.49, 0.7, 0.52])  # cell 1 drops below 0.5, cell 3 rises above it
    p = compare_instances(ref, cand, score_thresh=0.5)
    assert (p.n_ref, p.n_cand) == (3, 3)
    assert (p.missed, p.extra) == (0, 0)
    assert p.matched == 4  # either side above the threshold
    assert p.summary()["max_score_diff"] == pytest.approx(0.32, abs=1e-6)


def test_missing_and_extra_and_class_change_are_counted() -> None:
    ref = make(CELLS, [0.9, 0.8, 0.7, 0.6], labels=[1, 1, 2, 3])
    cand = make([CELLS[0], CELLS[2], CELLS[3], (45, 0, 58, 10)], [0.9, 0.7, 0.6, 0.8], labels=[1, 4, 3, 1])
    p = compare_instances(ref, cand, score_thresh=0.5)
    # CELLS[1] is gone; CELLS[2] changed class 2 -> 4 (one miss + one extra); a new cell appeared.
    assert p.matched == 2
    assert p.missed == 2
    assert p.extra == 2
    assert p.class_changed == 1
    assert p.ap50_vs_ref is not None and p.ap50_vs_ref < 0.75


def test_assignment_is_optimal_not_greedy() -> None:
    # IoU(A, B') = 0.82 is the largest, but pairing A-A' (0.70) and B-B' (0.67) matches both cells;
    # a greedy matcher would take A-B' and leave B and A' unmatched (IoU(B, A') = 0.31).
    ref = make([(0, 0, 10, 10), (3, 0, 13, 10)], [0.9, 0.9])
    cand = make([(0, 0, 7, 10), (1, 0, 11, 10)], [0.9, 0.9])
    p = compare_instances(ref, cand, score_thresh=0.5)
    assert (p.matched, p.missed, p.extra) == (2, 0, 0)
    assert p.summary()["min_iou"] == pytest.approx(2 / 3, abs=1e-6)


def test_boxes_keep_detections_paired_when_masks_are_ambiguous() -> None:
    # Two touching cells; the candidate's masks both shrank to the shared middle, so by mask IoU alone the
    # diagonal and the crossed pairing tie (0.6 each), and the scores would favour the crossed one.
    ref = make([(0, 0, 20, 10), (8, 0, 28, 10)], [0.9, 0.6])
    cand = make([(8, 0, 20, 10), (8, 0, 20, 10)], [0.6, 0.9])
    cand.boxes[:] = ref.boxes  # the detector's boxes are unchanged: only the masks are wrong
    p = compare_instances(ref, cand, score_thresh=0.5, with_ap50=False)
    assert p.matched == 2 and p.summary()["max_box_diff"] == 0.0  # paired by detection, not crossed
    assert p.summary()["max_score_diff"] == pytest.approx(0.3) and p.summary()["mean_iou"] == pytest.approx(
        0.6
    )


def test_empty_masks_of_the_same_detection_match_by_box() -> None:
    # A detection whose pasted mask has no pixel above the threshold: mask IoU is undefined (0 in pycocotools).
    empty = encode_mask(np.zeros((H, W), bool))
    boxes = np.array([[2, 2, 12, 12], [30, 5, 40, 15]], np.float32)
    ref = Instances(boxes, np.array([1, 1]), np.array([0.9, 0.8], np.float32), [empty, empty], (H, W))
    cand = Instances(
        boxes[::-1].copy(), np.array([1, 1]), np.array([0.8, 0.9], np.float32), [empty, empty], (H, W)
    )
    p = compare_instances(ref, cand, score_thresh=0.5, with_ap50=False)
    assert (p.matched, p.missed, p.extra) == (2, 0, 0)
    assert (
        p.summary()["max_box_diff"] == 0.0 and p.summary()["max_score_diff"] == 0.0
    )  # paired by box, not by order


def test_empty_images() -> None:
    empty = make([], [])
    p = compare_instances(empty, empty, score_thresh=0.5)
    assert (p.n_ref, p.matched, p.missed, p.extra) == (0, 0, 0, 0)
    assert p.ap50_vs_ref is None
    p = compare_instances(empty, make(CELLS[:1], [0.9]), score_thresh=0.5)
    assert p.extra == 1


def test_verdict_names_what_differed() -> None:
    ref = {i: make(CELLS, [0.9, 0.8, 0.7, 0.6]) for i in (1, 2)}
    shifted = [(x0 + 2, y0, x1 + 2, y1) for x0, y0, x1, y1 in CELLS]
    cand = {1: ref[1], 2: make(shifted, [0.9, 0.8, 0.7, 0.6])}
    report = compare_runs(ref, cand, profile=PROFILES["fp32"], names={1: "a", 2: "b"})
    assert not report.passed
    text = "\n".join(report.failures)
    assert "max_box_diff = 2.0000" in text and "worst image b" in text
    assert "mean_iou" in text
    assert "FAILED" in report.table()
    # The same run passes with limits wide enough for a 2-pixel shift.
    loose = get_profile(
        "fp32",
        {
            "max_box_diff": 3,
            "max_box_diff_p99": 3,
            "min_mask_iou_mean": 0.5,
            "min_mask_iou_p1": 0.5,
            "min_strong_match_frac": 0.5,
            "min_ap50_vs_ref": 0.5,
        },
    )
    report = compare_runs(ref, cand, profile=loose)
    assert report.passed, report.failures
    assert report.to_dict()["overall"]["matched"] == 8


def test_profiles_get_looser_with_lower_precision() -> None:
    order = ["fp32", "fp16", "bf16", "int8"]
    for a, b in itertools.pairwise(order):
        pa, pb = PROFILES[a], PROFILES[b]
        assert pb.max_box_diff >= pa.max_box_diff and pb.max_missed_frac >= pa.max_missed_frac
        assert pb.min_mask_iou_mean <= pa.min_mask_iou_mean and pb.min_ap50_vs_ref <= pa.min_ap50_vs_ref


def test_tolerance_overrides_are_checked() -> None:
    tol = get_profile("fp16", parse_tolerances(["max_box_diff=2.5", "max_score_diff = 0.2"]))
    assert tol.max_box_diff == 2.5 and tol.max_score_diff == 0.2 and tol.name == "fp16+custom"
    with pytest.raises(ConfigError, match="unknown tolerance 'max_bogus'"):
        get_profile("fp32", {"max_bogus": 1})
    with pytest.raises(ConfigError, match="expected a number"):
        get_profile("fp32", {"max_box_diff": "wide"})
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_tolerances(["max_box_diff"])
    with pytest.raises(ConfigError, match="unknown tolerance profile"):
        get_profile("fp8")
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        ToleranceProfile(min_mask_iou_mean=1.5)
