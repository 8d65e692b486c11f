"""The TensorRT path's one-line failures and the CUDA calls it makes, on the CPU: an unsupported TensorRT, no
GPU, a graph TensorRT cannot parse, a failed build, a bad workspace; and which ``torch.cuda`` calls
:class:`~cellseg_deploy.backends.tensorrt.build.CudaApi` makes for GPU ``N`` (an index, never a bare "cuda")."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cellseg_deploy.backends.tensorrt import build as trt_export
from cellseg_deploy.errors import BackendUnavailable, ConfigError, ModelFileError


def test_unsupported_tensorrt_and_missing_gpu_are_one_line(trt_double, monkeypatch) -> None:
    double = trt_double()
    monkeypatch.setattr(double.trt, "__version__", "9.3.0")
    reason = trt_export.trt_unavailable_reason()
    assert reason is not None and "9.3.0 is not supported" in reason and "\n" not in reason
    monkeypatch.setattr(double.trt, "__version__", "10.16.0.72")
    monkeypatch.setattr(double.cuda, "unavailable_reason", lambda: "no GPU here")
    reason = trt_export.trt_unavailable_reason()
    assert reason is not None and reason.startswith("TensorRT needs an NVIDIA GPU: no GPU here")
    with pytest.raises(BackendUnavailable):
        trt_export.require_tensorrt()


def test_a_broken_tensorrt_install_is_one_line(monkeypatch) -> None:
    class Broken:
        def find_spec(self, name, path=None, target=None):
            if name == "tensorrt":
                raise OSError("libnvinfer.so.10: cannot open shared object file\nmore")
            return None

    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Broken(), *sys.meta_path])
    reason = trt_export.trt_unavailable_reason()
    assert (
        reason is not None and "failed to import (OSError: libnvinfer.so.10" in reason and "\n" not in reason
    )


def test_build_failures_are_one_line_model_file_errors(
    trt_double, stage_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    double = trt_double()
    stages = tmp_path / "stages"
    shutil.copytree(stage_dir, stages)
    with pytest.raises(ConfigError, match="workspace must be positive"):
        trt_export.build_engines(stages, workspace_gib=0)
    # TensorRT cannot parse the graph
    monkeypatch.setattr(double.trt.OnnxParser, "parse_from_file", _parse_fails)
    with pytest.raises(
        ModelFileError, match=r"TensorRT could not parse .*backbone_rpn\.fp16\.onnx: bad node"
    ):
        trt_export.build_engines(stages)
    monkeypatch.undo()
    double = trt_double()
    monkeypatch.setattr(double.trt.Builder, "build_serialized_network", lambda self, network, config: None)
    with pytest.raises(ModelFileError, match="failed to build an engine"):
        trt_export.build_engines(stages, fp16=False)
    assert not (stages / "engines" / "fp32" / "engines.json").exists()


def _parse_fails(self, model: str) -> bool:
    self._errors.append(type("E", (), {"__str__": lambda s: "bad node"})())
    return False


def test_an_empty_timing_cache_tensorrt_refuses_is_an_error() -> None:
    config = SimpleNamespace(
        create_timing_cache=lambda data: None, set_timing_cache=lambda c, ignore_mismatch: True
    )
    with pytest.raises(ModelFileError, match="could not create an empty timing cache"):
        trt_export.attach_timing_cache(config, b"")


def test_cuda_api_calls_torch_cuda_with_the_gpu_index(monkeypatch) -> None:
    calls: list[tuple] = []

    def record(name, result=None):
        def call(*args, **kwargs):
            calls.append((name, args, kwargs))
            return result

        return call

    event = SimpleNamespace(record=record("Event.record"), elapsed_time=lambda other: 1500.0)
    for name, value in {
        "is_available": lambda: False,
        "get_device_name": record("get_device_name", "GPU"),
        "get_device_capability": record("get_device_capability", (8, 6)),
        "set_device": record("set_device"),
        "Stream": record("Stream", "stream"),
        "current_stream": record("current_stream", "current"),
        "stream": record("stream", "ctx"),
        "synchronize": record("synchronize"),
        "CUDAGraph": record("CUDAGraph", "graph"),
        "graph": record("graph", "capture"),
        "Event": lambda enable_timing: event,
    }.items():
        monkeypatch.setattr(torch.cuda, name, value)
    api = trt_export.CudaApi(1)
    assert api.unavailable_reason() is not None and "is_available() is False" in api.unavailable_reason()
    assert api.tensor_device == torch.device("cuda", 1)
    assert (api.name(), api.capability()) == ("GPU", (8, 6))
    api.activate()
    assert api.new_stream() == "stream" and api.current_stream() == "current" and api.use("s") == "ctx"
    stream = SimpleNamespace(
        cuda_stream=0xBEEF, wait_stream=record("wait_stream"), synchronize=record("s.sync")
    )
    assert api.handle(stream) == 0xBEEF
    api.wait(stream, "other")
    tensor = SimpleNamespace(record_stream=record("record_stream"), data_ptr=lambda: 4096)
    api.keep(tensor, stream)
    assert api.pointer(tensor) == 4096
    api.synchronize()
    api.synchronize(stream)
    assert api.new_graph() == "graph" and api.capture("graph", stream) == "capture"
    api.replay(SimpleNamespace(replay=record("replay")))
    start = api.event()
    assert api.elapsed_s(start, api.event()) == 1.5
    assert api.runtime_version() == torch.version.cuda
    by_name = {name: (args, kwargs) for name, args, kwargs in calls}
    assert by_name["set_device"] == ((1,), {})  # an index: torch.cuda.set_device(torch.device("cuda")) raises
    assert by_name["Stream"] == ((), {"device": 1}) and by_name["current_stream"] == ((1,), {})
    assert by_name["synchronize"] == ((1,), {}) and by_name["get_device_name"] == ((1,), {})
    assert by_name["graph"] == (("graph",), {"stream": stream})
    assert {"wait_stream", "record_stream", "s.sync", "replay", "Event.record"} <= set(by_name)
