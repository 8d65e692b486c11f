"""cellseg_deploy.matching on its own: the one matcher behind parity, the overlays and the export self-check."""

from __future__ import annotations

import numpy as np

from cellseg_deploy.data.rle import encode_mask
from cellseg_deploy.matching import match_boxes, match_instances
from cellseg_deploy.structures import Instances

H, W = 40, 60
SPANS = [(2, 2, 12, 12), (20, 5, 32, 18), (40, 20, 55, 35), (5, 25, 15, 38)]


def cells(spans: list[tuple[int, int, int, int]], labels: list[int] | None = None) -> Instances:
    masks = []
    for x0, y0, x1, y1 in spans:
        m = np.zeros((H, W), bool)
        m[y0:y1, x0:x1] = True
        masks.append(m)
    n = len(spans)
    return Instances(
        boxes=np.array(spans, np.float32).reshape(n, 4),
        labels=np.array(labels or [1] * n, np.int64),
        scores=np.linspace(0.9, 0.6, n).astype(np.float32),
        rles=[encode_mask(m) for m in masks],
        image_size=(H, W),
    )


def test_identical_sets_match_fully() -> None:
    inst = cells(SPANS, [1, 2, 1, 3])
    ref_partner, cand_partner, iou = match_instances(inst, inst)
    assert ref_partner.tolist() == [0, 1, 2, 3] and cand_partner.tolist() == [0, 1, 2, 3]
    assert np.all(iou == 1.0)


def test_one_removed_instance_is_missed() -> None:
    ref = cells(SPANS)
    cand = cells([SPANS[0], SPANS[2], SPANS[3]])  # the second cell is gone
    ref_partner, cand_partner, iou = match_instances(ref, cand)
    assert ref_partner.tolist() == [0, -1, 1, 2] and cand_partner.tolist() == [0, 2, 3]
    assert np.isnan(iou[1]) and np.all(iou[[0, 2, 3]] == 1.0)


def test_another_class_never_matches() -> None:
    ref_partner, _, _ = match_instances(cells(SPANS[:1], [1]), cells(SPANS[:1], [2]))
    assert ref_partner.tolist() == [-1]


def test_raw_boxes_match_within_the_tolerance_in_any_order() -> None:
    boxes = np.array(SPANS, np.float32)
    labels = np.array([1, 1, 2, 2])
    order = np.array([3, 1, 0, 2])
    moved = boxes[order] + np.float32(0.3)
    ref_partner, _, diff = match_boxes(boxes, labels, moved, labels[order], max_box_diff=0.5)
    assert ref_partner.tolist() == [2, 1, 3, 0] and np.allclose(diff, 0.3)
    ref_partner, _, _ = match_boxes(boxes, labels, moved, labels[order], max_box_diff=0.2)
    assert ref_partner.tolist() == [-1, -1, -1, -1]
