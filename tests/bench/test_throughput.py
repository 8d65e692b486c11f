"""``bench --mode throughput``: each engine alone through predict's pipelined loop, images per second on the
wall clock with the latency under that load, in the same result, tables and plots as latency mode."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cellseg_deploy.bench.models import resolve_engine_models
from cellseg_deploy.bench.report import format_text_report, write_report
from cellseg_deploy.bench.runner_bench import STAGES, BenchSettings, run_benchmark
from cellseg_deploy.bench.workload import synthetic_workload
from cellseg_deploy.errors import ConfigError, UserError


@pytest.fixture(scope="module")
def onnx_setup(small_untrained: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Any]:
    """The 6-detection tiny model as ONNX (exported once) and three synthetic 128 px images."""
    cache = tmp_path_factory.mktemp("tp-cache")
    models = resolve_engine_models(("onnx",), checkpoint=small_untrained, cache_dir=cache)
    workload = synthetic_workload(cache / "images", 128, 128, 6, images=3, seed=0)
    return models, workload


@pytest.mark.parametrize("concurrency", [1, 2])
def test_throughput_mode_counts_images_on_the_wall_clock(
    onnx_setup: tuple[dict[str, Any], Any], concurrency: int, tmp_path: Path
) -> None:
    models, workload = onnx_setup
    settings = BenchSettings(
        engines=("onnx",),
        warmup=1,
        iters=3,
        threads=1,
        memory=False,
        progress=False,
        mode="throughput",
        concurrency=concurrency,
        workers=2,
    )
    result = run_benchmark(settings, models, workload)
    e = result["engines"]["onnx"]
    tp = e["throughput"]
    assert tp["images"] == 9 and tp["concurrency"] == concurrency and tp["inference_handles"] == concurrency
    assert tp["images_per_s"] == pytest.approx(9 / tp["seconds"], rel=1e-3)
    assert e["latency"]["throughput_ips"] == tp["images_per_s"]  # what the tables' throughput column shows
    assert e["latency"]["n"] == 9, "one latency sample per image of the measured passes, warm-up excluded"
    # every image's latency under load is at most the wall time of the whole measurement (the last image can
    # wait in the queue for nearly all of it; "seconds" is rounded to the millisecond)
    assert max(e["samples_ms"]) <= tp["seconds"] * 1e3 + 0.5 + 1e-6
    assert sum(e["stage_mean_ms"][s] for s in STAGES) == pytest.approx(e["latency"]["mean_ms"], rel=1e-6)
    assert e["detections_per_image"] == {"mean": 6.0, "min": 6.0, "max": 6.0}
    assert [p["image"] for p in e["per_image"]] == [im.name for im in workload.images]
    assert result["latency_unit"] == "per image, under the throughput load"
    text = format_text_report(result)
    assert f"mode throughput (host workers 2, concurrency {concurrency})" in text
    outputs = write_report(result, tmp_path)
    assert Path(outputs["json"]).is_file() and outputs["plots"]


def test_throughput_mode_by_time_budget_runs_whole_passes(onnx_setup: tuple[dict[str, Any], Any]) -> None:
    models, workload = onnx_setup
    settings = BenchSettings(
        engines=("onnx",), warmup=0, iters=None, seconds=0.5, threads=1, memory=False, progress=False,
        mode="throughput",
    )  # fmt: skip
    e = run_benchmark(settings, models, workload)["engines"]["onnx"]
    assert e["throughput"]["images"] % 3 == 0 and e["throughput"]["images"] >= 3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mode": "fast"}, "--mode"),
        ({"concurrency": 2}, "belong to --mode throughput"),
        ({"mode": "throughput", "workers": 0, "concurrency": 2}, "needs host workers"),
        ({"mode": "throughput", "concurrency": 0}, "at least 1"),
    ],
)
def test_throughput_settings_refuse_nonsense(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        BenchSettings(engines=("onnx",), **kwargs)


def test_throughput_batch_needs_a_batching_runner(onnx_setup: tuple[dict[str, Any], Any]) -> None:
    models, workload = onnx_setup
    settings = BenchSettings(
        engines=("onnx",), iters=1, memory=False, progress=False, mode="throughput", batch=2
    )  # fmt: skip
    with pytest.raises(UserError, match="one at a time"):
        run_benchmark(settings, models, workload)


def test_throughput_workers_default_to_predicts() -> None:
    """The loop predict runs by default: no host workers on the CPU, two with concurrency or on CUDA."""
    assert BenchSettings(engines=("onnx",), mode="throughput").workers == 0
    assert BenchSettings(engines=("onnx",), mode="throughput", concurrency=2).workers == 2
    assert BenchSettings(engines=("onnx",)).workers is None  # latency mode has none
