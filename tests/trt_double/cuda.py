"""A CPU stand-in for :class:`cellseg_deploy.backends.tensorrt.build.CudaApi`: what the TensorRT path asks of CUDA.

How it stands in for CUDA:

- **Device memory** is host memory: "device" tensors are CPU tensors (``tensor_device`` is the CPU), and
  :meth:`FakeCuda.empty` returns them at 256-byte aligned addresses, as ``cudaMalloc`` does. Bytes handed out
  by it are counted (:attr:`FakeCuda.allocated_bytes`), and a budget (:attr:`FakeCuda.budget_bytes`) stands
  for the GPU's memory (the TensorRT double refuses a context it cannot fit).
- **Streams** are :class:`FakeStream` objects with an operation counter. While the double is active
  (:meth:`FakeCuda.__enter__`), a ``TorchFunctionMode`` records, for every tensor a torch call produces or
  writes, which stream was current and at which position. :meth:`FakeCuda.wait` records how far the waiting
  stream is ordered after the other. When TensorRT's double executes on a stream it asks
  :meth:`FakeCuda.check_ready` whether each input was written on that stream or before the point the stream
  last waited for: a missing ``wait_stream`` or a conversion queued after it (a real race on a GPU, silent
  there) raises here. Work itself runs at once on the host (the order of results equals stream order).
- **CUDA graphs**: inside :meth:`FakeCuda.capture`, TensorRT's double records its enqueue into the graph
  instead of running it; :meth:`FakeCuda.replay` runs the recorded work again (same bindings, same
  addresses, as a captured graph does).
- **Events** are host clock readings; **synchronisations** are counted (:attr:`FakeCuda.syncs`).
- The GPU it claims to be is ``name`` / ``capability`` (default an H100, sm_90).
"""

from __future__ import annotations

import contextlib
import itertools
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

ALIGNMENT = 256


class FakeStream:
    """A CUDA stream: an id (its ``cuda_stream`` handle), an operation counter, and how far it has waited for
    other streams (``waited[other id] = other's counter at the wait``)."""

    _ids = itertools.count(1)

    def __init__(self) -> None:
        self.cuda_stream = next(self._ids) * 0x1000
        self.position = 0
        self.waited: dict[int, int] = {}
        self.capturing: FakeGraph | None = None


class FakeGraph:
    """A captured CUDA graph: the work enqueued while capturing, replayed by :meth:`FakeCuda.replay`."""

    def __init__(self) -> None:
        self.work: list[Callable[[], None]] = []


