"""Parity pictures: every judged instance gets the status the parity matching gives it, drawn in its colour.

Instances are real RLE masks; the CLI test runs real models (PyTorch reference, an ONNX Runtime candidate).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cellseg_deploy.data.rle import encode_mask
from cellseg_deploy.evaluation.parity import compare_instances
from cellseg_deploy.evaluation.parity.overlays import STATUS_COLOURS, classify_instances, draw_parity_overlay
from cellseg_deploy.structures import Instances

H, W = 120, 160


def _instances(boxes: list[tuple[int, int, int, int]], scores: list[float], labels: list[int]) -> Instances:
    rles = []
    for x1, y1, x2, y2 in boxes:
        mask = np.zeros((H, W), bool)
        mask[y1:y2, x1:x2] = True
        rles.append(encode_mask(mask))
    return Instances(
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        labels=np.asarray(labels, np.int64),
        scores=np.asarray(scores, np.float32),
        rles=rles,
        image_size=(H, W),
    )


# Reference: five cells. Candidate: cells 0 and 1 the same, cell 2 shifted by 3 px (IoU ~0.7: a low-IoU
# pair), cell 3 lost, cell 4 found with another class (a miss plus an extra), and one cell of its own (extra).
REF = _instances(
    [(5, 5, 25, 25), (40, 5, 60, 25), (80, 5, 100, 25), (5, 60, 25, 80), (40, 60, 60, 80)],
    [0.9, 0.8, 0.9, 0.7, 0.9],
    [1, 1, 2, 3, 1],
)
CAND = _instances(
    [(5, 5, 25, 25), (40, 5, 60, 25), (83, 5, 103, 25), (40, 60, 60, 80), (120, 80, 150, 110)],
    [0.9, 0.8, 0.9, 0.9, 0.8],
    [1, 1, 2, 2, 4],
)


def test_statuses_follow_the_parity_matching() -> None:
    status = classify_instances(REF, CAND, score_thresh=0.5, min_iou=0.5, strong_iou=0.95)
    assert list(status.ref) == ["matched", "matched", "low_iou", "missed", "missed"]
    assert list(status.cand) == ["matched", "matched", "low_iou", "extra", "extra"]
    parity = compare_instances(REF, CAND, score_thresh=0.5, min_iou=0.5, strong_iou=0.95)
    counts = status.counts()
    assert counts["matched"] + counts["low_iou"] == parity.matched
    assert counts["matched"] == parity.strong_matched
    assert (counts["missed"], counts["extra"]) == (parity.missed, parity.extra)


def test_below_threshold_instances_are_not_judged() -> None:
    status = classify_instances(REF, CAND, score_thresh=0.85, min_iou=0.5, strong_iou=0.95)
    # Reference cell 1 (0.8) and 3 (0.7) are below 0.85; cell 1's partner is too: the pair is not judged.
    assert status.ref[1] == "" and status.cand[1] == ""
    assert status.ref[3] == ""
    assert status.cand[4] == ""  # the candidate's own cell scores 0.8


def _has_colour(png: Path, hex_colour: str, tol: int = 40) -> bool:
    import cv2

    bgr = cv2.imread(str(png), cv2.IMREAD_COLOR)
    rgb = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)])
    return bool((np.abs(bgr[..., ::-1].astype(int) - rgb).max(axis=2) < tol).sum() > 20)


def test_every_status_is_drawn_in_its_colour_with_a_legend(tmp_path: Path) -> None:
    image = np.full((H, W, 3), 128, np.uint8)
    status = classify_instances(REF, CAND, score_thresh=0.5)
    png = draw_parity_overlay(image, REF, CAND, status, tmp_path / "all.png", title="test")
    for colour in STATUS_COLOURS.values():
        assert _has_colour(png, colour), colour
    same = classify_instances(REF, REF, score_thresh=0.5)
    png_same = draw_parity_overlay(image, REF, REF, same, tmp_path / "same.png")
    assert _has_colour(png_same, STATUS_COLOURS["matched"])
    # The legend's swatches are there for every status; the outlines of a perfect run are green only, so
    # red and cyan show up in the legend alone (few pixels), not as outlines.
    assert same.counts() == {"matched": 5, "low_iou": 0, "missed": 0, "extra": 0}
    assert png_same.stat().st_size < 200_000


@pytest.mark.slow
def test_parity_cli_draws_overlays(
    trained_tiny: tuple[Path, Path], random_tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """``parity --overlays``: a candidate that is another (random) model misses the reference's cells."""
    from cellseg_deploy.backends.onnxrt.export import export_onnx
    from cellseg_deploy.cli.main import main

    checkpoint, data_root = trained_tiny
    other = export_onnx(random_tiny_checkpoint, tmp_path / "other.onnx").path
    out = tmp_path / "overlays"
    code = main(
        [
            "parity",
            str(checkpoint),
            "--candidate",
            str(other),
            "--data",
            str(data_root),
            "--overlays",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 1  # parity fails: nothing the reference found is found
    pngs = sorted(out.glob("*.png"))
    assert 1 <= len(pngs) <= 8
    assert any(_has_colour(p, STATUS_COLOURS["missed"]) for p in pngs)
