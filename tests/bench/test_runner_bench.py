"""The measurement loop: settings checks, stage accounting, interleaving, time budget, batching."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from cellseg_deploy.backends import Runner, registry
from cellseg_deploy.backends.pytorch.runner import TorchRunner
from cellseg_deploy.bench.models import resolve_engine_models
from cellseg_deploy.bench.runner_bench import (
    ALONE_TOLERANCE,
    BenchSettings,
    _alone,
    _warnings,
    block_schedule,
    parse_engine_specs,
    parse_runner_options,
    run_benchmark,
    split_label,
)
from cellseg_deploy.bench.sample import STAGES, stage_times
from cellseg_deploy.bench.workload import synthetic_workload
from cellseg_deploy.errors import ConfigError, UserError
from cellseg_deploy.structures import Detections

CALLS: list[str] = []


class _LoggedTorch(TorchRunner):
    """The torch runner under another name, logging each call (to see the interleaving)."""

    name = "torch-logged"

    def _infer(self, image: np.ndarray) -> Detections:
        CALLS.append(self.name)
        return super()._infer(image)


class _LoggedTorchB(_LoggedTorch):
    name = "torch-logged-b"


class _OneAtATime(TorchRunner):
    """A runner without its own batching."""

    name = "torch-one-at-a-time"
    _infer_batch = Runner._infer_batch
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)


@pytest.fixture(autouse=True, scope="module")
def _test_runners() -> Any:
    """Register the test runners for this module only (other tests see the real registry)."""
    classes = (_LoggedTorch, _LoggedTorchB, _OneAtATime)
    for cls in classes:
        registry._REGISTERED[cls.name] = cls
    yield
    for cls in classes:
        registry._REGISTERED.pop(cls.name, None)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"iters": 0}, "at least 1"),
        ({"iters": 2, "seconds": 1.0}, "exactly one"),
        ({"batch": 0}, "batch"),
        ({"warmup": -1}, "warm-up"),
        ({"device": "tpu"}, "device"),
        ({"block": 0}, "--block"),
        ({"settle": -1}, "--settle"),
        ({"isolation": "thread"}, "--isolation"),
    ],
)
def test_settings_reject_bad_values(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        BenchSettings(engines=("torch",), **kwargs)


def test_stages_add_up_to_the_total() -> None:
    det = Detections.empty((10, 10))
    det.timings = {"preprocess": 0.001, "network": 0.010, "paste": 0.002, "rle": 0.003, "backbone": 0.007}
    stages, sub = stage_times([det], decode_s=0.004, infer_s=0.015, total_s=0.025)
    assert set(stages) == set(STAGES)
    assert sum(stages.values()) == pytest.approx(0.025)
    assert stages["infer_other"] == pytest.approx(0.004)  # the runner call minus its preprocess and network
    assert stages["other"] == pytest.approx(0.001)
    assert sub == {"backbone": pytest.approx(0.007)}


def test_engine_labels_and_options() -> None:
    assert parse_engine_specs("torch, torch:bf16,onnx") == ("torch", "torch:bf16", "onnx")
    assert split_label("trt:fp16") == ("trt", "fp16")
    with pytest.raises(UserError, match="does not support precision 'fp16'"):
        parse_engine_specs("onnx:fp16")
    with pytest.raises(UserError, match="unknown engine 'nope'"):
        parse_engine_specs("torch,nope")
    with pytest.raises(UserError, match="twice"):
        parse_engine_specs("torch,torch")
    assert parse_runner_options(["onnx.graph_optimization=basic"], ("torch", "onnx")) == {
        "onnx": {"graph_optimization": "basic"}
    }
    with pytest.raises(UserError, match=r"RUNNER\.KEY=VALUE"):
        parse_runner_options(["graph_optimization=basic"], ("onnx",))
    with pytest.raises(UserError, match="not benchmarked"):
        parse_runner_options(["trt.cuda_graphs=true"], ("onnx",))


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory: pytest.TempPathFactory, small_untrained: Path) -> tuple[Path, Any]:
    folder = tmp_path_factory.mktemp("workload")
    return small_untrained, synthetic_workload(folder, 80, 96, 5, images=2, seed=3)


def test_engines_interleave_and_flip_order(tiny_setup: tuple[Path, Any]) -> None:
    ckpt, workload = tiny_setup
    engines = ("torch-logged", "torch-logged-b")
    models = {e: m for e, m in resolve_engine_models(engines, model_for={e: ckpt for e in engines}).items()}
    CALLS.clear()
    settings = BenchSettings(
        engines=engines, warmup=1, iters=2, threads=1, memory=False, progress=False, isolation="shared"
    )
    result = run_benchmark(settings, models, workload)
    a, b = engines
    # warm-up round 0 and measured round 0: A, B per image; measured round 1: B, A per image.
    expected = [*(a, b, a, b), *(a, b, a, b), *(b, a, b, a)]
    assert expected == CALLS
    for name in engines:
        e = result["engines"][name]
        assert e["latency"]["n"] == 4 and len(e["samples_ms"]) == 4
        assert sum(e["stage_mean_ms"].values()) == pytest.approx(e["latency"]["mean_ms"], rel=1e-6)
        assert e["detections_per_image"] == {"mean": 6.0, "min": 6.0, "max": 6.0}
        assert [p["image"] for p in e["per_image"]] == [im.name for im in workload.images]
        assert e["memory"] == {"skipped": "memory probes were not asked for"}
    assert result["engines"][a]["speedup_vs_torch"] is None  # no engine named torch in this run


def test_blocks_run_each_engine_back_to_back_after_settling(tiny_setup: tuple[Path, Any]) -> None:
    ckpt, workload = tiny_setup
    engines = ("torch-logged", "torch-logged-b")
    models = {e: m for e, m in resolve_engine_models(engines, model_for={e: ckpt for e in engines}).items()}
    CALLS.clear()
    settings = BenchSettings(
        engines=engines,
        warmup=0,
        iters=3,
        block=2,
        settle=1,
        threads=1,
        memory=False,
        progress=False,
        isolation="shared",
    )
    result = run_benchmark(settings, models, workload)
    a, b = engines
    # block 0: A settles once then 2 rounds x 2 images, then B; block 1 (the last round): B first, then A
    expected = [a, *(a,) * 4, b, *(b,) * 4, b, b, b, a, a, a]
    assert expected == CALLS
    for name in engines:  # the settling calls are not samples
        assert result["engines"][name]["latency"]["n"] == 3 * len(workload.images)


def test_block_schedule_of_one_round_is_the_plain_interleaving() -> None:
    engines = ("a", "b", "c")
    assert list(block_schedule(engines, 2, 5, 1, 1, 0)) == [
        ("c", 0, 5, True),
        ("b", 0, 5, True),
        ("a", 0, 5, True),
        ("c", 1, 5, True),
        ("b", 1, 5, True),
        ("a", 1, 5, True),
    ]
    calls = list(block_schedule(("a", "b"), 1, 0, 2, 0, 1))
    assert calls == [
        *[("a", 0, -1, False), ("a", 0, 0, True), ("a", 0, 1, True)],
        *[("b", 0, -1, False), ("b", 0, 0, True), ("b", 0, 1, True)],
    ]


def test_time_budget_runs_whole_rounds(tiny_setup: tuple[Path, Any]) -> None:
    ckpt, workload = tiny_setup
    models = resolve_engine_models(["torch"], checkpoint=ckpt)
    settings = BenchSettings(
        engines=("torch",), warmup=0, iters=None, seconds=1e-3, threads=1, memory=False, progress=False
    )
    result = run_benchmark(settings, models, workload)
    assert result["rounds_measured"] >= 1
    assert result["engines"]["torch"]["latency"]["n"] == result["rounds_measured"] * len(workload.images)
    assert result["engines"]["torch"]["speedup_vs_torch"] == {"mean": 1.0, "p50": 1.0}


def test_batch_needs_a_batching_runner(tiny_setup: tuple[Path, Any]) -> None:
    ckpt, workload = tiny_setup
    models = resolve_engine_models(["torch-one-at-a-time"], model_for={"torch-one-at-a-time": ckpt})
    settings = BenchSettings(
        engines=("torch-one-at-a-time",),
        warmup=0,
        iters=1,
        batch=2,
        memory=False,
        progress=False,
        isolation="shared",  # a runner registered in this test exists in this process only
    )
    with pytest.raises(UserError, match="one at a time"):
        run_benchmark(settings, models, workload)


def test_batched_torch_reports_per_batch(tiny_setup: tuple[Path, Any]) -> None:
    ckpt, workload = tiny_setup
    models = resolve_engine_models(["torch"], checkpoint=ckpt)
    settings = BenchSettings(
        engines=("torch",), warmup=0, iters=2, batch=2, threads=1, memory=False, progress=False
    )
    result = run_benchmark(settings, models, workload)
    e = result["engines"]["torch"]
    assert result["latency_unit"] == "per batch of 2 images"
    assert e["latency"]["n"] == 2 and e["latency"]["images_per_sample"] == 2
    assert e["detections_per_image"]["mean"] == 6.0


def _result_with(run_p50: float, alone_p50: float | None) -> dict[str, Any]:
    memory = (
        {} if alone_p50 is None else {"alone_latency": {"n": 20, "p50_ms": alone_p50, "mean_ms": alone_p50}}
    )
    entry = {
        "latency": {"n": 20, "p50_ms": run_p50},
        "detections_per_image": {"mean": 5.0, "min": 5.0, "max": 5.0},
        "memory": memory,
        "model": {},
        "alone": _alone(run_p50, memory),
    }
    return {"environment": {"cpu": {"logical_cores": 2}}, "engines": {"onnx": entry}}


@pytest.mark.parametrize(
    "run_p50, alone_p50, warned",
    [
        (100.0, 100.0, False),  # identical: no warning, ratio exactly 1
        (104.9, 100.0, False),
        (100.0 * (1 + ALONE_TOLERANCE) + 0.1, 100.0, True),  # slowed by the company in the run
        (90.0, 100.0, True),  # faster in the run than alone is off too
    ],
)
def test_run_warns_when_an_engine_is_off_its_time_alone(
    run_p50: float, alone_p50: float, warned: bool
) -> None:
    result = _result_with(run_p50, alone_p50)
    assert result["engines"]["onnx"]["alone"]["run_over_alone"] == pytest.approx(run_p50 / alone_p50)
    if run_p50 == alone_p50:
        assert result["engines"]["onnx"]["alone"]["run_over_alone"] == 1.0
    hits = [w for w in _warnings(result) if "alone in a fresh process" in w]
    assert bool(hits) == warned, hits


def test_no_alone_figure_without_a_timed_probe() -> None:
    assert _alone(100.0, None) is None
    assert _alone(100.0, {"error": "memory probe exited with code 1: boom"}) is None
    assert _alone(100.0, {"alone_latency": {"n": 0, "p50_ms": 0.0, "mean_ms": 0.0}}) is None
    assert not [w for w in _warnings(_result_with(100.0, None)) if "alone" in w]


def test_an_engine_process_that_cannot_load_is_a_one_line_error(tmp_path: Path) -> None:
    from cellseg_deploy.bench.engine_process import EngineProcess

    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not a model")
    spec = {
        "engine": "onnx",
        "label": "onnx",
        "model_path": str(bad),
        "device": "cpu",
        "precision": "fp32",
        "threads": 1,
        "batch": 1,
        "options": {},
        "post": {},
    }
    with pytest.raises(UserError, match="engine 'onnx': ONNX Runtime cannot load") as info:
        EngineProcess(spec)
    assert "\n" not in str(info.value)
