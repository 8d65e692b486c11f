"""The demo measures every backend installed here and says which it skipped and why."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from cellseg_deploy.backends import get_runner_class, list_runners
from cellseg_deploy.bench.runner_bench import parse_engine_specs, split_label
from cellseg_deploy.demo import DEMO_ENGINES, _summary_rows


def test_the_demo_names_every_runner_and_precision_worth_deploying() -> None:
    assert parse_engine_specs(",".join(DEMO_ENGINES)) == DEMO_ENGINES  # all known, none twice
    for label in ("torch", "onnx", "openvino", "openvino:bf16", "openvino:int8", "staged-onnx", "trt:fp16"):
        assert label in DEMO_ENGINES
    deployable = set(list_runners()) - {"staged-torch"}  # staged-torch: the FP16 reference of the stages
    assert deployable <= {split_label(e)[0] for e in DEMO_ENGINES}


def test_openvino_runs_when_it_imports_and_tensorrt_says_why_not() -> None:
    openvino = get_runner_class("openvino").unavailable_reason()
    assert (openvino is None) == (importlib.util.find_spec("openvino") is not None)
    trt = get_runner_class("trt").unavailable_reason()
    if importlib.util.find_spec("tensorrt") is None:
        assert trt and "TensorRT" in trt


def test_skipped_engines_appear_in_the_summary() -> None:
    card = {
        "rows": [
            {
                "engine": "torch",
                "accuracy": {"AP50": 0.5},
                "parity": {"verdict": "reference"},
                "speed": {"p50_ms": 9.0},
            },
            {"engine": "trt:fp16", "skipped": "TensorRT is not installed"},
        ]
    }
    rows = _summary_rows(card)
    assert rows[0] == ["torch", "0.5000", "reference", "9.0"]
    assert rows[1][0] == "trt:fp16" and "skipped" in rows[1][2]


def test_the_demo_prints_the_scorecard_table_and_its_skips() -> None:
    """What the demo prints at its end is the scorecard command's own text: every column, then the skips."""
    from cellseg_deploy.bench.scorecard import HEADERS, summary_text

    card = {
        "rows": [
            {
                "engine": "torch",
                "model": {"path": "/m/best.pt", "size_bytes": 2_500_000},
                "accuracy": {"AP50": 0.5, "AP": 0.25},
                "parity": {"verdict": "reference"},
                "speed": {"p50_ms": 9.0, "speedup_p50": 1.0},
                "memory": {"peak_rss_mb": 321.0},
            },
            {"engine": "trt:fp16", "skipped": "TensorRT is not installed"},
        ],
        "skipped": {"trt:fp16": "TensorRT is not installed"},
    }
    lines = summary_text(card).splitlines()
    assert all(h in lines[0] for h in HEADERS)
    torch_row = next(line for line in lines if line.startswith("torch"))
    for cell in ("best.pt", "2.5", "0.5000", "0.2500", "reference", "9.0", "1.00x", "321"):
        assert cell in torch_row
    assert any(line.startswith("trt:fp16") and "skipped" in line for line in lines)
    assert lines[-1] == "skipped trt:fp16: TensorRT is not installed"


@pytest.mark.slow
def test_a_small_demo_reports_the_scorecard_and_its_skips(tmp_path: Path) -> None:
    """The whole demo, shortened (8 training images, 2 epochs, three engines): its summary is the scorecard."""
    from cellseg_deploy.bench.scorecard import HEADERS
    from cellseg_deploy.demo import DemoConfig, run_demo

    config = DemoConfig(
        out=tmp_path / "demo",
        n_train=8,
        n_test=2,
        bench_iters=1,
        engines=("torch", "onnx", "trt:fp16"),
        overrides=(
            "train.epochs=2",
            "val.every_epochs=2",
            "model.min_size=160",
            "model.max_size=320",
            "train.time_limit_min=0",
            "schedule.time_aware=false",
        ),
    )
    result = run_demo(config, echo=lambda _msg: None)
    report = result.report.read_text()
    assert "| " + " | ".join(HEADERS) + " |" in report
    assert "- trt:fp16: " in report and "TensorRT" in result.skipped["trt:fp16"]
    assert [row[0] for row in result.summary_rows] == ["torch", "onnx", "trt:fp16"]
    assert all(h in result.scorecard_text for h in HEADERS)
    assert "skipped trt:fp16: " in result.scorecard_text
    assert "FN red" in report, "the test images have ground truth: overlays coloured TP / FP / FN"
    demo = json.loads((config.out / "demo.json").read_text())
    assert demo["skipped"] == result.skipped
    assert Path(demo["scorecard"]).is_file()
