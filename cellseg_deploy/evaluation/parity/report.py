"""The verdict of a parity run and its report: the checks (one per limit of the profile), the failures, and
the table, JSON and notes a reader sees."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cellseg_deploy.evaluation.parity.tolerances import (
    DEFAULT_MIN_INSTANCES,
    ToleranceProfile,
    min_gt_for_ap_gate,
)

if TYPE_CHECKING:
    from cellseg_deploy.evaluation.parity.compare import ImageParity


@dataclass
class ParityReport:
    """Parity of a candidate against a reference over a set of images, with the verdict.

    Attributes:
        images: one :class:`ImageParity` per image.
        overall: the same statistics over all images (counts summed, pair statistics over all pairs),
            plus ``missed_frac``, ``extra_frac``, ``strong_match_frac``, ``agreement``, ``mask_prob_pairs`` (matched pairs whose mask probabilities were compared) and
            ``mask_probs_skipped`` (why some or all were not; ``None`` when none was left out).
        ap50_gt: ``{"reference": AP50, "candidate": AP50, "diff": cand - ref, "n_gt": instances,
            "max_dets": cap}`` against the dataset's ground truth (``None`` entries when there is none).
        profile: the tolerances applied.
        failures: one line per limit that was not met (empty: passed).
        settings: score threshold, IoU settings, data root, split, images.
        reference / candidate: the runners' ``info()``.
        seconds: wall time.
    """

    images: list[ImageParity]
    overall: dict[str, Any]
    ap50_gt: dict[str, Any]
    profile: ToleranceProfile
    failures: list[str]
    settings: dict[str, Any] = field(default_factory=dict)
    reference: dict[str, Any] = field(default_factory=dict)
    candidate: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "failures": list(self.failures),
            "profile": self.profile.to_dict(),
            "checks": [c.to_dict() for c in evaluate_checks(self.overall, self.ap50_gt, self.profile)],
            "overall": self.overall,
            "ap50_gt": self.ap50_gt,
            "notes": self.notes(),
            "settings": self.settings,
            "reference": self.reference,
            "candidate": self.candidate,
            "images": [im.summary() for im in self.images],
            "seconds": round(self.seconds, 3),
        }

    def table(self) -> str:
        """A readable report: one row per image and an overall row, the checks, then the verdict."""
        from cellseg_deploy.tables import format_table

        counts = ("image", "size", "ref", "cand", "matched", "missed", "extra")
        stats = {"max_box_diff": "box max", "p99_box_diff": "box p99", "max_score_diff": "score max"}
        stats |= {"max_mask_prob_diff": "prob max", "p99_mask_prob_diff": "prob p99", "min_iou": "IoU min"}
        stats |= {"mean_iou": "IoU mean", "agreement": "agreement"}
        headers = [*counts, *stats.values()]

        def row(label: str, s: dict[str, Any]) -> list[Any]:
            size = "x".join(str(v) for v in s["size"]) if s.get("size") else ""
            return [label, size, *(s[k] for k in ("n_ref", "n_cand", "matched", "missed", "extra"))] + [
                _f(s[k]) for k in stats
            ]

        rows = [row(im.name or str(im.image_id), im.summary()) for im in self.images]
        rows.append(row("ALL", self.overall))
        st = self.settings

        def who(info: dict[str, Any]) -> str:
            return " ".join(str(info[k]) for k in ("runner", "model") if info.get(k))

        lines = [
            f"parity: candidate {who(self.candidate) or '(unnamed)'} vs reference {who(self.reference) or '(unnamed)'}",
            f"instances scoring >= {st.get('score_thresh')} must agree; same-class pairs need mask IoU >= "
            f"{st.get('min_iou')}; box/score differences in pixels/probability; prob: per pair the largest "
            "mask probability difference (mask head, before pasting)",
            "",
            format_table(rows, headers),
            "",
            format_table(self.checks(), ["check", "value", "limit", "n", "ok"]),
        ]
        gt = self.ap50_gt
        if gt.get("reference") is not None or gt.get("candidate") is not None:
            lines.append(
                f"segm AP50 against the ground truth: reference {_f(gt.get('reference'))}, candidate "
                f"{_f(gt.get('candidate'))} ({gt.get('n_gt')} ground-truth instances; COCOeval cap "
                f"{gt.get('max_dets')} per image and category)"
            )
        lines.extend(f"note: {n}" for n in self.notes())
        lines.append("")
        if self.passed:
            lines.append(f"PASSED (profile {self.profile.name})")
        else:
            lines.append(f"FAILED (profile {self.profile.name}):")
            lines.extend(f"  - {f}" for f in self.failures)
        return "\n".join(lines)

    def notes(self) -> list[str]:
        """What the reader should know beyond the checks: label flips, and checks skipped for want of data."""
        notes = [
            f"{c.key} not judged: {c.skipped}"
            for c in evaluate_checks(self.overall, self.ap50_gt, self.profile)
            if c.skipped and c.value is not None
        ]
        off = unlimited_checks(self.overall, self.ap50_gt, self.profile)
        if off:
            notes.append(
                f"not limited in profile {self.profile.name} (reported, not judged): "
                + ", ".join(f"{c.key} = {_f(c.value)}" for c in off)
            )
        if self.overall.get("class_changed"):
            notes.append(f"{self.overall['class_changed']} missed instance(s) were found with another class")
        skipped = self.overall.get("mask_probs_skipped")
        if skipped:
            scope = (
                "skipped"
                if self.overall.get("p99_mask_prob_diff") is None
                else f"covers the other {self.overall.get('mask_prob_pairs')} pair(s) only"
            )
            notes.append(f"mask probabilities not compared: {skipped}; check p99_mask_prob_diff {scope}")
        return notes

    def checks(self) -> list[list[Any]]:
        """``[check, value, limit, n, ok]`` rows for every limit of the profile (``n``: instances behind it)."""
        return [
            [
                c.key,
                _f(c.value),
                f"{c.op} {c.limit:g}",
                c.n,
                "n/a" if c.value is None or c.skipped else ("yes" if c.ok else "NO"),
            ]
            for c in evaluate_checks(self.overall, self.ap50_gt, self.profile)
        ]


def _f(v: Any) -> Any:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return v


@dataclass(frozen=True)
class Check:
    """One limit of a profile applied to a run.

    Attributes:
        key: the statistic (``missed_frac``, ``agreement``, ...).
        value: its value (``None``: could not be computed, not checked).
        limit, op: the limit and its direction (``"<="`` or ``">="``); ``limit`` ``None``: off in the
            profile (only :func:`unlimited_checks` returns such checks).
        text: what the statistic is, in words, with its counts.
        n: the instances behind it (reference instances for ``missed_frac``, matched pairs for per-pair
            statistics, ground-truth instances for the AP50 gate).
        skipped: why the value is reported but not judged (``""``: judged).
    """

    key: str
    value: float | None
    limit: float | None
    op: str
    text: str
    n: int
    skipped: str = ""

    @property
    def ok(self) -> bool:
        if self.value is None or self.skipped or self.limit is None:
            return True
        return self.value <= self.limit + 1e-12 if self.op == "<=" else self.value >= self.limit - 1e-12

    def to_dict(self) -> dict[str, Any]:
        judged = self.value is not None and not self.skipped
        return {
            "key": self.key,
            "value": self.value,
            "limit": self.limit,
            "op": self.op,
            "n": self.n,
            "judged": judged,
            "ok": self.ok if judged else None,
            "skipped": self.skipped or None,
        }


def evaluate_checks(overall: dict[str, Any], ap50_gt: dict[str, Any], tol: ToleranceProfile) -> list[Check]:
    """Every limit of ``tol`` that is on, applied to the run's overall numbers (a ``None`` value is not
    checked); the statistics whose limit is off are in :func:`unlimited_checks`."""
    return [c for c in _all_checks(overall, ap50_gt, tol) if c.limit is not None]


def unlimited_checks(overall: dict[str, Any], ap50_gt: dict[str, Any], tol: ToleranceProfile) -> list[Check]:
    """The statistics whose limit ``tol`` turns off (``None``): reported, never judged."""
    return [c for c in _all_checks(overall, ap50_gt, tol) if c.limit is None]


def _all_checks(overall: dict[str, Any], ap50_gt: dict[str, Any], tol: ToleranceProfile) -> list[Check]:
    o = overall
    pairs = int(o["matched"])
    gt_diff = ap50_gt.get("diff")
    n_gt = int(ap50_gt.get("n_gt") or 0)
    need_gt = min_gt_for_ap_gate(tol.max_ap50_gt_diff)
    gt_skipped = (
        f"only {n_gt} ground-truth instances, and a tolerance of {tol.max_ap50_gt_diff:g} needs at least "
        f"{need_gt} (one flipped instance moves AP50 by about 1/{n_gt}); compare on more images"
        if gt_diff is not None and n_gt < need_gt
        else ""
    )
    return [
        Check(
            "missed_frac",
            o["missed_frac"],
            tol.max_missed_frac,
            "<=",
            f"{o['missed']} of {o['n_ref']} reference instances have no candidate partner",
            int(o["n_ref"]),
        ),
        Check(
            "extra_frac",
            o["extra_frac"],
            tol.max_extra_frac,
            "<=",
            f"{o['extra']} of {o['n_cand']} candidate instances have no reference partner",
            int(o["n_cand"]),
        ),
        Check(
            "strong_match_frac",
            o["strong_match_frac"],
            tol.min_strong_match_frac,
            ">=",
            f"{o['strong_matched']} of {o['n_ref']} reference instances matched with mask IoU >= {tol.strong_iou:g}",
            int(o["n_ref"]),
        ),
        Check(
            "mean_iou", o["mean_iou"], tol.min_mask_iou_mean, ">=", "mean mask IoU of matched pairs", pairs
        ),
        Check(
            "p1_iou",
            o["p1_iou"],
            tol.min_mask_iou_p1,
            ">=",
            "1st percentile of matched pairs' mask IoU",
            pairs,
        ),
        Check(
            "max_box_diff",
            o["max_box_diff"],
            tol.max_box_diff,
            "<=",
            "largest box coordinate difference (px)",
            pairs,
        ),
        Check(
            "p99_box_diff",
            o["p99_box_diff"],
            tol.max_box_diff_p99,
            "<=",
            "99th percentile box difference (px)",
            pairs,
        ),
        Check(
            "max_score_diff", o["max_score_diff"], tol.max_score_diff, "<=", "largest score difference", pairs
        ),
        Check(
            "p99_mask_prob_diff",
            o.get("p99_mask_prob_diff"),
            tol.max_mask_prob_diff_p99,
            "<=",
            "99th percentile of matched pairs' largest mask probability difference (mask head, before "
            f"pasting; largest {_f(o.get('max_mask_prob_diff'))})",
            int(o.get("mask_prob_pairs") or 0),
        ),
        Check(
            "agreement",
            o["agreement"],
            tol.min_agreement,
            ">=",
            f"F1 of the matching: 2 x {o['matched']} matched / (2 x {o['matched']} + {o['missed']} missed + "
            f"{o['extra']} extra)",
            pairs + int(o["missed"]) + int(o["extra"]),
        ),
        Check(
            "ap50_gt_diff",
            None if gt_diff is None else abs(gt_diff),
            tol.max_ap50_gt_diff,
            "<=",
            f"|segm AP50 against ground truth: candidate {_f(ap50_gt.get('candidate'))} - reference "
            f"{_f(ap50_gt.get('reference'))}|",
            n_gt,
            gt_skipped,
        ),
    ]


def evidence_failure(overall: dict[str, Any], min_instances: int) -> str | None:
    """The one-line failure of a run with too little evidence (``None``: enough was compared)."""
    seen = int(overall["n_ref"]) + int(overall["n_cand"])
    if seen >= min_instances:
        return None
    thresh = overall.get("score_thresh")
    at = f" scoring >= {thresh:g}" if isinstance(thresh, int | float) else ""
    if seen == 0:
        return (
            f"nothing was compared: no instance of either side{at} on {overall.get('images', 0)} image(s); "
            "lower --score-thresh or compare on images with cells"
        )
    return (
        f"too little evidence: {seen} instance(s){at} (reference {overall['n_ref']}, candidate "
        f"{overall['n_cand']}) on {overall.get('images', 0)} image(s), fewer than the {min_instances} a verdict "
        "needs; compare on more images, lower --score-thresh, or set --min-instances"
    )


def judge(
    overall: dict[str, Any],
    ap50_gt: dict[str, Any],
    tol: ToleranceProfile,
    images: list[ImageParity] | None = None,
    min_instances: int = DEFAULT_MIN_INSTANCES,
) -> list[str]:
    """The reasons the run fails ``tol`` (empty list: it passes), each naming the number, the limit and,
    for per-pair statistics, the worst image. A run with less evidence than ``min_instances`` fails with
    that one reason first (:func:`evidence_failure`)."""
    failures = []
    too_little = evidence_failure(overall, min_instances)
    if too_little is not None:
        failures.append(too_little)
    worst_of = {
        "max_box_diff": "max_box_diff",
        "p99_box_diff": "max_box_diff",
        "max_score_diff": "max_score_diff",
        "p99_mask_prob_diff": "max_mask_prob_diff",
        "mean_iou": "min_iou",
        "p1_iou": "min_iou",
    }
    for check in evaluate_checks(overall, ap50_gt, tol):
        if check.ok:
            continue
        where = ""
        if images and check.key in worst_of:
            worst = _worst_image(images, worst_of[check.key], lowest=check.op == ">=")
            if worst is not None:
                where = f"; worst image {worst}"
        elif images and check.key in ("missed_frac", "extra_frac"):
            attr = check.key.split("_")[0]
            counts = sorted(((getattr(im, attr), im.name or str(im.image_id)) for im in images), reverse=True)
            if counts and counts[0][0]:
                where = "; most in " + ", ".join(f"{n} ({c})" for c, n in counts[:3] if c)
        failures.append(
            f"{check.key} = {_f(check.value)} (limit {check.op} {check.limit:g}): {check.text}{where}"
        )
    if failures and overall.get("class_changed"):
        failures.append(
            f"note: {overall['class_changed']} missed reference instance(s) were detected with another class"
        )
    return failures


def _worst_image(images: list[ImageParity], key: str, *, lowest: bool) -> str | None:
    scored = [
        (im.summary()[key], im.name or str(im.image_id)) for im in images if im.summary()[key] is not None
    ]
    if not scored:
        return None
    value, name = min(scored) if lowest else max(scored)
    return f"{name} ({_f(value)})"
