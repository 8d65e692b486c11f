"""``benchmarks/check_outside.py --mode throughput``: the benchmark's images/s against predict_folder's."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from cellseg_deploy.bench.models import build_untrained_checkpoint, resolve_engine_models
from cellseg_deploy.bench.workload import synthetic_workload
from cellseg_deploy.evaluation.pipeline import PipelineSettings

_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "check_outside.py"
_spec = importlib.util.spec_from_file_location("check_outside", _SCRIPT)
assert _spec is not None and _spec.loader is not None
check_outside_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_outside_module)
check_outside = check_outside_module.check_outside
format_check = check_outside_module.format_check


@pytest.mark.slow
def test_throughput_mode_compares_images_per_second_through_the_same_loop(tmp_path: Path) -> None:
    ckpt = build_untrained_checkpoint(tmp_path / "tiny.pt", "tiny", 10)
    model = resolve_engine_models(["onnx"], checkpoint=ckpt, cache_dir=tmp_path / "cache")["onnx"]
    images = synthetic_workload(tmp_path / "images", 160, 160, 10, images=2).images[0].path.parent
    result = check_outside(
        "onnx", model, images, rounds=1, blocks=1, warmup=1, mode="throughput",
        pipeline=PipelineSettings(workers=1),
    )  # fmt: skip
    assert result["mode"] == "throughput" and result["images"] == 2
    assert result["pipeline"] == {"workers": 1, "concurrency": 1, "batch": 1}
    bench, outside = result["bench_images_per_s"], result["outside_images_per_s"]
    assert bench > 0 and outside > 0
    assert result["relative_difference"] == pytest.approx((bench - outside) / outside, abs=1e-3)
    assert result["passed"] == (abs(result["relative_difference"]) <= result["tolerance"])
    assert "images/s" in format_check(result)