_IN_PLACE_DUNDERS = frozenset(
    {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ior__", "__iand__"}
)


def _writes_in_place(name: str) -> bool:
    """``copy_``, ``zero_``, ``x[i] = v``, ``x += y``: calls that write their first argument (not ``__get__``)."""
    return (name.endswith("_") and not name.endswith("__")) or name in _IN_PLACE_DUNDERS


class _Tracker(TorchFunctionMode):
    """Records, per storage, the stream and position of its last write (see the module docstring)."""

    def __init__(self, cuda: FakeCuda) -> None:
        super().__init__()
        self.cuda = cuda

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        written = [out] if isinstance(out, torch.Tensor) else []
        if _writes_in_place(name) and args and isinstance(args[0], torch.Tensor):
            written.append(args[0])
        for t in written:
            self.cuda.record_write(t)
        return out


class FakeCuda:
    """The stand-in (see the module docstring). Use as a context manager to track stream order."""

    def __init__(
        self,
        index: int = 0,
        *,
        name: str = "NVIDIA H100 80GB HBM3 (test double)",
        capability: tuple[int, int] = (9, 0),
        budget_bytes: int = 1 << 34,
    ) -> None:
        self.index = index
        self._name = name
        self._capability = capability
        self.budget_bytes = budget_bytes
        self.allocated_bytes = 0
        self.syncs = 0
        self.activated: list[int] = []
        self.default = FakeStream()
        self.current = self.default
        self.streams: dict[int, FakeStream] = {self.default.cuda_stream: self.default}
        self.writes: dict[int, tuple[int, list[weakref.ref], int, int]] = {}
        self.races: list[str] = []
        self._tracker: _Tracker | None = None

    # -- tracking -----------------------------------------------------------------------------------------
    def __enter__(self) -> FakeCuda:
        self._tracker = _Tracker(self)
        self._tracker.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._tracker is not None
        self._tracker.__exit__(*exc)
        self._tracker = None

    def record_write(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        self.current.position += 1
        key = storage.data_ptr()
        old = self.writes.get(key)
        live = [r for r in (old[1] if old else []) if r() is not None][-7:]
        refs = [*live, weakref.ref(tensor)]
        self.writes[key] = (storage.nbytes(), refs, self.current.cuda_stream, self.current.position)
        if len(self.writes) > 4096:
            self.writes = {k: v for k, v in self.writes.items() if self.owner(k) is not None}

    def owner(self, key: int) -> torch.Tensor | None:
        """A live tensor on the storage that starts at ``key`` (``None`` once all are gone)."""
        entry = self.writes.get(key)
        for ref in reversed(entry[1] if entry else []):
            tensor = ref()
            if tensor is not None:
                return tensor
        return None

    def writer(self, address: int) -> tuple[int, int] | None:
        """``(stream handle, position)`` of the last tracked write to the memory at ``address``."""
        for start, (nbytes, _refs, stream, position) in list(self.writes.items()):
            if start <= address < start + max(nbytes, 1) and self.owner(start) is not None:
                return stream, position
        return None

    def check_ready(self, address: int, stream: FakeStream, what: str) -> None:
        """Raise if the memory at ``address`` was last written on another stream after ``stream`` last
        waited for that stream (TensorRT would read it before it is written)."""
        found = self.writer(address)
        if found is None:
            return
        producer, position = found
        if producer != stream.cuda_stream and stream.waited.get(producer, 0) < position:
            message = (
                f"{what} was written on stream {producer:#x} (op {position}) after stream "
                f"{stream.cuda_stream:#x} last waited for it (op {stream.waited.get(producer, 0)})"
            )
            self.races.append(message)
            raise RuntimeError(f"stream-order race: {message}")

    # -- CudaApi ------------------------------------------------------------------------------------------
    @staticmethod
    def unavailable_reason() -> str | None:
        return None

    @property
    def tensor_device(self) -> torch.device:
        return torch.device("cpu")

    def name(self) -> str:
        return self._name

    def capability(self) -> tuple[int, int]:
        return self._capability

    def runtime_version(self) -> str | None:
        return "13.0 (test double)"

    def activate(self) -> None:
        self.activated.append(self.index)

    def new_stream(self) -> FakeStream:
        stream = FakeStream()
        self.streams[stream.cuda_stream] = stream
        return stream

    def current_stream(self) -> FakeStream:
        return self.current

    @contextlib.contextmanager
    def use(self, stream: FakeStream) -> Iterator[None]:
        previous, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = previous

    def handle(self, stream: FakeStream) -> int:
        return stream.cuda_stream

    def wait(self, waiter: FakeStream, producer: FakeStream) -> None:
        waiter.waited[producer.cuda_stream] = producer.position

    def keep(self, tensor: torch.Tensor, stream: FakeStream) -> None:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError("record_stream takes a tensor")

    def synchronize(self, stream: FakeStream | None = None) -> None:
        self.syncs += 1

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = 1
        for d in shape:
            numel *= int(d)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        raw = torch.empty(nbytes + ALIGNMENT, dtype=torch.uint8)
        offset = (-raw.data_ptr()) % ALIGNMENT
        out = raw[offset : offset + nbytes].view(dtype).reshape(shape)
        self.allocated_bytes += nbytes
        self.record_write(out)
        return out

    def pointer(self, tensor: torch.Tensor) -> int:
        return int(tensor.data_ptr())

    def new_graph(self) -> FakeGraph:
        return FakeGraph()

    @contextlib.contextmanager
    def capture(self, graph: FakeGraph, stream: FakeStream) -> Iterator[None]:
        stream.capturing = graph
        try:
            with self.use(stream):
                yield
        finally:
            stream.capturing = None

    def replay(self, graph: FakeGraph) -> None:
        for work in graph.work:
            work()

    def event(self) -> float:
        return time.perf_counter()

    def elapsed_s(self, start: float, end: float) -> float:
        return end - start
