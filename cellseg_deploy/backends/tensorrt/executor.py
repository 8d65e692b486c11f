"""The TensorRT stage executor: engines run through the named-tensor API (``set_input_shape``,
``set_tensor_address``, ``execute_async_v3`` on a dedicated CUDA stream), outputs allocated by torch on the
GPU, optional CUDA-graph capture per input shape, one scratch buffer shared by every execution context.

Its decisions are plain functions tested on the CPU (:func:`trt_torch_dtype`, :func:`is_aligned`,
:func:`graph_key`, :func:`plan_device_memory`, ...); its CUDA calls go through
:class:`~cellseg_deploy.backends.tensorrt.build.CudaApi`. TensorRT fp32 engines are built without TF32.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cellseg_deploy.backends.staged.executors import StageExecutor
from cellseg_deploy.errors import BackendUnavailable, ModelFileError

log = logging.getLogger(__name__)

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
    """Whether a device address meets TensorRT's alignment rule (:data:`~cellseg_deploy.backends.tensorrt.build.ALIGNMENT`)."""
    from cellseg_deploy.backends.tensorrt.build import ALIGNMENT

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
    from cellseg_deploy.backends.tensorrt.build import ALIGNMENT

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
        cuda: the :class:`~cellseg_deploy.backends.tensorrt.build.CudaApi` to use (default
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
        from cellseg_deploy.backends.tensorrt import build as trt_export

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
