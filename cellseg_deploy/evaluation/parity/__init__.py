"""Instance-level parity: does a candidate backend find the same cells as the reference?

Tensor-by-tensor comparison breaks on detection models: two backends may return a different number of
detections, in another order, and an instance whose score sits at a threshold is kept by one and dropped by
the other. So parity here compares *instances*, the way a user sees them:

1. Both backends run the same images through the one shared post-processing, keeping **every** detection
   (no score threshold), so the masks compared were pasted identically.
2. :func:`compare_instances` pairs (through :func:`cellseg_deploy.matching.match_instances`) reference and candidate instances of the **same class** with an optimal
   assignment (``scipy.optimize.linear_sum_assignment``) on ``(1 - mask IoU) + (1 - box IoU)``, ties broken
   by the closer score; a pair needs ``mask IoU >= min_iou``. The box term keeps each detection with its
   counterpart when masks alone are ambiguous (touching cells, a candidate whose masks are distorted), so a
   mask defect is reported as a mask difference, not as swapped pairs with box and score differences. Two
   *empty* masks (no pixel above the mask threshold) are compared by their boxes instead, so the same
   empty-mask detection on both sides still matches.
3. Counting happens **after** matching, against the full lists: a pair counts as *matched* when either side
   scores ``>= score_thresh``; a reference instance above the threshold with no partner at all is *missed*;
   a candidate instance above the threshold with no partner is *extra*. An instance at 0.51 in one backend
   and 0.49 in the other is therefore a match with a score difference of 0.02 (judged by the score
   tolerance), not a miss plus an extra. This is Polygraphy's lesson: compare against everything the other
   side produced, then judge the differences by tolerances.
4. Over matched pairs: box coordinate difference (max and p99, pixels), score difference (max), mask IoU
   (min, p1, mean), mask probability difference (max and p99 of each pair's largest ``|p_ref - p_cand|`` over
   the mask head's ``M x M`` probabilities, before pasting: binary masks hide an error that keeps each pixel
   on its side of the mask threshold, such as mask logits scaled by 2); and the **agreement**
   ``2 * matched / (2 * matched + missed + extra)``, the F1 score of the optimal matching itself. With a
   dataset, also both backends' segm AP50 against the real ground truth.
5. A :class:`ToleranceProfile` per precision (:mod:`.tolerances`, a limit set to ``None`` is off) turns the numbers into a verdict with the reasons that failed.
   A statistic that cannot be computed is not checked, and the report says why (e.g. instances that carry no
   mask probabilities: the mask probability check is skipped, with a note in the table and the JSON).

Why agreement and not "AP50 of the candidate against the reference's predictions": COCOeval cannot score a
prediction set against itself as 1.0 when the reference holds overlapping same-class detections (its greedy
matching lets one detection take another's ground truth) or empty masks (IoU 0 with everything), which real
cell images with an untrained or weak model have in numbers. The agreement is computed from the matching
the other checks already use: identical sides match every instance to itself at cost 0 (mask IoU 1, box IoU
1, score difference 0; two empty masks compare by their boxes, two identical boxes have IoU 1 even when
degenerate), so it is exactly 1.0 whatever the instances are, and every missed or extra instance lowers it.

A verdict needs evidence. A run in which fewer than ``min_instances`` instances score ``>= score_thresh``
(reference and candidate together) fails with one line saying so: a check that compared nothing has shown
nothing. Every check reports the number of instances behind it (``n`` in the JSON). The AP50-difference gate
against the ground truth is applied only when the ground truth has at least :func:`min_gt_for_ap_gate`
instances, so that one flipped instance (which moves AP50 by about ``1 / n_gt``) is at most half the
tolerance; below that the difference is reported, and the report says why it was not judged.

The package, by job: :mod:`.tolerances` (the profiles, as data), :mod:`.compare` (one image, then a run),
:mod:`.report` (checks, verdict, table and JSON), :mod:`.run` (the dataset loop) and :mod:`.overlays`
(pictures of where the two sides disagree). The matcher itself is :mod:`cellseg_deploy.matching`.
"""

from cellseg_deploy.evaluation.parity.compare import (
    ImageParity,
    agreement,
    ap50_against_ground_truth,
    compare_instances,
    compare_runs,
    pair_stats,
    summarize,
)
from cellseg_deploy.evaluation.parity.report import (
    Check,
    ParityReport,
    evaluate_checks,
    evidence_failure,
    judge,
    unlimited_checks,
)
from cellseg_deploy.evaluation.parity.run import run_parity, runner_pair
from cellseg_deploy.evaluation.parity.tolerances import (
    AP_GATE_FLIPS_PER_TOLERANCE,
    BF16,
    DEFAULT_MIN_INSTANCES,
    DEFAULT_SCORE_THRESH,
    FP16,
    FP32,
    INT8,
    PROFILES,
    ToleranceProfile,
    get_profile,
    min_gt_for_ap_gate,
    parse_tolerances,
)
from cellseg_deploy.matching import DEFAULT_MIN_IOU, match_instances

__all__ = [
    "AP_GATE_FLIPS_PER_TOLERANCE",
    "BF16",
    "DEFAULT_MIN_INSTANCES",
    "DEFAULT_MIN_IOU",
    "DEFAULT_SCORE_THRESH",
    "FP16",
    "FP32",
    "INT8",
    "PROFILES",
    "Check",
    "ImageParity",
    "ParityReport",
    "ToleranceProfile",
    "agreement",
    "ap50_against_ground_truth",
    "compare_instances",
    "compare_runs",
    "evaluate_checks",
    "evidence_failure",
    "get_profile",
    "judge",
    "match_instances",
    "min_gt_for_ap_gate",
    "pair_stats",
    "parse_tolerances",
    "run_parity",
    "runner_pair",
    "summarize",
    "unlimited_checks",
]
