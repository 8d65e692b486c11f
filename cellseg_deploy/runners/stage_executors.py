"""Stage executors: what runs the stage graphs for the staged runner.

An executor takes a stage name and its input tensor (float32, on :attr:`StageExecutor.device`) and returns
the stage's outputs by name (float32 torch tensors on the same device). The staged runner does everything
else (pre-processing, anchors, decoding, NMS, RoIAlign) in FP32 PyTorch, so swapping the executor changes only
how the networks run.

- :class:`OrtExecutor`: ONNX Runtime sessions on the stage graphs (CPU provider, or the CUDA provider on a
  GPU). Tensors pass through host memory (numpy), which is simple and portable, not the fast path.
- :class:`TrtExecutor`: TensorRT engines through the named-tensor API (``set_input_shape``,
  ``set_tensor_address``, ``execute_async_v3`` on a dedicated CUDA stream), outputs allocated by torch on the
  GPU, optional CUDA-graph capture per input shape.
"""

from __future__ import annotations

import abc
import logging
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from cellseg_deploy.errors import BackendUnavailable, ModelFileError

log = logging.getLogger(__name__)


class StageExecutor(abc.ABC):
    """Runs stage graphs. Subclasses implement :meth:`run`, and :meth:`close` when they hold resources.

    Attributes:
        device: where inputs are expected and outputs returned.
        roi_bucket: when positive, the runner pads RoI counts up to a multiple of it (fewer distinct
            shapes, e.g. for CUDA graphs); 0 runs exact counts.
    """

    name: ClassVar[str] = ""
    device: torch.device = torch.device("cpu")
    roi_bucket: int = 0

    @abc.abstractmethod
    def run(self, stage: str, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run ``stage`` on ``inputs`` (float32, on :attr:`device`); returns float32 outputs by name."""

    def close(self) -> None:
        """Release sessions, engines and memory."""
        return None

    def info(self) -> dict[str, Any]:
        """What runs the stages (for reports)."""
        return {"executor": self.name}


# ----------------------------------------------------------------------------------------------------------
# PyTorch (the stage modules the graphs were traced from)
# ----------------------------------------------------------------------------------------------------------
class TorchExecutor(StageExecutor):
    """The stage modules themselves (:func:`~cellseg_deploy.export.staged.build_stage_modules`), in PyTorch.

    With FP16 modules every activation is stored in FP16 between layers, on the CPU too, so this is the
    faithful FP16 reference where no GPU is available (ONNX Runtime's CPU provider computes the FP16 graphs'
    convolutions and matrix products in FP32, see :class:`OrtExecutor`).

    Args:
        modules: ``{stage: module}`` taking and returning float32
            (:class:`~cellseg_deploy.export.staged.Float32Boundary`).
        output_names: ``{stage: [output name, ...]}`` in the modules' output order.
        device: where the modules run.
    """

    name = "torch"

    def __init__(
        self,
        modules: Mapping[str, torch.nn.Module],
        output_names: Mapping[str, list[str]],
        *,
        device: str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.modules = {s: m.to(self.device).eval() for s, m in modules.items()}
        self.output_names = dict(output_names)

    def run(self, stage: str, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        (x,) = inputs.values()
        with torch.inference_mode():
            outs = self.modules[stage](x.to(self.device, torch.float32))
        return dict(zip(self.output_names[stage], outs, strict=True))

    def close(self) -> None:
        self.modules.clear()

    def info(self) -> dict[str, Any]:
        dtypes = {s: str(next(m.parameters()).dtype).replace("torch.", "") for s, m in self.modules.items()}
        return {"executor": self.name, "torch": str(torch.__version__), "dtypes": dtypes}


# ----------------------------------------------------------------------------------------------------------
# ONNX Runtime
# ----------------------------------------------------------------------------------------------------------
class OrtExecutor(StageExecutor):
    """ONNX Runtime sessions, one per stage graph.

    On the CPU provider the FP16 graphs run with their FP16 weights, but ONNX Runtime has no FP16 CPU kernels
    for Conv, ConvTranspose and Gemm: it computes those (and, after dropping the redundant Cast pairs, the
    layers between them) in FP32. So on the CPU the FP16 graphs show the effect of FP16 weights, not of FP16
    activations; :class:`TorchExecutor` with FP16 modules (or a GPU) gives the latter.

    Args:
        graphs: ``{stage: path of its .onnx}``.
        device: ``"cpu"`` (CPU provider) or ``"cuda"``/``"cuda:N"`` (CUDA provider, CPU fallback).
        threads: intra-op threads of each session (``None``: ONNX Runtime's default).
    """

    name = "onnxruntime"

    def __init__(
        self, graphs: Mapping[str, Path], *, device: str = "cpu", threads: int | None = None
    ) -> None:
        import onnxruntime as ort

        self.device = torch.device(device)
        opts = ort.SessionOptions()
        # No busy-waiting between stage runs: the host steps in between need the cores (see ort_runner.py).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads is not None:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendUnavailable(
                    "ONNX Runtime here has no CUDA provider; pip install onnxruntime-gpu, or use --device cpu"
                )
            providers: list[Any] = [
                ("CUDAExecutionProvider", {"device_id": self.device.index or 0}),
                "CPUExecutionProvider",
            ]
        else:
            providers = ["CPUExecutionProvider"]
        self.sessions: dict[str, Any] = {}
        for stage, path in graphs.items():
            try:
                self.sessions[stage] = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
            except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
                raise ModelFileError(
                    f"ONNX Runtime cannot load {path}: {str(exc).splitlines()[0][:200]}"
                ) from exc
        self.providers = {s: sess.get_providers()[0] for s, sess in self.sessions.items()}

    def run(self, stage: str, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        session = self.sessions[stage]
        feed = {name: t.detach().to("cpu", torch.float32).contiguous().numpy() for name, t in inputs.items()}
        names = [o.name for o in session.get_outputs()]
        outs = session.run(names, feed)
        return {
            n: torch.from_numpy(np.asarray(o, dtype=np.float32)).to(self.device)
            for n, o in zip(names, outs, strict=True)
        }

    def close(self) -> None:
        self.sessions.clear()

    def info(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {"executor": self.name, "onnxruntime": ort.__version__, "providers": self.providers}


# ----------------------------------------------------------------------------------------------------------
# TensorRT
# ----------------------------------------------------------------------------------------------------------
def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.int32: torch.int32,
        trt.int8: torch.int8,
    }
    for name, tdt in (
        ("int64", torch.int64),
        ("bool", torch.bool),
        ("bf16", torch.bfloat16),
        ("uint8", torch.uint8),
    ):
        if hasattr(trt, name):
            table[getattr(trt, name)] = tdt
    if dtype not in table:
        raise ModelFileError(f"engine tensor type {dtype} is not supported by this runner")
    return table[dtype]


class _TrtStage:
    """One engine: its execution context, tensor names and dtypes, and captured CUDA graphs."""

    def __init__(self, trt: Any, runtime: Any, path: Path, device: torch.device, max_graphs: int) -> None:
        self.trt = trt
        self.path = path
        self.device = device
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ModelFileError(
                f"TensorRT could not load engine {path} (another TensorRT version or GPU?); rebuild it with "
                "'cellseg-deploy export --format trt'"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[
            tuple[Any, ...], tuple[Any, Any, dict[str, torch.Tensor], dict[str, torch.Tensor]]
        ] = OrderedDict()
        self.graphs_failed = False

    def _bind(self, context: Any, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Set input shapes and addresses on ``context``; allocate outputs (on the current stream)."""
        for name in self.inputs:
            t = inputs[name]
            if not context.set_input_shape(name, tuple(t.shape)):
                raise ModelFileError(
                    f"engine {self.path.name}: input {name} shape {list(t.shape)} is outside its profile"
                )
            context.set_tensor_address(name, t.data_ptr())
        outs = {}
        for name in self.outputs:
            shape = tuple(context.get_tensor_shape(name))
            out = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            context.set_tensor_address(name, out.data_ptr())
            outs[name] = out
        return outs

    def run(
        self, inputs: Mapping[str, torch.Tensor], stream: torch.cuda.Stream, cuda_graphs: bool
    ) -> dict[str, torch.Tensor]:
        feed = {n: inputs[n].to(self.device, self.dtypes[n]).contiguous() for n in self.inputs}
        if cuda_graphs and not self.graphs_failed:
            return self._run_graph(feed, stream)
        for t in feed.values():
            t.record_stream(stream)
        with torch.cuda.stream(stream):
            outs = self._bind(self.context, feed)
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError(f"TensorRT execution of {self.path.name} failed")
        return outs

    def _run_graph(
        self, feed: Mapping[str, torch.Tensor], stream: torch.cuda.Stream
    ) -> dict[str, torch.Tensor]:
        key = tuple((n, tuple(t.shape)) for n, t in feed.items())
        entry = self.graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(feed, stream)
            except Exception as exc:  # capture is an optimisation: fall back to plain execution
                log.warning(
                    "CUDA graph capture failed for %s (%s); running without graphs", self.path.name, exc
                )
                self.graphs_failed = True
                return self.run(feed, stream, cuda_graphs=False)
            self.graphs[key] = entry
            if len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
        graph, _context, static_in, static_out = entry
        with torch.cuda.stream(stream):
            for name, t in feed.items():
                static_in[name].copy_(t, non_blocking=True)
            graph.replay()
            return {n: t.clone() for n, t in static_out.items()}

    def _capture(
        self, feed: Mapping[str, torch.Tensor], stream: torch.cuda.Stream
    ) -> tuple[Any, Any, Any, Any]:
        """A context of its own per shape (a captured graph keeps its shapes and addresses), warmed up once
        (TensorRT finishes shape-dependent setup on the first enqueue), then captured."""
        context = self.engine.create_execution_context()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            static_in = {n: t.clone() for n, t in feed.items()}
            static_out = self._bind(context, static_in)
            if not context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("warm-up execution failed")
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            context.execute_async_v3(stream.cuda_stream)
        return graph, context, static_in, static_out


class TrtExecutor(StageExecutor):
    """TensorRT engines, one per stage, on one GPU.

    Args:
        engines: ``{stage: path of its .engine}``.
        device: ``"cuda"`` or ``"cuda:N"``.
        cuda_graphs: capture one CUDA graph per input shape and replay it (saves launch overhead on small
            inputs; each captured shape holds its own execution context and buffers). The runner then pads
            RoI counts to multiples of ``roi_bucket`` to bound the number of shapes.
        max_graphs: captured shapes kept per stage (least recently used dropped).
        roi_bucket: RoI padding multiple used with ``cuda_graphs``.

    Outputs come back as float32 (engines with float32 boundaries return them as they are).
    """

    name = "tensorrt"

    def __init__(
        self,
        engines: Mapping[str, Path],
        *,
        device: str = "cuda",
        cuda_graphs: bool = False,
        max_graphs: int = 8,
        roi_bucket: int = 64,
    ) -> None:
        from cellseg_deploy.export.tensorrt import require_tensorrt

        trt = require_tensorrt()
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise BackendUnavailable(
                f"TensorRT runs on an NVIDIA GPU; got device {device!r}: use --device cuda"
            )
        torch.cuda.set_device(self.device)
        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.stream = torch.cuda.Stream(self.device)
        self.cuda_graphs = cuda_graphs
        self.roi_bucket = roi_bucket if cuda_graphs else 0
        self.stages = {
            s: _TrtStage(trt, self.runtime, Path(p), self.device, max_graphs) for s, p in engines.items()
        }

    def run(self, stage: str, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        outs = self.stages[stage].run(inputs, self.stream, self.cuda_graphs)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        for t in outs.values():
            t.record_stream(torch.cuda.current_stream(self.device))
        return {n: t.float() for n, t in outs.items()}

    def close(self) -> None:
        self.stream.synchronize()
        self.stages.clear()

    def info(self) -> dict[str, Any]:
        return {"executor": self.name, "tensorrt": str(self.trt.__version__), "cuda_graphs": self.cuda_graphs}
