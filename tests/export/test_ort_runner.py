"""The ONNX Runtime runner: contract, providers, options, metadata, and the files it must refuse."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from cellseg_deploy.backends import create_runner, list_runners
from cellseg_deploy.backends.onnxrt.export import ExportResult
from cellseg_deploy.backends.onnxrt.runner import OrtRunner
from cellseg_deploy.errors import BackendUnavailable, ModelFileError, UserError

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
    from cellseg_deploy.backends.onnxrt.export import compare_raw_outputs

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


_NO_TORCH_CUDA_RUN = """
import json, sys
import onnxruntime as ort

calls = []
real_preload = ort.preload_dlls
real_session = ort.InferenceSession


def maps():
    with open("/proc/self/maps") as fh:
        text = fh.read()
    return {"cublasLt": "libcublasLt.so" in text, "cudnn": "libcudnn.so" in text}


def recording_preload(*args, **kwargs):  # the real call, recorded
    calls.append("preload_dlls")
    return real_preload(*args, **kwargs)


def recording_session(*args, **kwargs):  # the real session, with what was loaded when it was created
    calls.append({"session": maps(), "providers": kwargs.get("providers")})
    return real_session(*args, **kwargs)


ort.preload_dlls = recording_preload
ort.InferenceSession = recording_session
from cellseg_deploy.errors import BackendUnavailable
from cellseg_deploy.backends import create_runner

result = {"outcome": "loaded"}
try:
    with create_runner("onnx", sys.argv[1], device="cuda") as runner:
        result["info"] = {k: runner.info()[k] for k in ("providers", "cuda_libraries", "tf32")}
except BackendUnavailable as exc:
    result["outcome"] = str(exc)
result.update(calls=calls, torch_imported="torch" in sys.modules)
print(json.dumps(result, default=str))
"""


def test_cuda_runner_preloads_the_cuda_libraries_without_torch(dense_export: ExportResult) -> None:
    """eval/predict create the ONNX Runtime session before anything imports torch: the runner itself must
    make cuBLAS/cuDNN (pip nvidia-* packages) loadable, or the CUDA provider cannot load (issue 21.1)."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    out = subprocess.run(
        [sys.executable, "-c", _NO_TORCH_CUDA_RUN, str(dense_export.path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["torch_imported"] is False, "the onnx runner imported torch"
    calls = result["calls"]
    assert "preload_dlls" in calls, f"the runner never called onnxruntime.preload_dlls: {calls}"
    session = next(c for c in calls if isinstance(c, dict))
    assert calls.index("preload_dlls") < calls.index(session), calls
    assert session["session"] == {"cublasLt": True, "cudnn": True}, session
    # Without a GPU the CUDA provider still fails, but only for want of the driver, never of cuBLAS/cuDNN.
    for line in out.stderr.splitlines():
        if "Failed to load library" in line and "providers_cuda" in line:
            assert "libcublas" not in line and "libcudnn" not in line, line
    if result["outcome"] == "loaded":  # a GPU machine
        assert result["info"]["providers"][0] == "CUDAExecutionProvider"
        assert result["info"]["cuda_libraries"].startswith("preloaded")
        assert result["info"]["tf32"] is False
    else:
        assert "CUDAExecutionProvider" in result["outcome"], result["outcome"]


def test_cuda_provider_options_keep_fp32_unless_tf32_is_asked_for(dense_export: ExportResult) -> None:
    """The CUDA provider's use_tf32 defaults to on; the fp32 runner asks for it off (issue 21.3)."""
    import onnxruntime as ort

    plain = OrtRunner(dense_export.path, device="cuda:1")
    providers = plain._requested_providers(ort)
    assert providers[0][0] == "CUDAExecutionProvider" and providers[-1] == "CPUExecutionProvider"
    options = providers[0][1]
    assert options["device_id"] == "1"
    assert options["use_tf32"] == "0"
    assert options["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    opted = OrtRunner(dense_export.path, device="cuda", options={"tf32": "true"})
    assert opted._requested_providers(ort)[0][1] == {**options, "device_id": "0", "use_tf32": "1"}
    with pytest.raises(UserError, match="expected true or false"):
        OrtRunner(dense_export.path, device="cuda", options={"tf32": "maybe"})._requested_providers(ort)
    with pytest.raises(UserError, match="cudnn_conv_algo_search"):
        OrtRunner(
            dense_export.path, device="cuda", options={"cudnn_conv_algo_search": "fast"}
        )._requested_providers(ort)
