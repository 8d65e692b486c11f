"""A test double of NVIDIA's ``tensorrt`` Python module (TensorRT 10.x and 11.x), for CPU tests only.

:func:`build_module` returns a module named ``tensorrt`` holding **only** names that exist in the real
bindings of the version asked for; :data:`API` lists each one with the versions that have it and where that
was read (NVIDIA's TensorRT repository, ``python/src/infer/pyCore.cpp``, ``pyFoundationalTypes.cpp``,
``python/src/parsers/pyOnnx.cpp`` and ``python/packaging/bindings_wheel/tensorrt/__init__.py``, at the
release tags ``v10.0.0``, ``v10.16``, ``v11.0`` and ``v11.1``). A name absent from a version is absent here
too (``hasattr`` is False, a call raises AttributeError), so code that calls a name TensorRT does not have
fails the tests. ``tests/trt_double/test_double_api.py`` checks the classes against :data:`API`.

What it does instead of TensorRT:

- ``Builder`` + ``OnnxParser``: the parser reads the ONNX file (``onnx.load``) and records its inputs and
  outputs; ``build_serialized_network`` checks what TensorRT checks that matters here (an optimisation
  profile for every dynamic input; no precision flag on a strongly typed network) and returns a "plan": a
  JSON header (version, GPU, typing, flags, profile) followed by the ONNX bytes.
- Timing caches carry the TensorRT version and GPU that made them: ``create_timing_cache`` returns ``None``
  for another version's bytes (TensorRT cannot read them) and ``set_timing_cache(..., ignore_mismatch=False)``
  returns False for another GPU's.
- ``Runtime.deserialize_cuda_engine`` returns ``None`` for a plan of another version or GPU architecture.
  The engine executes its graph with ONNX Runtime (CPU provider), reading inputs from and writing outputs to
  the addresses given with ``set_tensor_address`` (which, as TensorRT does, refuses addresses that are not
  256-byte aligned).
- CUDA (streams, device memory, graphs) is :class:`tests.trt_double.cuda.FakeCuda`: ``execute_async_v3`` on
  a stream checks that every input was ordered before it on that stream, and on a capturing stream records
  its work into the graph instead of running it. Contexts created ``STATIC`` take their memory from the fake
  GPU (``None`` when it does not fit, as ``create_execution_context`` returns on out-of-memory);
  ``USER_MANAGED`` contexts need ``set_device_memory`` (or the ``device_memory`` property on 10.0) first.
"""

from __future__ import annotations

import enum
import importlib.machinery
import json
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tests.trt_double.cuda import FakeCuda

SRC = "NVIDIA/TensorRT python/src/infer/pyCore.cpp"
SRC_TYPES = "NVIDIA/TensorRT python/src/infer/pyFoundationalTypes.cpp"
SRC_ONNX = "NVIDIA/TensorRT python/src/parsers/pyOnnx.cpp"
SRC_INIT = "NVIDIA/TensorRT python/packaging/bindings_wheel/tensorrt/__init__.py"
ALL = ("10.0", "11.99")
TEN = ("10.0", "10.99")

