"""Stage executors: what runs the stage graphs for the staged runner.

An executor takes a stage name and its input tensor (float32, on :attr:`StageExecutor.device`) and returns
the stage's outputs by name (float32 torch tensors on the same device). The staged runner does everything
else (pre-processing, anchors, decoding, NMS, RoIAlign) in FP32 PyTorch, so swapping the executor changes only
how the networks run.

- :class:`OrtExecutor`: ONNX Runtime sessions on the stage graphs (CPU provider, or the CUDA provider on a
  GPU). Tensors pass through host memory (numpy), which is simple and portable, not the fast path.
- :class:`TrtExecutor`: TensorRT engines through the named-tensor API (``set_input_shape``,
  ``set_tensor_address``, ``execute_async_v3`` on a dedicated CUDA stream), outputs allocated by torch on the
  GPU, optional CUDA-graph capture per input shape, one scratch buffer shared by every execution context.
  Its decisions are plain functions (:func:`trt_torch_dtype`, :func:`is_aligned`, :func:`graph_key`,
  :func:`plan_device_memory`, ...); its CUDA calls go through
  :class:`~cellseg_deploy.export.tensorrt.CudaApi`.

fp32 on a GPU computes in fp32: TF32 is off for the PyTorch stage modules and for ONNX Runtime's CUDA
provider (``use_tf32=0``) unless asked for (``tf32=True``); TensorRT fp32 engines are built without TF32.
Every executor counts the host-device synchronisations it makes (:attr:`StageExecutor.syncs`).
"""

from __future__ import annotations

