"""Tolerance profiles of a parity verdict, one per candidate precision, as data.

Each profile is a :class:`ToleranceProfile`; :data:`PROFILES` is the table, strictest first. A limit set to
``None`` is off: the statistic is still computed and reported, but not judged (the report says so). How the
numbers were chosen, with the measurements behind them, is in docs/export.md ("How the tolerances were
chosen"); the comments here keep only the reason for each limit.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from cellseg_deploy.errors import ConfigError

DEFAULT_SCORE_THRESH = 0.5
DEFAULT_MIN_INSTANCES = 20
"""Fewest instances (reference and candidate together, scoring ``>= score_thresh``) a verdict may rest on."""

AP_GATE_FLIPS_PER_TOLERANCE = 2
"""The AP50-difference gate needs ``n_gt >= this / tolerance`` ground-truth instances: one flipped instance
moves AP50 by about ``1 / n_gt``, at most half the tolerance then."""

OFF = ("off", "none")
"""``--tol KEY=off`` (or ``none``) turns a limit off."""


@dataclass(frozen=True)
class ToleranceProfile:
    """Limits that decide a parity verdict, for the whole run (all images together); ``None``: not judged.

    Fractions are of the reference's instances scoring ``>= score_thresh`` (``extra``: of the candidate's).

    Attributes:
        name: the profile's name (``fp32``, ``fp16``, ``bf16``, ``int8``; ``+custom`` after overrides).
        max_missed_frac: reference instances with no candidate partner.
        max_extra_frac: candidate instances with no reference partner.
        strong_iou: the mask IoU that makes a match "strong" (a setting, always set).
        min_strong_match_frac: reference instances matched with mask IoU ``>= strong_iou``.
        min_mask_iou_mean: mean mask IoU of matched pairs.
        min_mask_iou_p1: 1st percentile of matched pairs' mask IoU.
        max_box_diff: largest coordinate difference of a matched pair, pixels.
        max_box_diff_p99: 99th percentile of the pairs' largest coordinate difference, pixels.
        max_score_diff: largest score difference of a matched pair.
        max_mask_prob_diff_p99: 99th percentile over matched pairs of the pair's largest mask probability
            difference (``M x M`` mask head output, before pasting); skipped where either side carries no
            mask probabilities.
        min_agreement: F1 of the optimal matching, ``2 * matched / (2 * matched + missed + extra)``
            (exactly 1.0 for identical instances).
        max_ap50_gt_diff: ``|AP50(candidate) - AP50(reference)|`` against the dataset's ground truth, judged
            only with at least :func:`min_gt_for_ap_gate` ground-truth instances.
    """

    name: str
    max_missed_frac: float | None
    max_extra_frac: float | None
    strong_iou: float
    min_strong_match_frac: float | None
    min_mask_iou_mean: float | None
    min_mask_iou_p1: float | None
    max_box_diff: float | None
    max_box_diff_p99: float | None
    max_score_diff: float | None
    max_mask_prob_diff_p99: float | None
    min_agreement: float | None
    max_ap50_gt_diff: float | None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name == "name":
                continue
            value = getattr(self, f.name)
            if value is None and f.name != "strong_iou":
                continue
            if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"tolerance {f.name}: expected a non-negative number, got {value!r}")
            if (
                f.name.endswith("_frac") or "iou" in f.name or "ap50" in f.name or "prob" in f.name
            ) and value > 1:
                raise ConfigError(f"tolerance {f.name}: expected a value in [0, 1], got {value}")

    def with_overrides(self, overrides: dict[str, Any]) -> ToleranceProfile:
        """A copy with some limits replaced (values may be strings, as from ``--tol key=value``; ``off`` or
        ``None`` turns a limit off).

        Raises:
            ConfigError: an unknown key or a value that is not a number.
        """
        if not overrides:
            return self
        keys = [f.name for f in dataclasses.fields(self) if f.name != "name"]
        changes: dict[str, Any] = {}
        for key, value in overrides.items():
            if key not in keys:
                raise ConfigError(f"unknown tolerance {key!r}; expected one of {', '.join(keys)}")
            if value is None or (isinstance(value, str) and value.strip().lower() in OFF):
                if key == "strong_iou":
                    raise ConfigError("tolerance strong_iou: a setting, it cannot be off; expected a number")
                changes[key] = None
                continue
            try:
                changes[key] = float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"tolerance {key}: expected a number (or 'off'), got {value!r}") from None
        return dataclasses.replace(self, name=f"{self.name}+custom", **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FP32 = ToleranceProfile(
    name="fp32",
    # Same arithmetic, different kernels: every difference is rounding noise, so any lost, added or moved
    # instance is a defect.
    max_missed_frac=0.01,
    max_extra_frac=0.01,
    strong_iou=0.95,
    min_strong_match_frac=0.99,
    min_mask_iou_mean=0.98,
    min_mask_iou_p1=0.90,
    max_box_diff=1.0,  # one pixel: a box edge may round the other way, no more
    max_box_diff_p99=0.25,
    max_score_diff=0.01,
    # As strict as the exporter's own check on the raw outputs, and far below what mask logits scaled by
    # 2 or 0.5 inside the graph give (every pair moves).
    max_mask_prob_diff_p99=0.01,
    min_agreement=0.99,
    max_ap50_gt_diff=0.002,
)

FP16 = ToleranceProfile(
    name="fp16",
    # Half precision in the network (11-bit mantissa): scores move by about 1e-2 and boxes by a pixel or two;
    # a few near-threshold instances may come and go.
    max_missed_frac=0.03,
    max_extra_frac=0.03,
    strong_iou=0.95,
    min_strong_match_frac=0.95,
    min_mask_iou_mean=0.95,
    min_mask_iou_p1=0.80,
    max_box_diff=4.0,
    max_box_diff_p99=1.5,
    # Allows one near-tie swapped by NMS; the AP50 limit is what keeps the run honest.
    max_score_diff=0.10,
    # Twice the worst p99 seen with fp16 weights or activations, never stricter than fp32, and still well
    # below scaled mask logits.
    max_mask_prob_diff_p99=0.02,
    min_agreement=0.97,
    max_ap50_gt_diff=0.01,
)

BF16 = ToleranceProfile(
    name="bf16",
    # bfloat16 (8-bit mantissa) moves individual small cells a lot but not the result: the per-pair extremes
    # are reported but loosely bounded, and the AP50 limit ("within 0.01 of PyTorch's") carries the verdict.
    max_missed_frac=0.05,
    max_extra_frac=0.05,
    strong_iou=0.85,
    min_strong_match_frac=0.65,
    min_mask_iou_mean=0.85,
    min_mask_iou_p1=0.50,
    max_box_diff=16.0,
    max_box_diff_p99=8.0,
    max_score_diff=None,  # off: single NMS near-ties flip by most of the score range; AP50 judges them
    # Off: ordinary bf16 noise on the mask probabilities is as large as scaled mask logits, so no limit on
    # this statistic separates a defect from precision.
    max_mask_prob_diff_p99=None,
    min_agreement=0.95,
    max_ap50_gt_diff=0.01,
)

INT8 = ToleranceProfile(
    name="int8",
    # int8 convolutions and matrix products (OpenVINO IR from `export --format openvino-int8`), the rest
    # bf16: bf16's limits, a little looser where quantisation adds to it.
    max_missed_frac=0.08,
    max_extra_frac=0.08,
    strong_iou=0.85,
    min_strong_match_frac=0.60,
    min_mask_iou_mean=0.85,
    min_mask_iou_p1=0.50,
    max_box_diff=16.0,
    max_box_diff_p99=8.0,
    max_score_diff=None,  # off, as for bf16
    max_mask_prob_diff_p99=None,  # off, as for bf16
    min_agreement=0.92,
    max_ap50_gt_diff=0.015,
)

PROFILES: dict[str, ToleranceProfile] = {p.name: p for p in (FP32, FP16, BF16, INT8)}
"""Tolerance profiles by the candidate's precision (strictest first)."""


def min_gt_for_ap_gate(tolerance: float | None) -> int:
    """Ground-truth instances the AP50-difference gate needs at ``tolerance`` (``None``: the gate is off)."""
    if tolerance is None or tolerance <= 0:
        return 0  # a zero tolerance is a request for an exact comparison, whatever the count
    return math.ceil(AP_GATE_FLIPS_PER_TOLERANCE / tolerance - 1e-9)


def get_profile(name: str, overrides: dict[str, Any] | None = None) -> ToleranceProfile:
    """The named profile with optional overrides; unknown names raise :class:`ConfigError` listing the choices."""
    if name not in PROFILES:
        raise ConfigError(f"unknown tolerance profile {name!r}; expected one of {', '.join(PROFILES)}")
    return PROFILES[name].with_overrides(overrides or {})


def parse_tolerances(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``["max_box_diff=1.0", ...]`` -> ``{"max_box_diff": "1.0"}``; malformed items raise :class:`ConfigError`."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(f"tolerance {item!r}: expected KEY=VALUE, e.g. max_box_diff=1.0")
        out[key.strip()] = value.strip()
    return out
