"""Instance matching, counting at the score threshold, mask probability differences, tolerance profiles and
verdicts, on hand-made instances."""

from __future__ import annotations

import dataclasses
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
from cellseg_deploy.postprocess import PostprocessConfig, postprocess
from cellseg_deploy.structures import Detections, Instances

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
    assert s["agreement"] == 1.0


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
    assert p.summary()["agreement"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 2))


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
    p = compare_instances(ref, cand, score_thresh=0.5)
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
    p = compare_instances(ref, cand, score_thresh=0.5)
    assert (p.matched, p.missed, p.extra) == (2, 0, 0)
    assert (
        p.summary()["max_box_diff"] == 0.0 and p.summary()["max_score_diff"] == 0.0
    )  # paired by box, not by order


def test_empty_images() -> None:
    empty = make([], [])
    p = compare_instances(empty, empty, score_thresh=0.5)
    assert (p.n_ref, p.matched, p.missed, p.extra) == (0, 0, 0, 0)
    assert p.summary()["agreement"] is None
    p = compare_instances(empty, make(CELLS[:1], [0.9]), score_thresh=0.5)
    assert p.extra == 1


def test_verdict_names_what_differed() -> None:
    ref = {i: make(CELLS, [0.9, 0.8, 0.7, 0.6]) for i in (1, 2)}
    shifted = [(x0 + 2, y0, x1 + 2, y1) for x0, y0, x1, y1 in CELLS]
    cand = {1: ref[1], 2: make(shifted, [0.9, 0.8, 0.7, 0.6])}
    report = compare_runs(ref, cand, profile=PROFILES["fp32"], names={1: "a", 2: "b"}, min_instances=16)
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
            "min_agreement": 0.5,
        },
    )
    report = compare_runs(ref, cand, profile=loose, min_instances=16)
    assert report.passed, report.failures
    assert report.to_dict()["overall"]["matched"] == 8


def _upper(limit: float | None) -> float:
    return np.inf if limit is None else limit  # an upper limit that is off is the loosest


def _lower(limit: float | None) -> float:
    return -np.inf if limit is None else limit


def test_profiles_get_looser_with_lower_precision() -> None:
    assert list(PROFILES) == ["fp32", "fp16", "bf16", "int8"]
    for pa, pb in itertools.pairwise(PROFILES.values()):
        for f in dataclasses.fields(ToleranceProfile):
            if f.name.startswith("max_"):
                assert _upper(getattr(pb, f.name)) >= _upper(getattr(pa, f.name)), (pb.name, f.name)
            elif f.name.startswith("min_"):
                assert _lower(getattr(pb, f.name)) <= _lower(getattr(pa, f.name)), (pb.name, f.name)
    # fp32 as the exporter's own check on raw outputs; far below logits scaled by 2 (0.150 on every pair).
    assert PROFILES["fp32"].max_mask_prob_diff_p99 == 0.01 and PROFILES["fp16"].max_mask_prob_diff_p99 < 0.15


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
        dataclasses.replace(PROFILES["fp32"], min_mask_iou_mean=1.5)
    with pytest.raises(ConfigError, match=r"max_mask_prob_diff_p99: expected a value in \[0, 1\]"):
        get_profile("fp32", {"max_mask_prob_diff_p99": 2})


# ----------------------------------------------------------------------------------------------------------
# Mask probabilities (the mask head's M x M output, before pasting)
# ----------------------------------------------------------------------------------------------------------

PROB_DELTAS = [0.0, 0.003, 0.2, 0.05]
"""Per cell of CELLS, how far the candidate's mask probabilities move at one pixel (all stay on their side of
the 0.5 mask threshold, so the binary masks are identical)."""


def with_probs(inst: Instances, probs: np.ndarray | None) -> Instances:
    inst.mask_probs = probs
    return inst


