"""The ONNX Runtime runner: contract, providers, options, metadata, and the files it must refuse."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from cellseg_deploy.errors import BackendUnavailable, ModelFileError, UserError
from cellseg_deploy.export.onnx_export import ExportResult
from cellseg_deploy.runners import create_runner, list_runners
from cellseg_deploy.runners.ort_runner import OrtRunner

pytestmark = pytest.mark.slow


def test_registered_as_onnx() -> None:
    assert "onnx" in list_runners()


def test_contract_timings_and_info(
    dense_export: ExportResult, cell_images: dict[str, np.ndarray], tmp_path: Path
) -> None:
    saved = tmp_path / "optimised.onnx"
    image = cell_images["non-square 180x620"]
    with create_runner(
        "onnx",
        dense_export.path,
        threads=1,
        options={"graph_optimization": "extended", "optimized_model_path": saved},
    ) as runner:
        det = runner.infer(image)
        info = runner.info()
        assert isinstance(runner, OrtRunner) and runner.model_config is not None
        assert runner.model_config.detections_per_img == 200
    assert len(det) > 0 and det.image_size == (180, 620)
    assert det.boxes.dtype == np.float32 and det.boxes.shape == (len(det), 4)
    assert det.labels.dtype == np.int64 and set(det.labels) <= {1, 2, 3, 4}
    assert det.scores.dtype == np.float32 and np.all(np.diff(det.scores) <= 0)
    assert det.mask_probs.shape == (len(det), 28, 28) and det.mask_probs.dtype == np.float32
    assert set(det.timings) == {"preprocess", "network"} and det.timings["network"] > 0
    assert info["runner"] == "onnx" and info["providers"] == ["CPUExecutionProvider"] and info["threads"] == 1
    assert info["class_names"] == ["class1", "class2", "class3", "class4"]
    assert info["source_sha256"] == dense_export.metadata["source_sha256"]
    assert info["graph_optimization"] == "extended" and info["detections_per_img"] == 200
    assert saved.is_file() and onnx.load(str(saved)).graph.node  # the optimised graph was saved


def test_checkpoint_is_refused_with_one_line(dense_checkpoint: Path) -> None:
    with pytest.raises(ModelFileError) as err:
        create_runner("onnx", dense_checkpoint)
    assert "\n" not in str(err.value) and "export" in str(err.value)


def test_corrupt_and_foreign_onnx_files_are_refused(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07 definitely not protobuf" * 10)
    with pytest.raises(ModelFileError, match="cannot load"), create_runner("onnx", corrupt):
        pass
    # A valid ONNX file with another signature (float NCHW input, one output).
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, "h", "w"])],
    )
    foreign = tmp_path / "foreign.onnx"
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(foreign)
    )
    with (
        pytest.raises(ModelFileError, match="not a cellseg-deploy single-graph export"),
        create_runner("onnx", foreign),
    ):
        pass
    with pytest.raises(ModelFileError, match="does not exist"):
        create_runner("onnx", tmp_path / "missing.onnx")


def test_bad_options_are_user_errors(dense_export: ExportResult) -> None:
    with (
        pytest.raises(UserError, match="graph_optimization"),
        create_runner("onnx", dense_export.path, options={"graph_optimization": "max"}),
    ):
        pass
    with pytest.raises(UserError, match="precision"):
        create_runner("onnx", dense_export.path, precision="fp16")
    with (
        pytest.raises(UserError, match="unknown device"),
        create_runner("onnx", dense_export.path, device="tpu"),
    ):
        pass


def _has_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


@pytest.mark.skipif(
    _has_cuda(), reason="checks the no-GPU error; the GPU path is test_cuda_provider_matches_cpu"
)
def test_cuda_without_a_gpu_is_an_error_not_a_silent_cpu_fallback(dense_export: ExportResult) -> None:
    with (
        pytest.raises(BackendUnavailable, match="CUDA") as err,
        create_runner("onnx", dense_export.path, device="cuda"),
    ):
        pass
    assert "\n" not in str(err.value)


@pytest.mark.gpu
def test_cuda_provider_matches_cpu(dense_export: ExportResult, cell_images: dict[str, np.ndarray]) -> None:
    from cellseg_deploy.export.onnx_export import compare_raw_outputs

    image = cell_images["dense 512x512, 700 cells"]
    with (
        create_runner("onnx", dense_export.path, device="cuda") as gpu,
        create_runner("onnx", dense_export.path) as cpu,
    ):
        assert gpu.info()["providers"][0] == "CUDAExecutionProvider"
        a, b = cpu.infer(image), gpu.infer(image)
    cmp = compare_raw_outputs(
        [a.boxes, a.labels, a.scores, a.mask_probs], [b.boxes, b.labels, b.scores, b.mask_probs]
    )
    assert cmp["ok"], cmp["reason"]
