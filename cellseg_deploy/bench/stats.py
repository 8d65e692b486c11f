"""Summary statistics of latency samples.

Samples are wall-clock durations in **seconds** (one per measured call); summaries are reported in
**milliseconds**, with throughput in images per second.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

PERCENTILES: tuple[int, ...] = (50, 90, 99)


@dataclass(frozen=True)
class Summary:
    """Statistics of ``n`` latency samples.

    Attributes:
        n: number of samples.
        min_ms / mean_ms / std_ms / p50_ms / p90_ms / p99_ms / max_ms: milliseconds; ``std_ms`` is the sample
            standard deviation (``ddof=1``, 0 for one sample); percentiles interpolate linearly between
            order statistics (numpy's default), so ``p99_ms`` of fewer than 100 samples lies near the maximum.
        throughput_ips: images per second, ``images / sum(samples)`` (sequential execution, one stream).
        images_per_sample: images processed in each sample (the batch size).
    """

    n: int
    min_ms: float
    mean_ms: float
    std_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    throughput_ips: float
    images_per_sample: int = 1

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Summary:
        """Inverse of :meth:`to_dict`."""
        return cls(**data)


def summarize(samples_s: Sequence[float], images_per_sample: int = 1) -> Summary:
    """Summarise latency samples given in seconds.

    Args:
        samples_s: one duration per measured call, seconds, each ``>= 0``; at least one.
        images_per_sample: images each call processed (batch size), for the throughput.

    Raises:
        ValueError: no samples, a negative or non-finite sample, or ``images_per_sample < 1``.
    """
    if len(samples_s) == 0:
        raise ValueError("summarize needs at least one sample")
    if images_per_sample < 1:
        raise ValueError(f"images_per_sample must be at least 1, got {images_per_sample}")
    ms = np.asarray(samples_s, dtype=np.float64) * 1e3
    if not np.all(np.isfinite(ms)) or np.any(ms < 0):
        raise ValueError("latency samples must be finite and non-negative")
    p50, p90, p99 = (float(v) for v in np.percentile(ms, PERCENTILES))
    total_s = float(ms.sum()) / 1e3
    return Summary(
        n=int(ms.size),
        min_ms=float(ms.min()),
        mean_ms=float(ms.mean()),
        std_ms=float(ms.std(ddof=1)) if ms.size > 1 else 0.0,
        p50_ms=p50,
        p90_ms=p90,
        p99_ms=p99,
        max_ms=float(ms.max()),
        throughput_ips=(images_per_sample * ms.size / total_s) if total_s > 0 else math.inf,
        images_per_sample=images_per_sample,
    )


def relative_difference(value: float, reference: float) -> float:
    """``(value - reference) / reference``; ``inf`` when the reference is 0 and the value is not."""
    if reference == 0:
        return 0.0 if value == 0 else math.inf
    return (value - reference) / reference
