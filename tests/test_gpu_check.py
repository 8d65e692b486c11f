"""``benchmarks/gpu_check.py --dry-run``: the GPU acceptance check's orchestration on the CPU, with the
TensorRT test double installed so that its TensorRT steps run too, and without it (skipped, with the
reason)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tests.trt_double import trt_double  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


def test_dry_run_with_the_trt_double_runs_every_step(trt_double, tmp_path: Path) -> None:  # noqa: F811
    gpu_check = load_script()
    trt_double()
    code = gpu_check.main(["--dry-run", "--out", str(tmp_path / "check")])
    report = json.loads((tmp_path / "check" / "report.json").read_text())
    statuses = {s["name"]: s["status"] for s in report["steps"]}
    assert code == 0 and report["passed"], statuses
    assert all(status == "passed" for status in statuses.values()), statuses
    assert report["dry_run"] and report["tensorrt"] == "10.16.0.72"
    bench = next(s for s in report["steps"] if s["name"].startswith("bench"))
    assert set(bench["data"]["p50_ms"]) == {"torch", "staged-torch:fp16", "trt", "trt:fp16"}
    parity = [s for s in report["steps"] if s["name"].startswith("trt ")]
    assert len(parity) == 2 and all(s["data"]["passed"] for s in parity)
    md = (tmp_path / "check" / "report.md").read_text()
    assert (
        "GPU acceptance check (dry run on the CPU)" in md
        and "| trt fp16: engines, parity, AP50 | passed |" in md
    )


def test_plan_without_tensorrt_says_what_is_skipped_and_why(tmp_path: Path) -> None:
    gpu_check = load_script()
    from cellseg_deploy.backends.tensorrt.build import trt_unavailable_reason

    reason = trt_unavailable_reason()
    if reason is None:
        pytest.skip("TensorRT runs here")
    plan = gpu_check.make_plan(tmp_path, dry_run=False)
    assert plan.device == "cuda" and plan.trt_reason == reason and not plan.has_trt
    assert plan.bench_cases == ((512, 150), (800, 500)) and plan.bench_iters == 20
    dry = gpu_check.make_plan(tmp_path, dry_run=True)
    assert dry.device == "cpu" and dry.bench_iters == 1
