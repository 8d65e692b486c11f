"""Parity of instances: one image (:func:`compare_instances`), then a run of images (:func:`compare_runs`).

Both sides' instances are matched by the project's one matcher (:func:`cellseg_deploy.matching.match_instances`)
and counted afterwards against the full lists (see :mod:`cellseg_deploy.evaluation.parity`); the statistics of
the matched pairs and the counts go to :mod:`~cellseg_deploy.evaluation.parity.report` for the verdict.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from cellseg_deploy.errors import ConfigError, UserError
from cellseg_deploy.evaluation.parity.report import ParityReport, judge
from cellseg_deploy.evaluation.parity.tolerances import (
    DEFAULT_MIN_INSTANCES,
    DEFAULT_SCORE_THRESH,
    ToleranceProfile,
)
from cellseg_deploy.matching import DEFAULT_MIN_IOU, match_instances
from cellseg_deploy.structures import Instances

log = logging.getLogger(__name__)


def agreement(matched: int, missed: int, extra: int) -> float | None:
    """F1 of a matching: ``2 * matched / (2 * matched + missed + extra)``; ``None`` when nothing was compared."""
    total = 2 * matched + missed + extra
    return None if total == 0 else 2 * matched / total


@dataclass
class ImageParity:
    """The comparison of one image's instances (see the module docstring for the counting rules).

    Attributes:
        image_id, name, image_size: which image (``(H, W)``).
        score_thresh, min_iou, strong_iou: the settings used.
        n_ref / n_cand: instances scoring ``>= score_thresh`` in the reference / candidate.
        matched: pairs where either side scores ``>= score_thresh``.
        missed: reference instances ``>= score_thresh`` with no candidate partner.
        extra: candidate instances ``>= score_thresh`` with no reference partner.
        class_changed: missed reference instances that a candidate instance of *another* class covers with
            ``IoU >= min_iou`` (a label flip rather than a lost cell).
        strong_matched: reference instances ``>= score_thresh`` matched with ``IoU >= strong_iou``.
        box_diffs: float64 ``[matched]``, per pair the largest ``|x1|, |y1|, |x2|, |y2|`` difference, pixels.
        score_diffs: float64 ``[matched]``, ``|score_ref - score_cand|``.
        ious: float64 ``[matched]``, mask IoU.
        mask_prob_diffs: float64 ``[matched]``, per pair the largest ``|p_ref - p_cand|`` over the two
            ``[M, M]`` mask probability maps (probability units, before pasting); ``None`` when they could
            not be compared (see ``mask_probs_skipped``).
        mask_probs_skipped: why the mask probabilities were not compared (``""``: they were).
    """

    image_id: int
    name: str
    image_size: tuple[int, int]
    score_thresh: float
    min_iou: float
    strong_iou: float
    n_ref: int
    n_cand: int
    matched: int
    missed: int
    extra: int
    class_changed: int
    strong_matched: int
    box_diffs: np.ndarray
    score_diffs: np.ndarray
    ious: np.ndarray
    mask_prob_diffs: np.ndarray | None = None
    mask_probs_skipped: str = ""

    def summary(self) -> dict[str, Any]:
        """Counts and statistics as a JSON-able dict (no per-pair arrays)."""
        return {
            "image_id": self.image_id,
            "name": self.name,
            "size": list(self.image_size),
            "n_ref": self.n_ref,
            "n_cand": self.n_cand,
            "matched": self.matched,
            "missed": self.missed,
            "extra": self.extra,
            "class_changed": self.class_changed,
            "strong_matched": self.strong_matched,
            **pair_stats(self.box_diffs, self.score_diffs, self.ious, self.mask_prob_diffs),
            "agreement": agreement(self.matched, self.missed, self.extra),
            "mask_probs_skipped": self.mask_probs_skipped or None,
        }


def pair_stats(
    box_diffs: np.ndarray,
    score_diffs: np.ndarray,
    ious: np.ndarray,
    mask_prob_diffs: np.ndarray | None = None,
) -> dict[str, float | None]:
    """Max/p99 box difference, max score difference, min/p1/mean mask IoU and max/p99 mask probability
    difference (``None`` with no pairs; the mask probability ones also when ``mask_prob_diffs`` is ``None``
    or empty)."""
    out: dict[str, float | None]
    if len(ious) == 0:
        out = {
            k: None
            for k in ("max_box_diff", "p99_box_diff", "max_score_diff", "min_iou", "p1_iou", "mean_iou")
        }
    else:
        out = {
            "max_box_diff": float(box_diffs.max()),
            "p99_box_diff": float(np.percentile(box_diffs, 99)),
            "max_score_diff": float(score_diffs.max()),
            "min_iou": float(ious.min()),
            "p1_iou": float(np.percentile(ious, 1)),
            "mean_iou": float(ious.mean()),
        }
    if mask_prob_diffs is not None and len(mask_prob_diffs) > 0:
        out["max_mask_prob_diff"] = float(mask_prob_diffs.max())
        out["p99_mask_prob_diff"] = float(np.percentile(mask_prob_diffs, 99))
    else:
        out["max_mask_prob_diff"] = out["p99_mask_prob_diff"] = None
    return out


def compare_instances(
    ref: Instances,
    cand: Instances,
    *,
    score_thresh: float,
    min_iou: float = DEFAULT_MIN_IOU,
    strong_iou: float = 0.95,
    image_id: int = 0,
    name: str = "",
) -> ImageParity:
    """Match the candidate's instances to the reference's on one image.

    Give both sides **all** their instances (post-processed without a score threshold, or with one well
    below ``score_thresh``): an instance above the threshold on one side is matched against the other side's
    full list, so a score that crosses the threshold is a score difference, not a miss.

    Args:
        ref, cand: instances of the same image (same ``image_size``), masks as RLEs. When both carry
            ``mask_probs`` of the same resolution, matched pairs' probability maps are compared too
            (:attr:`ImageParity.mask_prob_diffs`); otherwise :attr:`ImageParity.mask_probs_skipped` says why not.
        score_thresh: instances scoring at least this are the ones that must agree.
        min_iou: the mask IoU a same-class pair needs to match.
        strong_iou: the IoU that counts a match as strong (see :attr:`ImageParity.strong_matched`).
        image_id, name: carried into the result.

    Raises:
        UserError: the two sides describe images of different sizes.
    """
    from cellseg_deploy.data.rle import rle_iou

    if tuple(ref.image_size) != tuple(cand.image_size):
        raise UserError(
            f"image {name or image_id}: reference is {ref.image_size}, candidate {cand.image_size}"
        )
    ref_hi = ref.scores >= score_thresh
    cand_hi = cand.scores >= score_thresh
    ref_partner, cand_partner, pair_iou = match_instances(ref, cand, min_iou)

    pairs = [(r, int(c)) for r, c in enumerate(ref_partner) if c >= 0 and (ref_hi[r] or cand_hi[c])]
    r_idx = np.array([p[0] for p in pairs], np.int64)
    c_idx = np.array([p[1] for p in pairs], np.int64)
    if pairs:
        box_diffs = np.abs(ref.boxes[r_idx].astype(np.float64) - cand.boxes[c_idx].astype(np.float64)).max(
            axis=1
        )
        score_diffs = np.abs(ref.scores[r_idx].astype(np.float64) - cand.scores[c_idx].astype(np.float64))
        ious = pair_iou[r_idx]
    else:
        box_diffs = score_diffs = ious = np.zeros((0,), np.float64)
    mask_probs_skipped = _mask_probs_unavailable(ref, cand)
    mask_prob_diffs = None
    if not mask_probs_skipped:
        assert ref.mask_probs is not None and cand.mask_probs is not None
        mask_prob_diffs = np.zeros((0,), np.float64)
        if pairs:
            a = ref.mask_probs[r_idx].astype(np.float64)
            b = cand.mask_probs[c_idx].astype(np.float64)
            mask_prob_diffs = np.abs(a - b).reshape(len(pairs), -1).max(axis=1)

    missed_idx = np.flatnonzero(ref_hi & (ref_partner < 0))
    extra_idx = np.flatnonzero(cand_hi & (cand_partner < 0))
    class_changed = 0
    if len(missed_idx) and len(cand):
        cross = rle_iou([ref.rles[i] for i in missed_idx], cand.rles)
        other = ref.labels[missed_idx][:, None] != cand.labels[None, :]
        class_changed = int(((cross >= min_iou) & other).any(axis=1).sum())
    strong = int(sum(1 for r in r_idx if ref_hi[r] and pair_iou[r] >= strong_iou))

    return ImageParity(
        image_id=int(image_id),
        name=name,
        image_size=(int(ref.image_size[0]), int(ref.image_size[1])),
        score_thresh=score_thresh,
        min_iou=min_iou,
        strong_iou=strong_iou,
        n_ref=int(ref_hi.sum()),
        n_cand=int(cand_hi.sum()),
        matched=len(pairs),
        missed=len(missed_idx),
        extra=len(extra_idx),
        class_changed=class_changed,
        strong_matched=strong,
        box_diffs=box_diffs,
        score_diffs=score_diffs,
        ious=ious,
        mask_prob_diffs=mask_prob_diffs,
        mask_probs_skipped=mask_probs_skipped,
    )


def _mask_probs_unavailable(ref: Instances, cand: Instances) -> str:
    """Why the two sides' mask probabilities cannot be compared (``""``: they can)."""
    missing = [side for side, inst in (("reference", ref), ("candidate", cand)) if inst.mask_probs is None]
    if missing:
        return (
            f"the {' and the '.join(missing)} carr{'y' if len(missing) > 1 else 'ies'} no mask probabilities"
        )
    assert ref.mask_probs is not None and cand.mask_probs is not None
    for side, probs, n in (
        ("reference", ref.mask_probs, len(ref)),
        ("candidate", cand.mask_probs, len(cand)),
    ):
        if probs.ndim != 3 or probs.shape[0] != n:
            return f"the {side}'s mask probabilities have shape {tuple(probs.shape)}, not [{n}, M, M]"
    if ref.mask_probs.shape[1:] != cand.mask_probs.shape[1:]:
        m_ref, m_cand = ("x".join(map(str, x.shape[1:])) for x in (ref.mask_probs, cand.mask_probs))
        return f"the mask probabilities have different resolutions (reference {m_ref}, candidate {m_cand})"
    return ""


