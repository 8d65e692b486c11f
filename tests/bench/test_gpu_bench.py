"""The benchmark on a CUDA device: synchronised timing, CUDA events, device memory, GPU environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from cellseg_deploy.bench.models import resolve_engine_models
from cellseg_deploy.bench.runner_bench import BenchSettings, run_benchmark
from cellseg_deploy.bench.workload import synthetic_workload


@pytest.mark.gpu
def test_torch_on_cuda_reports_device_time_and_memory(small_untrained: Path, tmp_path: Path) -> None:
    workload = synthetic_workload(tmp_path / "w", 128, 160, 6, images=1)
    models = resolve_engine_models(["torch"], checkpoint=small_untrained)
    settings = BenchSettings(
        engines=("torch",), warmup=1, iters=3, device="cuda", memory=True, progress=False
    )
    result = run_benchmark(settings, models, workload)
    gpu = result["environment"]["gpu"]
    assert gpu["available"] and gpu["name"] and gpu["compute_capability"]
    e = result["engines"]["torch"]
    assert e["detections_per_image"]["mean"] == 6.0
    assert e["cuda_torch_peak_allocated_mb"] > 0
    assert 0 < e["cuda_events_infer_ms"]["mean_ms"] <= e["latency"]["mean_ms"]
    assert e["memory"]["cuda_torch_peak_allocated_mb"] > 0
    assert "cuda_device_used_peak_over_baseline_mb" in e["memory"]
    assert e["cuda_graphs"] is False
