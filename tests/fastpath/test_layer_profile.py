"""Per-layer profiles from the real runtimes (ONNX Runtime's profiler, OpenVINO's performance counters) on the
project's ONNX export: every call profiled, the model's parts found, the warm-up left out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cellseg_deploy.backends import create_runner
from cellseg_deploy.bench.profile import UNATTRIBUTED, model_part, profile_engine
from cellseg_deploy.data.io import write_image_tif
from cellseg_deploy.errors import UserError

ENGINES = ["onnx", "openvino"]


def _needs(engine: str) -> None:
    if engine == "openvino":
        pytest.importorskip(
            "openvino", reason="OpenVINO is not installed: pip install 'cellseg-deploy[openvino]'"
        )


@pytest.mark.parametrize("engine", ENGINES)
def test_every_call_is_profiled_and_placed_in_the_model(
    engine: str, fast_onnx: Path, fast_cell_images: dict[str, np.ndarray]
) -> None:
    _needs(engine)
    image = fast_cell_images["cells 200x264"]
    with create_runner(engine, fast_onnx, threads=1, options={"profile": True}) as runner:
        for _ in range(3):
            runner.infer(image)
        calls = runner.layer_profile()
    assert len(calls) == 3 and all(calls)
    parts = {model_part(layer) for layer in calls[-1]}
    assert {"backbone", "fpn", "rpn_head", "roi_align", "box_head", "mask_head"} <= parts
    total = sum(layer.ms for layer in calls[-1])
    unplaced = sum(layer.ms for layer in calls[-1] if model_part(layer) == UNATTRIBUTED)
    assert total > 0 and unplaced < 0.02 * total, [x.name for x in calls[-1] if model_part(x) == UNATTRIBUTED]
    assert {layer.precision for layer in calls[-1]} >= {"fp32"}


@pytest.mark.parametrize("engine", ENGINES)
def test_without_the_option_there_is_no_profile(engine: str, fast_onnx: Path) -> None:
    _needs(engine)
    with (
        create_runner(engine, fast_onnx, threads=1) as runner,
        pytest.raises(UserError, match="profile=true"),
    ):
        runner.layer_profile()


def test_torch_has_no_profile(fast_checkpoint: Path) -> None:
    with (
        create_runner("torch", fast_checkpoint) as runner,
        pytest.raises(UserError, match="no per-layer profile"),
    ):
        runner.layer_profile()


def test_profile_engine_leaves_out_the_warm_up(
    fast_onnx: Path, fast_cell_images: dict[str, np.ndarray], tmp_path: Path
) -> None:
    paths = []
    for i, name in enumerate(["cells 200x264", "cells 257x190"]):
        write_image_tif(tmp_path / f"im{i}.tif", fast_cell_images[name])
        paths.append(str(tmp_path / f"im{i}.tif"))
    spec = {
        "engine": "onnx",
        "label": "onnx",
        "model_path": str(fast_onnx),
        "device": "cpu",
        "precision": "fp32",
        "threads": 1,
        "options": {},
        "image_paths": paths,
        "rounds": 2,
        "warmup": 1,
    }
    summary = profile_engine(spec)
    assert summary["calls"] == 4  # 2 rounds x 2 images; the warm-up pass is not in it
    assert summary["engine"] == "onnx" and summary["execution_precision"] == "fp32"
    assert summary["layer_ms_per_call"] == pytest.approx(
        sum(p["ms"] for p in summary["parts"].values()), rel=1e-3
    )