API: dict[str, tuple[tuple[str, str], str]] = {
    # name: ((first version, last version), where it was read; tags v10.0.0, v10.16, v11.0, v11.1)
    "__version__": (ALL, SRC_INIT),
    "Logger": (ALL, SRC),
    "Logger.WARNING": (ALL, SRC + " (Severity, export_values)"),
    "Logger.ERROR": (ALL, SRC + " (Severity, export_values)"),
    "Logger.INFO": (ALL, SRC + " (Severity, export_values)"),
    "Logger.INTERNAL_ERROR": (ALL, SRC + " (Severity, export_values)"),
    "Logger.VERBOSE": (ALL, SRC + " (Severity, export_values)"),
    "Logger.log": (ALL, SRC),
    "DataType": (ALL, SRC_TYPES),
    **{
        f"DataType.{m}": (ALL, SRC_TYPES)
        for m in ("FLOAT", "HALF", "BF16", "INT8", "INT32", "INT64", "BOOL", "UINT8")
    },
    "float32": (ALL, SRC_TYPES + ' m.attr("float32")'),
    "float16": (ALL, SRC_TYPES),
    "bfloat16": (ALL, SRC_TYPES + ' m.attr("bfloat16"); there is no "bf16"'),
    "int8": (ALL, SRC_TYPES),
    "int32": (ALL, SRC_TYPES),
    "int64": (ALL, SRC_TYPES),
    "bool": (ALL, SRC_TYPES),
    "uint8": (ALL, SRC_TYPES),
    "NetworkDefinitionCreationFlag": (ALL, SRC),
    "NetworkDefinitionCreationFlag.EXPLICIT_BATCH": (TEN, SRC + " (gone in v11.0)"),
    "NetworkDefinitionCreationFlag.STRONGLY_TYPED": (ALL, SRC + ' (v11.0: "Deprecated: always enabled")'),
    "BuilderFlag": (ALL, SRC),
    "BuilderFlag.FP16": (TEN, SRC + " (removed in v11.0)"),
    "BuilderFlag.TF32": (ALL, SRC),
    "MemoryPoolType": (ALL, SRC),
    "MemoryPoolType.WORKSPACE": (ALL, SRC),
    "TensorIOMode": (ALL, SRC),
    "TensorIOMode.NONE": (ALL, SRC),
    "TensorIOMode.INPUT": (ALL, SRC),
    "TensorIOMode.OUTPUT": (ALL, SRC),
    "ExecutionContextAllocationStrategy": (ALL, SRC),
    "ExecutionContextAllocationStrategy.STATIC": (ALL, SRC),
    "ExecutionContextAllocationStrategy.ON_PROFILE_CHANGE": (ALL, SRC),
    "ExecutionContextAllocationStrategy.USER_MANAGED": (ALL, SRC),
    "Builder": (ALL, SRC),
    "Builder.create_network": (ALL, SRC + ' ("flags"_a = 0U)'),
    "Builder.create_builder_config": (ALL, SRC),
    "Builder.create_optimization_profile": (ALL, SRC),
    "Builder.build_serialized_network": (ALL, SRC),
    "IBuilderConfig": (ALL, SRC),
    "IBuilderConfig.set_memory_pool_limit": (ALL, SRC),
    "IBuilderConfig.set_flag": (ALL, SRC),
    "IBuilderConfig.clear_flag": (ALL, SRC),
    "IBuilderConfig.get_flag": (ALL, SRC),
    "IBuilderConfig.add_optimization_profile": (ALL, SRC),
    "IBuilderConfig.create_timing_cache": (ALL, SRC + " (returns the ITimingCache, None when unreadable)"),
    "IBuilderConfig.set_timing_cache": (ALL, SRC + ' ("cache"_a, "ignore_mismatch"_a; returns bool)'),
    "IBuilderConfig.get_timing_cache": (ALL, SRC),
    "ITimingCache": (ALL, SRC),
    "ITimingCache.serialize": (ALL, SRC),
    "ITimingCache.combine": (ALL, SRC),
    "IOptimizationProfile": (ALL, SRC),
    "IOptimizationProfile.set_shape": (ALL, SRC),
    "OnnxParser": (ALL, SRC_ONNX),
    "OnnxParser.parse_from_file": (ALL, SRC_ONNX),
    "OnnxParser.num_errors": (ALL, SRC_ONNX),
    "OnnxParser.get_error": (ALL, SRC_ONNX),
    "ParserError": (ALL, SRC_ONNX),
    "ParserError.desc": (ALL, SRC_ONNX + " (and __str__)"),
    "Runtime": (ALL, SRC),
    "Runtime.deserialize_cuda_engine": (ALL, SRC),
    "ICudaEngine": (ALL, SRC),
    "ICudaEngine.num_io_tensors": (ALL, SRC),
    "ICudaEngine.get_tensor_name": (ALL, SRC),
    "ICudaEngine.get_tensor_mode": (ALL, SRC),
    "ICudaEngine.get_tensor_dtype": (ALL, SRC),
    "ICudaEngine.get_tensor_shape": (ALL, SRC),
    "ICudaEngine.get_tensor_profile_shape": (ALL, SRC),
    "ICudaEngine.create_execution_context": (ALL, SRC + ' (py::arg("strategy") = kSTATIC)'),
    "ICudaEngine.device_memory_size": (TEN, SRC + " (deprecated in 10.1, gone in v11.0)"),
    "ICudaEngine.device_memory_size_v2": (("10.1", "11.99"), SRC + " (v10.1.0 on)"),
    "ICudaEngine.serialize": (ALL, SRC),
    "IExecutionContext": (ALL, SRC),
    "IExecutionContext.set_input_shape": (ALL, SRC),
    "IExecutionContext.get_tensor_shape": (ALL, SRC),
    "IExecutionContext.set_tensor_address": (
        ALL,
        SRC + " (returns bool; NvInferRuntime.h: 256-byte alignment)",
    ),
    "IExecutionContext.execute_async_v3": (ALL, SRC + ' ("stream_handle"_a; returns bool)'),
    "IExecutionContext.device_memory": (ALL, SRC + " (write-only property)"),
    "IExecutionContext.set_device_memory": (("10.1", "11.99"), SRC + ' ("memory"_a, "size"_a; v10.1.0 on)'),
}
"""Every name the double has, ``(first, last)`` TensorRT version with it, and where that was read."""

