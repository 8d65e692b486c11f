"""The review of the TensorRT path (issue 15, points 1 to 6), each point as a CPU test through the TensorRT
and CUDA doubles (``tests/trt_double``): every test here failed on the code before its fix."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cellseg_deploy.backends.staged.stages import STAGES
from cellseg_deploy.errors import BackendUnavailable
from tests.trt_double import VERSIONS
from tests.trt_double.tensorrt import read_plan

pytestmark = pytest.mark.slow


@pytest.fixture
def stages(stage_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the session's stage folder (engines are written into it)."""
    out = tmp_path / "stages"
    shutil.copytree(stage_dir, out)
    return out


def engines_of(stages: Path, precision: str) -> dict[str, Path]:
    from cellseg_deploy.backends.tensorrt.build import load_engine_set

    return load_engine_set(stages / "engines" / precision).engine_paths()


def ort_outputs(stages: Path, stage: str, x: torch.Tensor, precision: str = "fp32") -> dict[str, np.ndarray]:
    import onnxruntime as ort

    from cellseg_deploy.backends.staged.stages import load_stage_folder

    session = ort.InferenceSession(
        str(load_stage_folder(stages).graph(stage, precision)), providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    feed = {session.get_inputs()[0].name: x.contiguous().numpy()}
    return dict(zip(names, session.run(names, feed), strict=True))


# -- 1. device "cuda" without an index --------------------------------------------------------------------------
def test_1_trt_executor_accepts_cuda_without_an_index(trt_double, stages: Path) -> None:
    from cellseg_deploy.backends.tensorrt.build import build_engines
    from cellseg_deploy.backends.tensorrt.executor import TrtExecutor

    double = trt_double()
    build_engines(stages, fp16=False)
    executor = TrtExecutor(engines_of(stages, "fp32"), device="cuda")  # was: ValueError from set_device
    assert double.cuda.activated == [0]
    executor.close()


# -- 2. a timing cache from another TensorRT version -------------------------------------------------------------
def test_2_timing_cache_of_another_trt_version_is_replaced(
    trt_double, stages: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from cellseg_deploy.backends.tensorrt.build import build_engines

    trt_double(VERSIONS[1])
    first = build_engines(stages, fp16=False)
    cache = first.timing_cache.read_bytes()
    assert b'"version": "10.16.0.72"' in cache
    trt_double(VERSIONS[2])  # the 10 -> 11 upgrade, same stage folder and timing.cache
    with caplog.at_level(logging.WARNING):
        second = build_engines(stages, fp16=False)  # was: TypeError (set_timing_cache(None, ...))
    assert "not readable by this TensorRT" in caplog.text
    assert b'"version": "11.1.0.5"' in second.timing_cache.read_bytes()


def test_2_timing_cache_of_another_gpu_is_replaced(trt_double, stages: Path, caplog) -> None:
    from cellseg_deploy.backends.tensorrt.build import build_engines

    trt_double(VERSIONS[1], capability=(8, 0))
    build_engines(stages, fp16=False)
    trt_double(VERSIONS[1], capability=(9, 0))
    with caplog.at_level(logging.WARNING):
        result = build_engines(stages, fp16=False)
    assert "made on another GPU" in caplog.text
    assert b'"capability": [9, 0]' in result.timing_cache.read_bytes()


# -- 3. one FP16 path: strongly typed FP16 graphs on TensorRT 10 and 11 ------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
def test_3_fp16_engines_are_strongly_typed_from_the_fp16_graphs_on_every_version(
    trt_double, stages: Path, version: str
) -> None:
    import json

    from cellseg_deploy.backends.tensorrt.build import build_engines

    trt_double(version)
    result = build_engines(stages, fp16=True)
    manifest = json.loads(result.manifest.read_text())
    assert (manifest["typing"], manifest["graph_precision"]) == ("strong", "fp16")
    for stage in STAGES:
        plan = read_plan(result.engines[stage].read_bytes())
        assert plan["typing"] == "strong" and plan["fp16_flag"] is False
        assert plan["graph"] == f"{stage}.fp16.onnx"


# -- 4. inputs converted before TensorRT's stream waits ------------------------------------------------------------
@pytest.mark.parametrize("layout", ["float64", "non-contiguous"])
def test_4_input_conversions_are_ordered_before_the_engine(trt_double, stages: Path, layout: str) -> None:
    from cellseg_deploy.backends.tensorrt.build import build_engines
    from cellseg_deploy.backends.tensorrt.executor import TrtExecutor

    double = trt_double()
    build_engines(stages, fp16=False)
    executor = TrtExecutor(engines_of(stages, "fp32"), device="cuda")
    x = torch.randn(5, 64, 7, 7, generator=torch.Generator().manual_seed(0))
    given = x.double() if layout == "float64" else x.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
    assert given.is_contiguous() == (layout == "float64")
    out = executor.run("box_head", {"box_features": given})  # the double raises on a stream-order race
    assert not double.cuda.races
    ref = ort_outputs(stages, "box_head", x)
    np.testing.assert_allclose(out["class_logits"].numpy(), ref["class_logits"], atol=1e-5)


# -- 5. CUDA-graph contexts: shared memory, checked results -------------------------------------------------------
def test_5_captured_shapes_share_one_scratch_buffer(trt_double, stages: Path) -> None:
    from cellseg_deploy.backends.tensorrt.build import build_engines
    from cellseg_deploy.backends.tensorrt.executor import TrtExecutor

    double = trt_double()
    build_engines(stages, fp16=False)
    executor = TrtExecutor(engines_of(stages, "fp32"), device="cuda", cuda_graphs=True)
    before = double.cuda.allocated_bytes
    for n in (16, 32, 48, 64):
        executor.run("mask_head", {"mask_features": torch.randn(n, 64, 14, 14)})
    info = executor.info()["device_memory"]
    assert info["contexts"]["mask_head"] == 4  # one per captured shape
    per_context = info["per_stage_bytes"]["mask_head"]
    new_memory = double.cuda.allocated_bytes - before
    # inputs, outputs and one shared scratch buffer; one buffer per context would be 4x the scratch
    io_bytes = sum(2 * n * 64 * 14 * 14 * 4 + 2 * n * 5 * 28 * 28 * 4 for n in (16, 32, 48, 64))
    assert new_memory <= io_bytes + info["shared_bytes"] < io_bytes + 4 * per_context
    assert info["unshared_bytes"] == 4 * per_context


def test_5_failed_capture_enqueue_falls_back_to_plain_execution(
    trt_double, stages: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from cellseg_deploy.backends.tensorrt.build import build_engines
    from cellseg_deploy.backends.tensorrt.executor import TrtExecutor

    double = trt_double()
    build_engines(stages, fp16=False)
    double.state.fail_capture = True
    executor = TrtExecutor(engines_of(stages, "fp32"), device="cuda", cuda_graphs=True)
    a, b = torch.randn(64, 64, 7, 7), torch.randn(64, 64, 7, 7)
    with caplog.at_level(logging.WARNING):
        executor.run("box_head", {"box_features": a})
        got = executor.run("box_head", {"box_features": b})  # a second input of the same shape
    assert "CUDA graph capture failed" in caplog.text
    ref = ort_outputs(stages, "box_head", b)
    np.testing.assert_allclose(got["class_logits"].numpy(), ref["class_logits"], atol=1e-5)


def test_5_a_context_tensorrt_cannot_create_is_a_one_line_error(
    trt_double, stages: Path, monkeypatch
) -> None:
    from cellseg_deploy.backends.tensorrt.build import build_engines
    from cellseg_deploy.backends.tensorrt.executor import TrtExecutor

    double = trt_double()
    build_engines(stages, fp16=False)
    executor = TrtExecutor(engines_of(stages, "fp32"), device="cuda")
    engine = executor.stages["box_head"].engine
    monkeypatch.setattr(engine, "create_execution_context", lambda strategy=None: None)
    with pytest.raises(BackendUnavailable, match="could not create an execution context") as info:
        executor.run("box_head", {"box_features": torch.randn(3, 64, 7, 7)})
    assert "\n" not in str(info.value)
    assert double.state.contexts >= 0


# -- 6. bfloat16 and address alignment -----------------------------------------------------------------------------
def test_6_bfloat16_engine_tensors_map_to_torch_bfloat16(trt_double) -> None:
    from cellseg_deploy.backends.tensorrt.executor import trt_torch_dtype

    trt = trt_double().trt
    assert not hasattr(trt, "bf16")  # the binding is trt.bfloat16
    assert trt_torch_dtype(trt, trt.bfloat16) is torch.bfloat16
    assert trt_torch_dtype(trt, trt.float16) is torch.float16


def test_6_misaligned_roi_chunks_are_copied_to_aligned_memory(trt_double, stages: Path) -> None:
    from cellseg_deploy.backends.tensorrt.build import build_engines
    from cellseg_deploy.backends.tensorrt.executor import TrtExecutor

    trt_double()
    build_engines(stages, fp16=False)
    executor = TrtExecutor(engines_of(stages, "fp32"), device="cuda")
    flat = torch.randn(1 + 4 * 64 * 7 * 7)
    chunk = flat[1:].view(4, 64, 7, 7)  # starts 4 bytes into its allocation: not 256-byte aligned
    assert chunk.data_ptr() % 256
    out = executor.run("box_head", {"box_features": chunk})
    ref = ort_outputs(stages, "box_head", chunk.clone())
    np.testing.assert_allclose(out["class_logits"].numpy(), ref["class_logits"], atol=1e-5)