def summarize(images: list[ImageParity]) -> dict[str, Any]:
    """Overall counts and statistics of a run (see :attr:`ParityReport.overall`)."""
    keys = ("n_ref", "n_cand", "matched", "missed", "extra", "class_changed", "strong_matched")
    totals = {k: int(sum(getattr(im, k) for im in images)) for k in keys}
    cat = lambda name: np.concatenate([getattr(im, name) for im in images]) if images else np.zeros(0)  # noqa: E731
    compared = [im.mask_prob_diffs for im in images if im.mask_prob_diffs is not None]
    out: dict[str, Any] = {
        "size": None,
        **totals,
        **pair_stats(
            cat("box_diffs"), cat("score_diffs"), cat("ious"), np.concatenate(compared) if compared else None
        ),
    }
    out["mask_prob_pairs"] = int(sum(len(d) for d in compared))
    out["mask_probs_skipped"] = _mask_probs_skipped_note(images)
    out["missed_frac"] = totals["missed"] / totals["n_ref"] if totals["n_ref"] else 0.0
    out["extra_frac"] = totals["extra"] / totals["n_cand"] if totals["n_cand"] else 0.0
    out["strong_match_frac"] = totals["strong_matched"] / totals["n_ref"] if totals["n_ref"] else None
    out["agreement"] = agreement(totals["matched"], totals["missed"], totals["extra"])
    out["images"] = len(images)
    out["score_thresh"] = images[0].score_thresh if images else None
    return out


