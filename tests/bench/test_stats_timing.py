"""Statistics and timers: exact values on known samples, synchronisation at both ends of an interval."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from cellseg_deploy.bench.environment import capture_environment
from cellseg_deploy.bench.stats import Summary, relative_difference, summarize
from cellseg_deploy.bench.timing import Stopwatch, device_synchronizer, time_calls


def test_summarize_known_samples() -> None:
    samples = [0.010, 0.020, 0.030, 0.040, 0.100]  # seconds
    s = summarize(samples)
    ms = np.array(samples) * 1e3
    assert s.n == 5
    assert s.min_ms == pytest.approx(10.0) and s.max_ms == pytest.approx(100.0)
    assert s.mean_ms == pytest.approx(40.0)
    assert s.std_ms == pytest.approx(float(np.std(ms, ddof=1)))
    assert s.p50_ms == pytest.approx(30.0)
    assert s.p90_ms == pytest.approx(float(np.percentile(ms, 90)))
    assert s.p99_ms == pytest.approx(float(np.percentile(ms, 99)))
    assert s.throughput_ips == pytest.approx(5 / 0.2)
    assert Summary.from_dict(s.to_dict()) == s


def test_summarize_batches_and_single_sample() -> None:
    s = summarize([0.5, 0.5], images_per_sample=4)
    assert s.throughput_ips == pytest.approx(8.0)
    one = summarize([0.25])
    assert one.std_ms == 0.0 and one.p99_ms == pytest.approx(250.0)


@pytest.mark.parametrize("bad", [[], [-0.1], [float("nan")]])
def test_summarize_rejects_bad_samples(bad: list[float]) -> None:
    with pytest.raises(ValueError):
        summarize(bad)


def test_relative_difference() -> None:
    assert relative_difference(110.0, 100.0) == pytest.approx(0.10)
    assert relative_difference(0.0, 0.0) == 0.0


def test_stopwatch_syncs_at_both_ends_and_accumulates() -> None:
    events: list[str] = []
    sw = Stopwatch(lambda: events.append("sync"))
    with sw.interval("a"):
        events.append("work")
        time.sleep(0.01)
    with sw.interval("a"):
        time.sleep(0.01)
    assert events[:3] == ["sync", "work", "sync"]
    assert len(events) == 5
    assert sw.durations["a"] >= 0.02
    assert sw.total() == pytest.approx(sw.durations["a"])


def test_time_calls_excludes_warmup() -> None:
    calls = []
    out = time_calls(lambda: calls.append(1), iters=3, warmup=2)
    assert len(out) == 3 and len(calls) == 5 and all(t >= 0 for t in out)
    with pytest.raises(ValueError):
        time_calls(lambda: None, iters=0)


def test_cpu_synchronizer_is_a_no_op() -> None:
    assert device_synchronizer("cpu")() is None


def test_environment_has_what_a_reader_needs() -> None:
    env = capture_environment("cpu", threads=2)
    json.dumps(env)  # plain JSON values only
    assert env["cpu"]["model"] and env["cpu"]["logical_cores"] >= 1
    assert env["threads"]["requested"] == 2
    assert env["versions"]["python"] and env["versions"]["torch"] and env["versions"]["onnxruntime"]
    assert "tensorrt" in env["versions"] and "openvino" in env["versions"]  # None when not installed
    assert env["os"] and env["memory_total_mb"] > 0
    assert env["gpu"] is None