def probs_pair(m: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Reference probabilities in [0.6, 0.9] and the candidate's, moved by ``PROB_DELTAS`` at one pixel each."""
    rng = np.random.default_rng(0)
    ref = rng.uniform(0.6, 0.9, size=(len(CELLS), m, m)).astype(np.float32)
    cand = ref.copy()
    for i, delta in enumerate(PROB_DELTAS):
        cand[i, 3 + i, 5] += delta
    return ref, cand


def test_mask_probability_differences_of_matched_pairs() -> None:
    p_ref, p_cand = probs_pair()
    ref = with_probs(make(CELLS, [0.9, 0.8, 0.7, 0.6]), p_ref)
    order = np.array([2, 0, 3, 1])  # the candidate lists the same cells in another order
    cand = with_probs(make([CELLS[i] for i in order], [0.7, 0.9, 0.6, 0.8]), p_cand[order])
    p = compare_instances(ref, cand, score_thresh=0.5)
    assert p.matched == 4 and p.mask_probs_skipped == ""
    assert p.mask_prob_diffs is not None
    # Per pair (in reference order), the largest |p_ref - p_cand| over the 28 x 28 map: the pairs follow the
    # matching, not the row order.
    np.testing.assert_allclose(p.mask_prob_diffs, PROB_DELTAS, atol=1e-6)
    s = p.summary()
    assert s["max_mask_prob_diff"] == pytest.approx(0.2, abs=1e-6)
    assert s["p99_mask_prob_diff"] == pytest.approx(np.percentile(PROB_DELTAS, 99), abs=1e-6)
    assert s["min_iou"] == 1.0 and s["max_box_diff"] == 0.0  # the binary masks cannot see it


def test_mask_probability_difference_fails_the_verdict_alone() -> None:
    p_ref, p_cand = probs_pair()
    ref = {i: with_probs(make(CELLS, [0.9, 0.8, 0.7, 0.6]), p_ref) for i in (1, 2)}
    cand = {
        1: with_probs(make(CELLS, [0.9, 0.8, 0.7, 0.6]), p_ref.copy()),
        2: with_probs(make(CELLS, [0.9, 0.8, 0.7, 0.6]), p_cand),
    }
    report = compare_runs(ref, cand, profile=PROFILES["fp32"], names={1: "a", 2: "b"}, min_instances=16)
    o = report.overall
    assert o["mask_prob_pairs"] == 8 and o["mask_probs_skipped"] is None
    assert o["max_mask_prob_diff"] == pytest.approx(0.2, abs=1e-6)
    expected_p99 = np.percentile([0.0] * 4 + PROB_DELTAS, 99)
    assert o["p99_mask_prob_diff"] == pytest.approx(expected_p99, abs=1e-6)
    # Only the mask probability check fails, and it says where.
    assert [f.split(" ")[0] for f in report.failures] == ["p99_mask_prob_diff"], report.failures
    assert "worst image b (0.2000)" in report.failures[0] and "limit <= 0.01" in report.failures[0]
    assert "prob p99" in report.table() and report.to_dict()["images"][1]["max_mask_prob_diff"] > 0.19
    # Within the limit: passes.
    assert compare_runs(
        ref, cand, profile=get_profile("fp32", {"max_mask_prob_diff_p99": 0.2}), min_instances=1
    ).passed
    small = {i: with_probs(make(CELLS, [0.9, 0.8, 0.7, 0.6]), p_ref + 0.004) for i in (1, 2)}
    assert compare_runs(ref, small, profile=PROFILES["fp32"], min_instances=1).passed


@pytest.mark.parametrize(
    ("ref_probs", "cand_probs", "reason"),
    [
        (True, False, "the candidate carries no mask probabilities"),
        (False, True, "the reference carries no mask probabilities"),
        (False, False, "the reference and the candidate carry no mask probabilities"),
        (True, 14, "different resolutions (reference 28x28, candidate 14x14)"),
    ],
)
def test_mask_probability_check_is_skipped_and_said_when_unavailable(
    ref_probs: bool, cand_probs: bool | int, reason: str
) -> None:
    p_ref, p_cand = probs_pair()
    ref = make(CELLS, [0.9, 0.8, 0.7, 0.6])
    cand = make(CELLS, [0.9, 0.8, 0.7, 0.6])
    ref.mask_probs = p_ref if ref_probs else None
    cand.mask_probs = p_cand[:, :14, :14] if cand_probs == 14 else (p_cand if cand_probs else None)
    p = compare_instances(ref, cand, score_thresh=0.5)
    assert p.mask_prob_diffs is None and reason in p.mask_probs_skipped
    assert p.summary()["p99_mask_prob_diff"] is None and reason in p.summary()["mask_probs_skipped"]

    report = compare_runs({1: ref}, {1: cand}, profile=PROFILES["fp32"], min_instances=1)
    assert report.passed, report.failures  # not a failure ...
    assert report.overall["p99_mask_prob_diff"] is None and report.overall["mask_prob_pairs"] == 0
    assert reason in report.overall["mask_probs_skipped"]
    # ... and not silent: the check's row says n/a, a note says why, in the table and the JSON.
    row = next(r for r in report.checks() if r[0] == "p99_mask_prob_diff")
    assert row[1] == "-" and row[4] == "n/a"
    note = next(n for n in report.notes() if "mask probabilities not compared" in n)
    assert reason in note and "check p99_mask_prob_diff skipped" in note
    assert note in report.table() and note in report.to_dict()["notes"]


def test_postprocess_keeps_the_kept_rows_mask_probabilities() -> None:
    rng = np.random.default_rng(0)
    probs = rng.random((3, 1, 28, 28)).astype(np.float32)  # [N, 1, M, M] as some runners return them
    det = Detections(
        boxes=np.array([[2, 2, 12, 12], [20, 5, 30, 15], [40, 20, 55, 35]], np.float32),
        labels=np.array([1, 2, 3], np.int64),
        scores=np.array([0.3, 0.9, 0.6], np.float32),
        mask_probs=probs,
        image_size=(H, W),
    )
    inst = postprocess(det, PostprocessConfig(score_thresh=0.5))
    assert inst.mask_probs is not None and inst.mask_probs.dtype == np.float32
    np.testing.assert_array_equal(inst.mask_probs, probs[[1, 2], 0])  # best score first, as the other fields
    picked = inst.select(np.array([False, True])).mask_probs
    assert picked is not None and picked.tolist() == probs[[2], 0].tolist()  # select() carries them
    assert make(CELLS, [0.9] * 4).select(np.array([0, 1])).mask_probs is None


# ----------------------------------------------------------------------------------------------------------
# Agreement, evidence and the AP gate's instance count
# ----------------------------------------------------------------------------------------------------------


def crowded() -> Instances:
    """What an untrained model returns on touching cells: overlapping same-class detections (one pair nested,
    one pair half-overlapping), exact duplicates, empty masks (one with a degenerate box), scores on both
    sides of any threshold."""
    spans = [
        (2, 2, 12, 12),
        (4, 4, 10, 10),
        (6, 2, 16, 12),
        (6, 2, 16, 12),
        (20, 5, 30, 15),
        (40, 20, 55, 35),
    ]
    inst = make(spans, [0.95, 0.9, 0.6, 0.6, 0.3, 0.08], labels=[1, 1, 1, 1, 2, 1])
    empty = encode_mask(np.zeros((H, W), bool))
    boxes = np.concatenate([inst.boxes, np.array([[30, 30, 30, 36], [50, 2, 58, 9]], np.float32)])
    return Instances(
        boxes=boxes,
        labels=np.concatenate([inst.labels, [1, 3]]),
        scores=np.concatenate([inst.scores, np.array([0.7, 0.06], np.float32)]),
        rles=[*inst.rles, empty, empty],
        image_size=(H, W),
    )


@pytest.mark.parametrize("score_thresh", [0.0, 0.05, 0.5, 0.9])
def test_identical_runs_agree_exactly_whatever_they_contain(score_thresh: float) -> None:
    runs = {i: crowded() for i in range(4)}
    report = compare_runs(runs, runs, profile=PROFILES["fp32"], score_thresh=score_thresh, min_instances=1)
    o = report.overall
    assert report.passed, report.failures
    assert o["agreement"] == 1.0 and o["missed"] == 0 and o["extra"] == 0
    assert o["matched"] == sum(int((r.scores >= score_thresh).sum()) for r in runs.values())
    assert o["max_box_diff"] == 0.0 and o["min_iou"] == 1.0


def test_one_instance_removed_lowers_the_agreement_and_fails() -> None:
    ref = {i: crowded() for i in range(4)}
    cand = dict(ref)
    cand[2] = ref[2].select(np.arange(len(ref[2])) != 0)  # the best-scoring cell of one image is gone
    report = compare_runs(ref, cand, profile=PROFILES["fp32"], score_thresh=0.5, min_instances=1)
    o = report.overall
    assert o["missed"] == 1 and o["agreement"] == pytest.approx(2 * o["matched"] / (2 * o["matched"] + 1))
    assert o["agreement"] < PROFILES["fp32"].min_agreement
    assert any(f.startswith("agreement = ") for f in report.failures), report.failures
    assert not report.passed


def test_nothing_compared_is_a_failure_in_one_line() -> None:
    runs = {i: crowded() for i in range(3)}
    report = compare_runs(runs, runs, profile=PROFILES["fp32"], score_thresh=0.99)
    assert not report.passed
    assert report.failures[0].startswith("nothing was compared: no instance of either side scoring >= 0.99")
    assert "\n" not in report.failures[0]
    assert report.to_dict()["passed"] is False and "PASSED" not in report.table()


def test_too_little_evidence_fails_and_the_checks_count_their_instances() -> None:
    runs = {i: crowded() for i in range(2)}  # 3 instances >= 0.65 per image and side: 12 in all
    report = compare_runs(runs, runs, profile=PROFILES["fp32"], score_thresh=0.65)
    assert len(report.failures) == 1 and report.failures[0].startswith("too little evidence: 12 instance(s)")
    assert compare_runs(runs, runs, profile=PROFILES["fp32"], score_thresh=0.65, min_instances=12).passed
    checks = {c["key"]: c for c in report.to_dict()["checks"]}
    assert checks["missed_frac"]["n"] == 6 and checks["agreement"]["n"] == 6 and checks["mean_iou"]["n"] == 6
    assert checks["agreement"]["value"] == 1.0 and checks["agreement"]["judged"]


def test_the_ap_gate_needs_enough_ground_truth() -> None:
    from cellseg_deploy.evaluation.parity import evaluate_checks, min_gt_for_ap_gate

    assert [min_gt_for_ap_gate(t) for t in (0.015, 0.01, 0.002)] == [134, 200, 1000]
    overall = compare_runs({1: crowded()}, {1: crowded()}, profile=PROFILES["int8"], min_instances=1).overall
    few = {"reference": 0.55, "candidate": 0.59, "diff": 0.04, "n_gt": 40}
    gate = next(c for c in evaluate_checks(overall, few, PROFILES["int8"]) if c.key == "ap50_gt_diff")
    assert (
        gate.ok
        and gate.n == 40
        and "only 40 ground-truth instances" in gate.skipped
        and "134" in gate.skipped
    )
    enough = {**few, "n_gt": 134}
    gate = next(c for c in evaluate_checks(overall, enough, PROFILES["int8"]) if c.key == "ap50_gt_diff")
    assert not gate.ok and not gate.skipped


def test_a_limit_that_is_off_is_reported_but_never_judged() -> None:
    """bf16 turns the score-difference limit off (None, not a limit of 1.0 that can never fail): the
    statistic stays in the report, as a note, and is not one of the checks."""
    assert PROFILES["bf16"].max_score_diff is None and PROFILES["int8"].max_mask_prob_diff_p99 is None
    ref = make([(2, 2, 12, 12), (20, 5, 32, 18)], [0.9, 0.8])
    cand = make([(2, 2, 12, 12), (20, 5, 32, 18)], [0.9, 0.2])  # a score moved by 0.6
    strict = compare_runs(
        {1: ref}, {1: cand}, profile=get_profile("bf16", {"max_score_diff": "0.1"}), min_instances=1
    )
    assert any(f.startswith("max_score_diff") for f in strict.failures), strict.failures
    report = compare_runs({1: ref}, {1: cand}, profile=PROFILES["bf16"], min_instances=1)
    assert report.passed, report.failures
    keys = [c["key"] for c in report.to_dict()["checks"]]
    assert "max_score_diff" not in keys and "agreement" in keys
    assert any("not limited in profile bf16" in n and "max_score_diff = 0.6" in n for n in report.notes())
    assert report.to_dict()["profile"]["max_score_diff"] is None
    off = get_profile("fp32", {"max_score_diff": "off"})
    assert off.max_score_diff is None and off.name == "fp32+custom"
    with pytest.raises(ConfigError, match="strong_iou"):
        get_profile("fp32", {"strong_iou": "off"})
