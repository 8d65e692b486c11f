"""One-to-one, same-class matching of two detection sets of one image: the project's one matcher.

Parity (:mod:`cellseg_deploy.evaluation.parity`), its overlays, the prediction overlays against ground truth
and the ONNX export's self-check (:func:`cellseg_deploy.backends.onnxrt.export.compare_raw_outputs`) all pair
detections here, so a pair means the same thing everywhere:

- only detections of the **same class** can pair;
- within a class the pairing is an optimal assignment (``scipy.optimize.linear_sum_assignment``) on a cost
  matrix; pairs that are not acceptable (mask IoU below ``min_iou``, boxes further apart than the tolerance)
  are priced out *before* assigning, so the assignment first maximises the number of acceptable pairs and
  then minimises their cost, and are never returned.

Two front ends build the costs: :func:`match_instances` for post-processed :class:`Instances` (mask IoU
plus box IoU, ties broken by the closer score) and :func:`match_boxes` for raw detections before mask
pasting (largest box-coordinate difference).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from cellseg_deploy.structures import Instances

DEFAULT_MIN_IOU = 0.5
"""The mask IoU a same-class pair of instances needs to match (COCO's AP50 threshold)."""

_PRICED_OUT = 1e6
"""Cost of an unacceptable pair: above any sum of acceptable costs (each at most about 2), so the assignment
never trades an acceptable pair for a cheaper total."""

PairCost = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]
"""``(ref_idx, cand_idx) -> (cost, acceptable, value)``, each ``[len(ref_idx), len(cand_idx)]``: the
assignment cost (float), whether the pair may match (bool) and the per-pair figure reported for kept pairs."""


def assign_per_class(
    ref_labels: np.ndarray, cand_labels: np.ndarray, pair_cost: PairCost
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The optimal one-to-one assignment within each class, acceptable pairs only.

    Args:
        ref_labels, cand_labels: int ``[N_ref]`` / ``[N_cand]`` class labels.
        pair_cost: the costs of one class's block (see :data:`PairCost`).

    Returns:
        ``(ref_partner, cand_partner, ref_value)``: int64 ``[N_ref]`` / ``[N_cand]``, the partner's index or
        -1; float64 ``[N_ref]``, ``value`` of the pair (``nan`` without a partner).
    """
    from scipy.optimize import linear_sum_assignment

    ref_partner = np.full(len(ref_labels), -1, np.int64)
    cand_partner = np.full(len(cand_labels), -1, np.int64)
    ref_value = np.full(len(ref_labels), np.nan)
    for label in np.union1d(ref_labels, cand_labels):
        ri = np.flatnonzero(ref_labels == label)
        ci = np.flatnonzero(cand_labels == label)
        if not len(ri) or not len(ci):
            continue
        cost, acceptable, value = pair_cost(ri, ci)
        rows, cols = linear_sum_assignment(np.where(acceptable, cost, _PRICED_OUT))
        for r, c in zip(rows, cols, strict=True):
            if acceptable[r, c]:
                ref_partner[ri[r]] = ci[c]
                cand_partner[ci[c]] = ri[r]
                ref_value[ri[r]] = float(value[r, c])
    return ref_partner, cand_partner, ref_value


def match_instances(
    ref: Instances, cand: Instances, min_iou: float = DEFAULT_MIN_IOU
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The optimal same-class matching of one image's instances (all of them, whatever their scores).

    The cost is ``(1 - mask IoU) + (1 - box IoU) + 1e-3 * |score difference|``: the box keeps each detection
    with its counterpart when the masks alone are ambiguous (touching cells, distorted masks), and the score
    only breaks ties. A pair needs ``mask IoU >= min_iou``; two empty masks compare by their boxes
    (:func:`mask_iou`).

    Returns:
        ``(ref_partner, cand_partner, ref_iou)``: int64 ``[N_ref]`` / ``[N_cand]``, the partner's index or
        -1; float64 ``[N_ref]``, the pair's mask IoU (``nan`` without a partner).
    """

    def cost(ri: np.ndarray, ci: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        iou = mask_iou(ref, ri, cand, ci)
        total = (
            (1.0 - iou)
            + (1.0 - box_iou(ref.boxes[ri], cand.boxes[ci]))
            + 1e-3 * np.abs(ref.scores[ri][:, None] - cand.scores[ci][None, :])
        )
        return total, iou >= min_iou, iou

    return assign_per_class(ref.labels, cand.labels, cost)


def match_boxes(
    ref_boxes: np.ndarray,
    ref_labels: np.ndarray,
    cand_boxes: np.ndarray,
    cand_labels: np.ndarray,
    max_box_diff: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The optimal same-class matching of raw detections by their boxes (before masks are pasted).

    The cost is the pair's largest coordinate difference (:func:`box_max_diff`, pixels); a pair needs it
    ``<= max_box_diff``. For two runs of the same graph that should agree to rounding noise (the export's
    self-check), where near-equal scores listed in another order must not count as differences.

    Args:
        ref_boxes, cand_boxes: float ``[N, 4]`` ``x1 y1 x2 y2``, pixels.
        ref_labels, cand_labels: int ``[N]``.
        max_box_diff: the largest coordinate difference of a pair, pixels.

    Returns:
        ``(ref_partner, cand_partner, ref_box_diff)`` as :func:`assign_per_class` (``ref_box_diff``: the pair's
        largest coordinate difference, pixels).
    """

    def cost(ri: np.ndarray, ci: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        diff = box_max_diff(ref_boxes[ri], cand_boxes[ci])
        return diff, diff <= max_box_diff, diff

    return assign_per_class(ref_labels, cand_labels, cost)


def mask_iou(ref: Instances, ri: np.ndarray, cand: Instances, ci: np.ndarray) -> np.ndarray:
    """Mask IoU float64 ``[len(ri), len(ci)]`` of ``ref``'s instances ``ri`` and ``cand``'s ``ci``; where both
    masks are empty (a detection whose pasted mask has no pixel above the threshold) the box IoU stands in,
    so two empty masks of the same detection still match."""
    from cellseg_deploy.data.rle import rle_area, rle_iou

    iou = rle_iou([ref.rles[i] for i in ri], [cand.rles[i] for i in ci])
    ref_empty = np.array([rle_area(ref.rles[i]) == 0 for i in ri])
    cand_empty = np.array([rle_area(cand.rles[i]) == 0 for i in ci])
    both = ref_empty[:, None] & cand_empty[None, :]
    if both.any():
        iou = np.where(both, box_iou(ref.boxes[ri], cand.boxes[ci]), iou)
    return iou


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU float64 ``[len(a), len(b)]`` of ``x1 y1 x2 y2`` boxes ``[N, 4]``; two identical degenerate boxes
    (zero width or height) are the same detection: IoU 1, not 0/0."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(axis=1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    same = (a[:, None, :] == b[None, :, :]).all(axis=2)
    return np.where(same, 1.0, iou)


def box_max_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Largest ``|x1|, |y1|, |x2|, |y2|`` difference ``[len(a), len(b)]`` of boxes ``[N, 4]``, pixels (in
    the boxes' own dtype, as the raw outputs carry them)."""
    return np.abs(a[:, None, :] - b[None, :, :]).max(axis=2)