def _mask_probs_skipped_note(images: list[ImageParity]) -> str | None:
    """Why (and on how much of the run) mask probabilities were not compared; ``None``: compared everywhere."""
    skipped = [im for im in images if im.mask_probs_skipped]
    if not skipped:
        return None
    reasons = "; ".join(dict.fromkeys(im.mask_probs_skipped for im in skipped))
    pairs = sum(im.matched for im in skipped)
    return f"{reasons} ({len(skipped)} of {len(images)} image(s), {pairs} matched pair(s) not compared)"


def compare_runs(
    ref: dict[int, Instances],
    cand: dict[int, Instances],
    *,
    profile: ToleranceProfile,
    score_thresh: float = DEFAULT_SCORE_THRESH,
    min_iou: float = DEFAULT_MIN_IOU,
    gt: dict[str, Any] | None = None,
    names: dict[int, str] | None = None,
    min_instances: int = DEFAULT_MIN_INSTANCES,
) -> ParityReport:
    """Parity of two runs' instances ``{image_id: Instances}`` (same image ids), with the verdict.

    ``gt``: the COCO ground truth of these images (optional); when it has annotations, both runs' segm AP50
    against it is reported and checked (``max_ap50_gt_diff``, given enough ground-truth instances).
    ``min_instances``: the evidence a verdict needs (see :func:`evidence_failure`).
    """
    if min_instances < 1:
        raise ConfigError(f"min instances must be at least 1, got {min_instances}")
    if set(ref) != set(cand):
        raise UserError(f"reference and candidate cover different images: {sorted(set(ref) ^ set(cand))[:5]}")
    if not 0.0 <= score_thresh <= 1.0:
        raise ConfigError(f"score threshold must lie in [0, 1], got {score_thresh}")
    if not 0.0 < min_iou <= 1.0:
        raise ConfigError(f"min IoU must lie in (0, 1], got {min_iou}")
    names = names or {}
    images = [
        compare_instances(
            ref[i],
            cand[i],
            score_thresh=score_thresh,
            min_iou=min_iou,
            strong_iou=profile.strong_iou,
            image_id=i,
            name=names.get(i, ""),
        )
        for i in sorted(ref)
    ]
    overall = summarize(images)
    if overall["mask_probs_skipped"]:
        log.warning("mask probabilities not compared: %s", overall["mask_probs_skipped"])
    ap50_gt: dict[str, Any] = {"reference": None, "candidate": None, "diff": None}
    if gt is not None and gt.get("annotations"):
        ap50_gt = ap50_against_ground_truth(gt, ref, cand)
    return ParityReport(
        images=images,
        overall=overall,
        ap50_gt=ap50_gt,
        profile=profile,
        failures=judge(overall, ap50_gt, profile, images, min_instances),
        settings={
            "score_thresh": score_thresh,
            "min_iou": min_iou,
            "strong_iou": profile.strong_iou,
            "min_instances": min_instances,
        },
    )


def ap50_against_ground_truth(
    gt: dict[str, Any], ref: dict[int, Instances], cand: dict[int, Instances]
) -> dict[str, Any]:
    """segm AP50 of both runs against the same ground truth (cap: every detection is scored):
    ``{"reference", "candidate", "diff" (candidate - reference), "n_gt" (non-crowd instances), "max_dets"}``."""
    from cellseg_deploy.evaluation.coco_eval import evaluate, predictions_to_results

    cap = max([100, *(len(p) for p in (*ref.values(), *cand.values()))])
    out: dict[str, Any] = {}
    for key, preds in (("reference", ref), ("candidate", cand)):
        out[key] = evaluate(gt, predictions_to_results(preds), max_dets=cap, iou_types=("segm",)).metrics[
            "segm"
        ]["AP50"]
    r, c = out["reference"], out["candidate"]
    out["diff"] = None if r is None or c is None else float(c) - float(r)
    out["n_gt"] = sum(1 for a in gt.get("annotations", []) if not a.get("iscrowd"))
    out["max_dets"] = cap
    return out