VERSIONS = ("10.0.1.6", "10.16.0.72", "11.1.0.5")
"""The versions the tests run the double as (the first and last 10.x API, and 11.x)."""


def _vkey(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def available(name: str, version: str) -> bool:
    """Whether ``name`` (a key of :data:`API`) exists in TensorRT ``version``."""
    (first, last), _ = API[name]
    return _vkey(first) <= _vkey(version) <= _vkey(last)


MAGIC = b"TRT-DOUBLE-PLAN\n"
CACHE_MAGIC = b"TRT-DOUBLE-CACHE\n"


def read_plan(data: bytes) -> dict[str, Any]:
    """The header of a plan this double built (for tests: typing, flags, version, GPU, profile)."""
    head = data[len(MAGIC) :].split(b"\n", 1)[0]
    return json.loads(head)


@dataclass
class State:
    """What the double shares between its objects: version, the fake GPU, the log, and test switches."""

    version: str
    cuda: FakeCuda
    logs: list[tuple[str, str]] = field(default_factory=list)
    fail_capture: bool = False
    contexts: int = 0


class _Unavailable:
    """A class attribute that is not there in this TensorRT version."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        raise AttributeError(f"this TensorRT version has no {self.name!r}")

    def __set__(self, obj: Any, value: Any) -> None:
        raise AttributeError(f"this TensorRT version has no {self.name!r}")


def build_module(version: str, cuda: FakeCuda) -> tuple[types.ModuleType, State]:
    """A fresh ``tensorrt`` module double of ``version`` on the fake GPU ``cuda``, and its :class:`State`
    (kept outside the module, which holds only TensorRT's own names)."""
    state = State(version=version, cuda=cuda)
    mod = types.ModuleType("tensorrt", f"test double of TensorRT {version} (tests/trt_double)")
    mod.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # what importlib.util.find_spec reads

    def members(enum_name: str, values: dict[str, int]) -> dict[str, int]:
        return {k: v for k, v in values.items() if available(f"{enum_name}.{k}", version)}

    DataType = enum.Enum(
        "DataType",
        {"FLOAT": 0, "HALF": 1, "INT8": 2, "INT32": 3, "BOOL": 4, "UINT8": 5, "BF16": 7, "INT64": 8},
    )
    NetworkDefinitionCreationFlag = enum.IntEnum(
        "NetworkDefinitionCreationFlag",
        members("NetworkDefinitionCreationFlag", {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1}),
    )
    BuilderFlag = enum.IntEnum("BuilderFlag", members("BuilderFlag", {"FP16": 0, "TF32": 7}))
    MemoryPoolType = enum.Enum("MemoryPoolType", {"WORKSPACE": 0})
    TensorIOMode = enum.Enum("TensorIOMode", {"NONE": 0, "INPUT": 1, "OUTPUT": 2})
    Strategy = enum.Enum(
        "ExecutionContextAllocationStrategy", {"STATIC": 0, "ON_PROFILE_CHANGE": 1, "USER_MANAGED": 2}
    )
    np_types = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT64: np.int64}
    onnx_types = {1: DataType.FLOAT, 10: DataType.HALF, 7: DataType.INT64}

    def log(severity: str, message: str) -> None:
        state.logs.append((severity, message))

    class Logger:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self, min_severity: int = 2) -> None:
            self._min = min_severity

        def log(self, severity: int, msg: str) -> None:
            log(str(severity), msg)

    class ParserError:
        def __init__(self, text: str) -> None:
            self._text = text

        def desc(self) -> str:
            return self._text

        def __str__(self) -> str:
            return self._text

    class _Network:
        def __init__(self, flags: int) -> None:
            self._flags = flags
            self._graph: Path | None = None
            self._inputs: dict[str, tuple[Any, tuple[Any, ...]]] = {}
            self._outputs: dict[str, tuple[Any, tuple[Any, ...]]] = {}

        @property
        def _strongly_typed(self) -> bool:
            if _vkey(version)[0] >= 11:
                return True
            return bool(self._flags & (1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)))

    class OnnxParser:
        def __init__(self, network: _Network, logger: Logger) -> None:
            self._network = network
            self._errors: list[ParserError] = []

        def parse_from_file(self, model: str) -> bool:
            import onnx

            try:
                proto = onnx.load(model)
                onnx.checker.check_model(proto)
            except Exception as exc:
                self._errors.append(ParserError(f"{type(exc).__name__}: {exc}"))
                return False

            def spec(v: Any) -> tuple[Any, tuple[Any, ...]]:
                t = v.type.tensor_type
                dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
                return onnx_types[t.elem_type], dims

            inits = {i.name for i in proto.graph.initializer}
            self._network._inputs = {v.name: spec(v) for v in proto.graph.input if v.name not in inits}
            self._network._outputs = {v.name: spec(v) for v in proto.graph.output}
            self._network._graph = Path(model)
            return True

        @property
        def num_errors(self) -> int:
            return len(self._errors)

        def get_error(self, index: int) -> ParserError:
            return self._errors[index]

    class IOptimizationProfile:
        def __init__(self) -> None:
            self._shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

        def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:
            self._shapes[input] = (tuple(min), tuple(opt), tuple(max))

    class ITimingCache:
        def __init__(self, trt_version: str, capability: list[int], entries: dict[str, int]) -> None:
            self._version = trt_version
            self._capability = list(capability)
            self._entries = dict(entries)

        def serialize(self) -> bytes:
            head = {"version": self._version, "capability": self._capability}
            return CACHE_MAGIC + json.dumps(head).encode() + b"\n" + json.dumps(self._entries).encode()

        def combine(self, input_cache: ITimingCache, ignore_mismatch: bool) -> bool:
            if input_cache._capability != self._capability and not ignore_mismatch:
                return False
            self._entries.update(input_cache._entries)
            return True

    def gpu() -> list[int]:
        return list(state.cuda.capability())

    class IBuilderConfig:
        def __init__(self) -> None:
            self._flags: set[int] = {int(BuilderFlag.TF32)}  # TF32 is on by default in TensorRT
            self._pools: dict[Any, int] = {}
            self._profiles: list[IOptimizationProfile] = []
            self._cache: ITimingCache | None = None

        def set_memory_pool_limit(self, pool: Any, pool_size: int) -> None:
            self._pools[pool] = int(pool_size)

        def set_flag(self, flag: Any) -> None:
            self._flags.add(int(flag))

        def clear_flag(self, flag: Any) -> None:
            self._flags.discard(int(flag))

        def get_flag(self, flag: Any) -> bool:
            return int(flag) in self._flags

        def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
            self._profiles.append(profile)
            return len(self._profiles) - 1

        def create_timing_cache(self, serialized_timing_cache: Any) -> ITimingCache | None:
            data = bytes(memoryview(serialized_timing_cache))
            if not data:
                return ITimingCache(version, gpu(), {})
            if not data.startswith(CACHE_MAGIC):
                log("ERROR", "timing cache: unknown format")
                return None
            head, body = data[len(CACHE_MAGIC) :].split(b"\n", 1)
            meta = json.loads(head)
            if meta["version"] != version:
                log("ERROR", f"timing cache was serialized by TensorRT {meta['version']}, this is {version}")
                return None
            return ITimingCache(meta["version"], meta["capability"], json.loads(body))

        def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
            if not isinstance(cache, ITimingCache):
                raise TypeError("set_timing_cache(): incompatible function arguments")
            if cache._capability != gpu() and not ignore_mismatch:
                return False
            self._cache = cache
            return True

        def get_timing_cache(self) -> ITimingCache | None:
            return self._cache

    class Builder:
        def __init__(self, logger: Logger) -> None:
            self._logger = logger

        def create_network(self, flags: int = 0) -> _Network:
            if _vkey(version)[0] >= 11 and flags & 1:  # bit 0 was EXPLICIT_BATCH: gone in 11
                raise TypeError("create_network(): flag EXPLICIT_BATCH does not exist in TensorRT 11")
            return _Network(int(flags))

        def create_builder_config(self) -> IBuilderConfig:
            return IBuilderConfig()

        def create_optimization_profile(self) -> IOptimizationProfile:
            return IOptimizationProfile()

        def build_serialized_network(self, network: _Network, config: IBuilderConfig) -> bytes | None:
            if network._graph is None:
                log("ERROR", "network has no layers")
                return None
            if (
                network._strongly_typed
                and "FP16" in BuilderFlag.__members__
                and config.get_flag(BuilderFlag.FP16)
            ):
                log("ERROR", "BuilderFlag.FP16 is not allowed on a strongly typed network")
                return None
            shapes: dict[str, Any] = {}
            for name, (_dtype, dims) in network._inputs.items():
                found = [p._shapes[name] for p in config._profiles if name in p._shapes]
                if -1 in dims and not found:
                    log("ERROR", f"dynamic input {name} has no optimisation profile")
                    return None
                shapes[name] = [list(s) for s in found[0]] if found else [list(dims)] * 3
            data = network._graph.read_bytes()
            if config._cache is not None:
                config._cache._entries[str(hash(data))] = len(data)
            head = {
                "version": version,
                "capability": gpu(),
                "typing": "strong" if network._strongly_typed else "weak",
                "fp16_flag": "FP16" in BuilderFlag.__members__ and config.get_flag(BuilderFlag.FP16),
                "tf32": config.get_flag(BuilderFlag.TF32),
                "graph": network._graph.name,
                "profile": shapes,
                "inputs": {n: [d.name, list(s)] for n, (d, s) in network._inputs.items()},
                "outputs": {n: [d.name, list(s)] for n, (d, s) in network._outputs.items()},
            }
            return MAGIC + json.dumps(head).encode() + b"\n" + data

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            self._logger = logger

        def deserialize_cuda_engine(self, serialized_engine: Any) -> ICudaEngine | None:
            data = bytes(memoryview(serialized_engine))
            if not data.startswith(MAGIC):
                log("ERROR", "not a serialized engine")
                return None
            head = read_plan(data)
            if head["version"] != version or head["capability"] != gpu():
                log("ERROR", f"engine plan made by TensorRT {head['version']} for sm {head['capability']}")
                return None
            return ICudaEngine(head, data.split(b"\n", 2)[2])

    class ICudaEngine:
        def __init__(self, head: dict[str, Any], onnx_bytes: bytes) -> None:
            import onnxruntime as ort

            self._head = head
            self._session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
            self._io = [
                (n, TensorIOMode.INPUT, DataType[d], tuple(s)) for n, (d, s) in head["inputs"].items()
            ]
            self._io += [
                (n, TensorIOMode.OUTPUT, DataType[d], tuple(s)) for n, (d, s) in head["outputs"].items()
            ]
            self._bytes = onnx_bytes
            self._shape_cache: dict[tuple[int, ...], dict[str, tuple[int, ...]]] = {}

        def _find(self, name: str) -> tuple[Any, ...]:
            for entry in self._io:
                if entry[0] == name:
                    return entry
            raise KeyError(name)

        @property
        def num_io_tensors(self) -> int:
            return len(self._io)

        def get_tensor_name(self, index: int) -> str:
            return self._io[index][0]

        def get_tensor_mode(self, name: str) -> Any:
            try:
                return self._find(name)[1]
            except KeyError:
                return TensorIOMode.NONE

        def get_tensor_dtype(self, name: str) -> Any:
            return self._find(name)[2]

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return self._find(name)[3]

        def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
            return [tuple(s) for s in self._head["profile"][name]]

        def _memory(self) -> int:
            # A stand-in for the activations: four times the largest input, at least 1 KiB.
            largest = 0
            for shapes in self._head["profile"].values():
                largest = max(largest, int(np.prod(shapes[2])) * 4)
            return max(1024, 4 * largest)

        device_memory_size = property(_memory)
        device_memory_size_v2 = property(_memory)

        def create_execution_context(self, strategy: Any = Strategy.STATIC) -> IExecutionContext | None:
            memory = None
            if strategy == Strategy.STATIC:
                if state.cuda.allocated_bytes + self._memory() > state.cuda.budget_bytes:
                    log("ERROR", "out of device memory")
                    return None
                memory = state.cuda.empty((self._memory(),), torch.uint8)
            state.contexts += 1
            return IExecutionContext(self, memory)

        def serialize(self) -> bytes:
            return MAGIC + json.dumps(self._head).encode() + b"\n" + self._bytes

        def _output_shapes(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
            key = tuple(d for s in shapes.values() for d in s)
            if key not in self._shape_cache:
                feed = {n: np.zeros(s, dtype=np.float32) for n, s in shapes.items()}
                names = [o.name for o in self._session.get_outputs()]
                outs = self._session.run(names, feed)
                self._shape_cache[key] = {n: tuple(o.shape) for n, o in zip(names, outs, strict=True)}
            return self._shape_cache[key]

    def view_at(address: int, shape: tuple[int, ...], dtype: torch.dtype, what: str) -> torch.Tensor:
        for start, (nbytes, _refs, _s, _p) in list(state.cuda.writes.items()):
            owner = state.cuda.owner(start) if start <= address < start + nbytes else None
            if owner is not None:
                size = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
                if address + size > start + nbytes:
                    raise RuntimeError(f"{what}: {size} bytes at {address:#x} run past the allocation")
                storage = owner.untyped_storage()
                raw = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (storage.nbytes(),), (1,))
                return raw[address - start : address - start + size].view(dtype).reshape(shape)
        raise RuntimeError(f"{what}: address {address:#x} is not device memory of this process")

    torch_types = {DataType.FLOAT: torch.float32, DataType.HALF: torch.float16, DataType.INT64: torch.int64}

    class IExecutionContext:
        def __init__(self, engine: ICudaEngine, memory: torch.Tensor | None) -> None:
            self._engine = engine
            self._memory = memory
            self._memory_size = engine._memory() if memory is not None else 0
            self._shapes: dict[str, tuple[int, ...]] = {}
            self._addresses: dict[str, int] = {}

        def set_input_shape(self, name: str, shape: Any) -> bool:
            shape = tuple(int(d) for d in shape)
            lo, _opt, hi = self._engine._head["profile"][name]
            if len(shape) != len(lo) or not all(a <= d <= b for a, d, b in zip(lo, shape, hi, strict=True)):
                log("ERROR", f"{name}: shape {shape} outside the profile {lo}..{hi}")
                return False
            self._shapes[name] = shape
            return True

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            if name in self._shapes:
                return self._shapes[name]
            if self._engine.get_tensor_mode(name) == TensorIOMode.OUTPUT:
                return self._engine._output_shapes(self._shapes)[name]
            return self._engine.get_tensor_shape(name)

        def set_tensor_address(self, name: str, memory: int) -> bool:
            if self._engine.get_tensor_mode(name) == TensorIOMode.NONE:
                return False
            if int(memory) % 256:
                log("ERROR", f"{name}: address {int(memory):#x} is not 256-byte aligned")
                return False
            self._addresses[name] = int(memory)
            return True

        def _set_memory(self, memory: int) -> None:
            self._memory_address = int(memory)
            self._memory_size = self._engine._memory()

        device_memory = property(None, _set_memory)

        def set_device_memory(self, memory: int, size: int) -> None:
            if size < self._engine._memory():
                raise ValueError(
                    f"set_device_memory: {size} bytes, the engine needs {self._engine._memory()}"
                )
            self._memory_address = int(memory)
            self._memory_size = int(size)

        def execute_async_v3(self, stream_handle: int) -> bool:
            engine = self._engine
            if self._memory is None and getattr(self, "_memory_address", None) is None:
                log("ERROR", "execution context has no device memory")
                return False
            missing = [n for n, *_ in engine._io if n not in self._addresses]
            if missing or any(n not in self._shapes for n, m, *_ in engine._io if m == TensorIOMode.INPUT):
                log("ERROR", f"tensors without address or shape: {missing}")
                return False
            stream = state.cuda.streams[stream_handle]
            shapes = dict(self._shapes)
            addresses = dict(self._addresses)

            def work(check: bool = True) -> None:
                feed = {}
                for name, mode, dtype, _ in engine._io:
                    if mode == TensorIOMode.INPUT:
                        if check:
                            state.cuda.check_ready(addresses[name], stream, f"input {name}")
                        feed[name] = view_at(addresses[name], shapes[name], torch_types[dtype], name)
                arrays = {n: t.numpy().astype(np_types[engine._find(n)[2]]) for n, t in feed.items()}
                names = [o.name for o in engine._session.get_outputs()]
                outs = engine._session.run(names, arrays)
                with state.cuda.use(stream):
                    for name, value in zip(names, outs, strict=True):
                        dtype = torch_types[engine._find(name)[2]]
                        dest = view_at(addresses[name], tuple(value.shape), dtype, name)
                        dest.copy_(torch.from_numpy(np.ascontiguousarray(value)))

            if stream.capturing is not None:
                if state.fail_capture:
                    log("ERROR", "enqueue is not capturable")
                    return False
                stream.capturing.work.append(work)
                return True
            work()
            return True

    for name, obj in {
        "__version__": version,
        "Logger": Logger,
        "DataType": DataType,
        "float32": DataType.FLOAT,
        "float16": DataType.HALF,
        "bfloat16": DataType.BF16,
        "int8": DataType.INT8,
        "int32": DataType.INT32,
        "int64": DataType.INT64,
        "bool": DataType.BOOL,
        "uint8": DataType.UINT8,
        "NetworkDefinitionCreationFlag": NetworkDefinitionCreationFlag,
        "BuilderFlag": BuilderFlag,
        "MemoryPoolType": MemoryPoolType,
        "TensorIOMode": TensorIOMode,
        "ExecutionContextAllocationStrategy": Strategy,
        "Builder": Builder,
        "IBuilderConfig": IBuilderConfig,
        "ITimingCache": ITimingCache,
        "IOptimizationProfile": IOptimizationProfile,
        "OnnxParser": OnnxParser,
        "ParserError": ParserError,
        "Runtime": Runtime,
        "ICudaEngine": ICudaEngine,
        "IExecutionContext": IExecutionContext,
    }.items():
        if not available(name, version):
            continue
        if isinstance(obj, type) and not issubclass(obj, enum.Enum):
            for attr in [a for a in vars(obj) if not a.startswith("_")]:
                if f"{name}.{attr}" in API and not available(f"{name}.{attr}", version):
                    unavailable = _Unavailable()
                    setattr(obj, attr, unavailable)
                    unavailable.__set_name__(obj, attr)
        setattr(mod, name, obj)
    return mod, state