import abc
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
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
    syncs: int = 0
    """Host-device synchronisations made through :meth:`synchronize` so far."""
    marks_need_sync: ClassVar[bool] = False
    """Whether :meth:`elapsed_s` needs one :meth:`synchronize` after the last :meth:`mark` (device events)."""

    @abc.abstractmethod
    def run(self, stage: str, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run ``stage`` on ``inputs`` (float32, on :attr:`device`); returns float32 outputs by name."""

    def synchronize(self) -> None:
        """Wait until the device has finished the work queued so far (no-op on the CPU)."""
        if self.device.type == "cuda":
            self.syncs += 1
            torch.cuda.synchronize(self.device)

    def mark(self) -> Any:
        """A point in time for stage timings: host seconds after synchronising (device events on TensorRT)."""
        self.synchronize()
        return time.perf_counter()

    def elapsed_s(self, start: Any, end: Any) -> float:
        """Seconds between two :meth:`mark` results."""
        return float(end - start)

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
        tf32: allow TF32 for fp32 convolutions and matrix products on a GPU (default off: fp32 is fp32). The
            switch is torch's, process-wide; it is set here, where the precision was asked for.
    """

    name = "torch"

    def __init__(
        self,
        modules: Mapping[str, torch.nn.Module],
        output_names: Mapping[str, list[str]],
        *,
        device: str = "cpu",
        tf32: bool = False,
    ) -> None:
        from cellseg_deploy.runners.devices import set_tf32, torch_device

        self.device = torch_device(device)
        self.tf32 = bool(tf32)
        if self.device.type == "cuda":
            set_tf32(self.tf32)
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
        from cellseg_deploy.runners.devices import tf32_state

        dtypes = {s: str(next(m.parameters()).dtype).replace("torch.", "") for s, m in self.modules.items()}
        info: dict[str, Any] = {"executor": self.name, "torch": str(torch.__version__), "dtypes": dtypes}
        if self.device.type == "cuda":
            info.update(tf32=self.tf32, **tf32_state().as_info())
        return info


# ----------------------------------------------------------------------------------------------------------
# ONNX Runtime
# ----------------------------------------------------------------------------------------------------------
class OrtExecutor(StageExecutor):
    """ONNX Runtime sessions, one per stage graph.

    On the CPU provider the FP16 graphs run with their FP16 weights, but ONNX Runtime has no FP16 CPU kernels
    for Conv, ConvTranspose and Gemm: it computes those (and, after dropping the redundant Cast pairs, the
    layers between them) in FP32. So on the CPU the FP16 graphs show the effect of FP16 weights, not of FP16
    activations; :class:`TorchExecutor` with FP16 modules (or a GPU) gives the latter.

    With ``device="cuda[:N]"`` every session must get the CUDA provider: ONNX Runtime falls back to the CPU
    in silence when the CUDA libraries or the GPU are missing, and that is refused here
    (:class:`~cellseg_deploy.errors.BackendUnavailable`), as the single-graph ``onnx`` runner does. The CUDA
    provider is asked for ``use_tf32=0`` (its default is TF32) unless ``tf32=True``.

    Args:
        graphs: ``{stage: path of its .onnx}``.
        device: ``"cpu"`` (CPU provider) or ``"cuda"``/``"cuda:N"`` (CUDA provider).
        threads: intra-op threads of each session (``None``: ONNX Runtime's default).
        tf32: let the CUDA provider use TF32 for fp32 work.
    """

    name = "onnxruntime"

    def __init__(
        self,
        graphs: Mapping[str, Path],
        *,
        device: str = "cpu",
        threads: int | None = None,
        tf32: bool = False,
    ) -> None:
        import onnxruntime as ort

        from cellseg_deploy.runners.devices import torch_device

        self.device = torch_device(device)
        self.tf32 = bool(tf32)
        opts = ort.SessionOptions()
        # No busy-waiting between stage runs: the host steps in between need the cores (see ort_runner.py).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads is not None:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        providers = ort_providers(self.device, ort.get_available_providers(), tf32=self.tf32)
        self.sessions: dict[str, Any] = {}
        for stage, path in graphs.items():
            try:
                self.sessions[stage] = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
            except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
                raise ModelFileError(
                    f"ONNX Runtime cannot load {path}: {str(exc).splitlines()[0][:200]}"
                ) from exc
        self.providers = {s: sess.get_providers()[0] for s, sess in self.sessions.items()}
        problem = provider_problem(providers, self.providers, ort.get_available_providers())
        if problem is not None:
            self.sessions.clear()
            raise BackendUnavailable(problem)
        self.provider_options = {
            s: sess.get_provider_options().get(self.providers[s], {}) for s, sess in self.sessions.items()
        }

    def run(self, stage: str, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        session = self.sessions[stage]
        feed = {name: t.detach().to("cpu", torch.float32).contiguous().numpy() for name, t in inputs.items()}
        names = [o.name for o in session.get_outputs()]
        outs = session.run(names, feed)
        if self.device.type == "cuda":
            self.syncs += len(feed) + len(outs)  # each host copy to/from the GPU waits for it
        return {
            n: torch.from_numpy(np.asarray(o, dtype=np.float32)).to(self.device)
            for n, o in zip(names, outs, strict=True)
        }

    def close(self) -> None:
        self.sessions.clear()

    def info(self) -> dict[str, Any]:
        import onnxruntime as ort

        info: dict[str, Any] = {
            "executor": self.name,
            "onnxruntime": ort.__version__,
            "providers": self.providers,
        }
        if self.device.type == "cuda":
            first: dict[str, Any] = next(iter(self.provider_options.values()), {})
            info["tf32"] = str(first.get("use_tf32", "")) == "1"
        return info


def ort_providers(device: torch.device, available: list[str], *, tf32: bool = False) -> list[Any]:
    """The providers to ask ONNX Runtime for on ``device``: the CPU provider, or the CUDA provider on GPU
    ``device.index`` with ``use_tf32`` off unless ``tf32`` (then the CPU provider for nodes CUDA lacks).

    Raises:
        BackendUnavailable: CUDA asked for, and this ONNX Runtime has no CUDA provider.
    """
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available:
        raise BackendUnavailable(
            f"device {str(device)!r} needs ONNX Runtime's CUDA provider, which this onnxruntime build lacks "
            f"(available: {available}); pip install onnxruntime-gpu, or use --device cpu"
        )
    options = {"device_id": str(device.index or 0), "use_tf32": "1" if tf32 else "0"}
    return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]


def provider_problem(requested: list[Any], got: Mapping[str, str], available: list[str]) -> str | None:
    """Why sessions that got ``got`` (``{stage: first provider}``) do not honour ``requested``, or ``None``."""
    wanted = requested[0] if isinstance(requested[0], str) else requested[0][0]
    wrong = {s: p for s, p in got.items() if p != wanted}
    if not wrong:
        return None
    return (
        f"asked ONNX Runtime for {wanted} but stage(s) {sorted(wrong)} got {sorted(set(wrong.values()))} "
        f"(available here: {available}); check the CUDA/cuDNN libraries and the GPU, or use --device cpu"
    )


# ----------------------------------------------------------------------------------------------------------
# TensorRT: the decisions (plain functions, tested on the CPU)
# ----------------------------------------------------------------------------------------------------------
_TRT_DTYPES: tuple[tuple[str, torch.dtype], ...] = (
    ("float32", torch.float32),
    ("float16", torch.float16),
    ("bfloat16", torch.bfloat16),  # the binding's name (``trt.bfloat16``), in 10.x and 11.x
    ("int32", torch.int32),
    ("int64", torch.int64),
    ("int8", torch.int8),
    ("uint8", torch.uint8),
    ("bool", torch.bool),
)


def trt_torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    """The torch dtype of a TensorRT ``DataType`` (module attributes ``trt.float32`` ... ``trt.bfloat16``).

    Raises:
        ModelFileError: a type this runner cannot hold in a torch tensor (FP8, INT4, ...).
    """
    for name, tdt in _TRT_DTYPES:
        if hasattr(trt, name) and dtype == getattr(trt, name):
            return tdt
    raise ModelFileError(f"engine tensor type {dtype} is not supported by this runner")


def is_aligned(address: int, alignment: int = 0) -> bool:
    """Whether a device address meets TensorRT's alignment rule (:data:`~cellseg_deploy.export.tensorrt.ALIGNMENT`)."""
    from cellseg_deploy.export.tensorrt import ALIGNMENT

    return address % (alignment or ALIGNMENT) == 0


def graph_key(shapes: Mapping[str, tuple[int, ...]]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The key of a captured CUDA graph: input names and shapes, in name order (a captured graph replays the
    shapes and addresses it was captured with, so one graph per distinct set of input shapes)."""
    return tuple(sorted((name, tuple(int(d) for d in shape)) for name, shape in shapes.items()))


def engine_memory_bytes(engine: Any) -> int:
    """Scratch memory an engine needs per execution context, for its largest profile shapes:
    ``device_memory_size_v2`` (TensorRT 10.1 and later, 11) or ``device_memory_size`` (10.0; removed in 11)."""
    if hasattr(engine, "device_memory_size_v2"):
        return int(engine.device_memory_size_v2)
    return int(engine.device_memory_size)


def set_context_memory(context: Any, address: int, size: int) -> None:
    """Give a context created with ``ExecutionContextAllocationStrategy.USER_MANAGED`` its scratch memory:
    ``set_device_memory(memory, size)`` (10.1 and later, 11) or the ``device_memory`` property (10.0)."""
    if hasattr(context, "set_device_memory"):
        context.set_device_memory(address, size)
    else:
        context.device_memory = address


@dataclass(frozen=True)
class DeviceMemoryPlan:
    """Scratch memory for every execution context of the executor.

    The stages run one at a time on one CUDA stream, and a CUDA graph replays on that stream too, so no two
    contexts ever execute at once: one buffer of the largest stage's size serves every context of every
    stage (TensorRT allows sharing among contexts that do not run concurrently), instead of one
    profile-maximum buffer per context.

    Attributes:
        per_stage: bytes each stage's engine asks for (``engine_memory_bytes``).
        shared_bytes: the one buffer's size (the largest, rounded up to the alignment).
    """

    per_stage: dict[str, int]
    shared_bytes: int

    def unshared_bytes(self, contexts: Mapping[str, int]) -> int:
        """What ``contexts`` (``{stage: count}``) would take with one buffer each (for the report)."""
        return sum(self.per_stage[s] * n for s, n in contexts.items())


def plan_device_memory(per_stage: Mapping[str, int]) -> DeviceMemoryPlan:
    """:class:`DeviceMemoryPlan` for the engines' sizes (bytes, ``>= 0``)."""
    from cellseg_deploy.export.tensorrt import ALIGNMENT

    largest = max(per_stage.values(), default=0)
    shared = max(ALIGNMENT, -(-largest // ALIGNMENT) * ALIGNMENT)
    return DeviceMemoryPlan(per_stage={s: int(n) for s, n in per_stage.items()}, shared_bytes=shared)


# ----------------------------------------------------------------------------------------------------------
# TensorRT: the GPU side (thin, over CudaApi)
# ----------------------------------------------------------------------------------------------------------
class _TrtStage:
    """One engine: its tensors, the execution context, and captured CUDA graphs (each with a context of its
    own, all sharing the executor's scratch memory)."""

    def __init__(
        self,
        trt: Any,
        runtime: Any,
        path: Path,
        cuda: Any,
        memory: Callable[[], tuple[int, int]],
        max_graphs: int,
    ) -> None:
        self.trt = trt
        self.path = path
        self.cuda = cuda
        self.device = cuda.tensor_device
        self.memory = memory
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ModelFileError(
                f"TensorRT could not load engine {path} (another TensorRT version or GPU?); rebuild it with "
                "'cellseg-deploy export --format trt'"
            )
        self.memory_bytes = engine_memory_bytes(self.engine)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: trt_torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.max_graphs = max_graphs
        self.context: Any = None
        self.graphs: OrderedDict[
            tuple[Any, ...], tuple[Any, Any, dict[str, torch.Tensor], dict[str, torch.Tensor]]
        ] = OrderedDict()
        self.graphs_failed = False
        self.contexts_created = 0

    def new_context(self) -> Any:
        """An execution context without memory of its own, given the executor's shared scratch buffer."""
        context = self.engine.create_execution_context(
            self.trt.ExecutionContextAllocationStrategy.USER_MANAGED
        )
        if context is None:
            raise BackendUnavailable(
                f"TensorRT could not create an execution context for {self.path.name} (out of GPU memory?)"
            )
        address, size = self.memory()
        set_context_memory(context, address, size)
        self.contexts_created += 1
        return context

    def prepare(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inputs in the engine's dtypes, contiguous, at aligned addresses (queued on the current stream)."""
        feed = {}
        for name in self.inputs:
            t = inputs[name].to(self.device, self.dtypes[name])
            if not t.is_contiguous() or not is_aligned(self.cuda.pointer(t)):
                # A slice (an RoI chunk) can start anywhere in its tensor: give TensorRT an aligned copy.
                copy = self.cuda.empty(tuple(t.shape), t.dtype)
                copy.copy_(t)
                t = copy
            feed[name] = t
        return feed

    def _bind(self, context: Any, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Set input shapes and addresses on ``context``; allocate outputs (on the current stream)."""
        for name in self.inputs:
            t = inputs[name]
            if not context.set_input_shape(name, tuple(t.shape)):
                raise ModelFileError(
                    f"engine {self.path.name}: input {name} shape {list(t.shape)} is outside its profile"
                )
            self._address(context, name, t)
        outs = {}
        for name in self.outputs:
            shape = tuple(context.get_tensor_shape(name))
            out = self.cuda.empty(shape, self.dtypes[name])
            self._address(context, name, out)
            outs[name] = out
        return outs

    def _address(self, context: Any, name: str, tensor: torch.Tensor) -> None:
        address = self.cuda.pointer(tensor)
        if not context.set_tensor_address(name, address):
            raise ModelFileError(
                f"engine {self.path.name}: TensorRT refused the address of {name} ({address:#x}; it needs "
                "256-byte alignment)"
            )

    def run(
        self, feed: Mapping[str, torch.Tensor], stream: Any, cuda_graphs: bool
    ) -> dict[str, torch.Tensor]:
        """Enqueue the engine on ``stream`` (inputs already prepared and ordered before it)."""
        if cuda_graphs and not self.graphs_failed:
            return self._run_graph(feed, stream)
        if self.context is None:
            self.context = self.new_context()
        with self.cuda.use(stream):
            outs = self._bind(self.context, feed)
            if not self.context.execute_async_v3(self.cuda.handle(stream)):
                raise ModelFileError(f"TensorRT execution of {self.path.name} failed; see its log above")
        return outs

    def _run_graph(self, feed: Mapping[str, torch.Tensor], stream: Any) -> dict[str, torch.Tensor]:
        key = graph_key({n: tuple(t.shape) for n, t in feed.items()})
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
        with self.cuda.use(stream):
            for name, t in feed.items():
                static_in[name].copy_(t)
            self.cuda.replay(graph)
            return {n: t.clone() for n, t in static_out.items()}

    def _capture(self, feed: Mapping[str, torch.Tensor], stream: Any) -> tuple[Any, Any, Any, Any]:
        """A context per shape (a captured graph keeps its shapes and addresses), warmed up once (TensorRT
        finishes shape-dependent setup on the first enqueue), then captured."""
        context = self.new_context()
        handle = self.cuda.handle(stream)
        with self.cuda.use(stream):
            static_in = {}
            for n, t in feed.items():
                static_in[n] = self.cuda.empty(tuple(t.shape), t.dtype)
                static_in[n].copy_(t)
            static_out = self._bind(context, static_in)
            if not context.execute_async_v3(handle):
                raise RuntimeError("warm-up execution failed")
        self.cuda.synchronize(stream)
        graph = self.cuda.new_graph()
        with self.cuda.capture(graph, stream):
            captured = context.execute_async_v3(handle)
        if not captured:
            raise RuntimeError("execute_async_v3 failed while capturing")
        return graph, context, static_in, static_out


class TrtExecutor(StageExecutor):
    """TensorRT engines, one per stage, on one GPU.

    Args:
        engines: ``{stage: path of its .engine}``.
        device: ``"cuda"`` or ``"cuda:N"``.
        cuda_graphs: capture one CUDA graph per input shape and replay it (saves launch overhead on small
            inputs). The runner then pads RoI counts to multiples of ``roi_bucket`` to bound the number of
            shapes. Every context (one plain, one per captured shape) shares one scratch buffer
            (:class:`DeviceMemoryPlan`).
        max_graphs: captured shapes kept per stage (least recently used dropped).
        roi_bucket: RoI padding multiple used with ``cuda_graphs``.
        cuda: the :class:`~cellseg_deploy.export.tensorrt.CudaApi` to use (default
            ``tensorrt.CUDA_API(index)``).

    Per call: the inputs are converted on the caller's (current) stream, then TensorRT's stream waits for
    that stream, so the engine reads finished inputs; afterwards the caller's stream waits for TensorRT's.
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
        cuda: Any = None,
    ) -> None:
        from cellseg_deploy.export import tensorrt as trt_export

        trt = trt_export.require_tensorrt()
        index = trt_export.cuda_index(device)
        self.cuda = cuda if cuda is not None else trt_export.CUDA_API(index)
        self.cuda.activate()
        self.device = self.cuda.tensor_device
        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.stream = self.cuda.new_stream()
        self.cuda_graphs = cuda_graphs
        self.roi_bucket = roi_bucket if cuda_graphs else 0
        self._scratch: torch.Tensor | None = None
        self.stages = {
            s: _TrtStage(trt, self.runtime, Path(p), self.cuda, self._scratch_memory, max_graphs)
            for s, p in engines.items()
        }
        self.memory_plan = plan_device_memory({s: st.memory_bytes for s, st in self.stages.items()})

    def _scratch_memory(self) -> tuple[int, int]:
        """``(address, size)`` of the scratch buffer shared by every context (allocated on first use)."""
        if self._scratch is None:
            self._scratch = self.cuda.empty((self.memory_plan.shared_bytes,), torch.uint8)
        return self.cuda.pointer(self._scratch), self.memory_plan.shared_bytes

    def run(self, stage: str, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        st = self.stages[stage]
        caller = self.cuda.current_stream()
        feed = st.prepare(inputs)  # queued on the caller's stream, so TensorRT's must wait after this
        self.cuda.wait(self.stream, caller)
        for t in feed.values():
            self.cuda.keep(t, self.stream)
        outs = st.run(feed, self.stream, self.cuda_graphs)
        self.cuda.wait(caller, self.stream)
        for t in outs.values():
            self.cuda.keep(t, caller)
        return {n: t.float() for n, t in outs.items()}

    def synchronize(self) -> None:
        self.syncs += 1
        self.cuda.synchronize()

    def mark(self) -> Any:
        return self.cuda.event()

    def elapsed_s(self, start: Any, end: Any) -> float:
        return self.cuda.elapsed_s(start, end)

    marks_need_sync = True

    def close(self) -> None:
        self.cuda.synchronize(self.stream)
        self.stages.clear()
        self._scratch = None

    def info(self) -> dict[str, Any]:
        contexts = {s: st.contexts_created for s, st in self.stages.items()}
        return {
            "executor": self.name,
            "tensorrt": str(self.trt.__version__),
            "cuda_graphs": self.cuda_graphs,
            "device_memory": {
                "shared_bytes": self.memory_plan.shared_bytes,
                "per_stage_bytes": dict(self.memory_plan.per_stage),
                "contexts": contexts,
                "unshared_bytes": self.memory_plan.unshared_bytes(contexts),
            },
        }
