"""The benchmark report's pictures: outliers cannot flatten the boxes, sweep plots only from sweeps, readable
stage names with the staged host steps shown as such, the real thread count in the titles.

Results are the saved JSON of real benchmark runs (``benchmarks/results``), altered where a case needs it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from cellseg_deploy.bench.report import (
    STAGE_LABELS,
    can_plot_against,
    distribution_top,
    plot_distribution,
    plot_stages,
    stage_segments,
    threads_text,
    write_plots,
)

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def _load(name: str) -> dict:
    path = RESULTS / name / "bench.json"
    if not path.is_file():
        pytest.skip(f"{path} is not in this checkout")
    return json.loads(path.read_text())


def test_one_outlier_does_not_set_the_latency_axis(tmp_path: Path) -> None:
    result = _load("tiny_512-150")
    samples = result["engines"]["onnx"]["samples_ms"]
    outlier = 20 * max(samples)
    result["engines"]["onnx"]["samples_ms"] = [*samples, outlier]  # one sample 20x the slowest
    ordinary = max(max(e["samples_ms"]) for n, e in result["engines"].items() if n != "onnx")
    top = distribution_top([e["samples_ms"] for e in result["engines"].values()])
    assert max(ordinary, max(samples)) <= top < outlier / 5  # every ordinary sample shown, the outlier not
    assert plot_distribution(result, tmp_path / "d.png").stat().st_size > 5000


def test_no_latency_against_cells_or_size_without_a_sweep() -> None:
    """An ordinary run's images differ in size and detections; joining them is not a trend."""
    result = _load("tiny_512-150")
    entry = result["engines"]["torch"]
    first = entry["per_image"][0]
    other = copy.deepcopy(first) | {"image": "b", "height": 1024, "width": 900, "detections": 40.0}
    for e in result["engines"].values():
        e["per_image"] = [copy.deepcopy(first), other]
    assert not can_plot_against(result, "cells")
    assert not can_plot_against(result, "size")
    sweeps = _load("tiny_sweeps")
    assert can_plot_against(sweeps, "cells") and can_plot_against(sweeps, "size")


def test_write_plots_writes_sweep_plots_only_for_sweeps(tmp_path: Path) -> None:
    plain = {p.name for p in write_plots(_load("tiny_512-150"), tmp_path / "plain")}
    swept = {p.name for p in write_plots(_load("tiny_sweeps"), tmp_path / "swept")}
    assert plain == {"latency_distribution.png", "stage_breakdown.png"}
    assert {"latency_vs_cells.png", "latency_vs_size.png"} <= swept


def test_staged_host_steps_are_carved_out_of_infer_other(tmp_path: Path) -> None:
    result = _load("tiny_512-150")
    entry = result["engines"]["onnx"]
    staged = copy.deepcopy(entry)
    staged["stage_mean_ms"]["infer_other"] = 30.0
    staged["substages"] = {
        k: {"mean_ms": v} for k, v in (("rpn_post", 10.0), ("box_post", 12.0), ("mask_post", 5.0))
    }
    seg = stage_segments(staged)
    assert seg["host_steps"] == pytest.approx(27.0)
    assert seg["infer_other"] == pytest.approx(3.0)
    assert sum(seg.values()) == pytest.approx(sum(staged["stage_mean_ms"].values()))
    assert "host" in STAGE_LABELS["host_steps"] and "infer_other" not in STAGE_LABELS.values()
    result["engines"]["staged-onnx"] = staged
    assert plot_stages(result, tmp_path / "s.png").stat().st_size > 5000


def test_titles_say_the_thread_count_in_force() -> None:
    result = _load("tiny_512-150")
    result["settings"]["threads"] = None
    for e in result["engines"].values():
        e["info"]["threads"] = None
    result["environment"]["threads"]["torch_intra_op"] = 2
    text = threads_text(result)
    assert "2" in text and text != "default"
    result["settings"]["threads"] = 3
    assert threads_text(result) == "3"


def test_training_curves_carry_the_learning_rate(tmp_path: Path) -> None:
    from cellseg_deploy.plots import add_learning_rate, new_figure
    from cellseg_deploy.training.loop import plot_curves

    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    twin = add_learning_rate(ax, [10, 20, 30], [0.001, 0.02, 0.005])
    assert list(twin.lines[0].get_ydata()) == [0.001, 0.02, 0.005]
    assert "learning rate" in twin.get_ylabel()
    records = [
        {"kind": "train", "step": s, "epoch_float": s / 10, "lr": lr, "loss": 3.0 / s, "loss_mask": 1.0 / s}
        for s, lr in ((10, 0.001), (20, 0.02), (30, 0.005))
    ]
    assert plot_curves(records, tmp_path / "curves.png").stat().st_size > 5000
