"""TensorRT engines for the stage graphs (:mod:`cellseg_deploy.backends.staged.stages`), and their manifest.

One engine per stage (``backbone_rpn``, ``box_head``, ``mask_head``), built with an optimisation profile
(min/opt/max image size and RoI count), a workspace limit and a timing cache shared by every build in the
folder. Engines are written atomically next to ``engines.json``, which records the TensorRT version, GPU
name and compute capability, precision, profile, and the SHA-256 of the source graphs and checkpoint.

Precision, the same on every supported TensorRT (see :func:`build_plan`): networks are **strongly typed**,
so each layer runs in the type its ONNX graph gives it. ``fp16`` engines parse the FP16 stage graphs
(``*.fp16.onnx``: FP16 inside, float32 at the boundary, BatchNorm folded in float64 before the cast);
``fp32`` engines parse the FP32 graphs with TF32 switched off. TensorRT 10 needs the network-creation flag
``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` for that; TensorRT 11 networks are always strongly typed
(the flag is deprecated there and not passed). ``BuilderFlag.FP16`` (weak typing, deprecated in 10.12 and
removed in 11.0) is never used, so engines built on 10 and 11 compute in the same precisions and their
parity and benchmarks compare.

An engine only loads on the TensorRT version and GPU architecture it was built with: a runner compares
``engines.json`` with the machine (:func:`engine_mismatch`) and refuses with a one-line "rebuild" message
(or rebuilds when asked). Every decision that needs no GPU is a plain function here (build plans, network
flags, timing-cache handling, manifests, mismatch checks, device indices, device-memory plans, CUDA-graph
keys, alignment); :class:`CudaApi` is the one place the TensorRT path calls CUDA (through ``torch.cuda``),
so the tests can stand in for it on a CPU.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellseg_deploy.backends.staged.stages import (
    STAGE_INPUTS,
    STAGES,
    StageFolder,
    StageProfile,
    load_stage_folder,
)
from cellseg_deploy.errors import BackendUnavailable, ConfigError, ModelFileError
from cellseg_deploy.io_utils import atomic_write_bytes, atomic_write_json, sha256_file

log = logging.getLogger(__name__)

ENGINES_FORMAT = "cellseg-deploy/engines/1"
ENGINES_MANIFEST = "engines.json"
SUPPORTED_TRT_MAJORS: tuple[int, ...] = (10, 11)
TIMING_CACHE_NAME = "timing.cache"
INSTALL_HINT = (
    "pip install 'cellseg-deploy[trt]' from NVIDIA's package index on a machine with an NVIDIA GPU and driver"
)


# ----------------------------------------------------------------------------------------------------------
# CUDA, as the TensorRT path uses it
# ----------------------------------------------------------------------------------------------------------
ALIGNMENT = 256
"""Bytes: TensorRT's ``setTensorAddress`` wants every device address aligned to at least 256 bytes
(``NvInferRuntime.h``, TensorRT 10 and 11)."""


def cuda_index(device: str | Any) -> int:
    """The GPU index of a CUDA device name (``"cuda"`` -> 0, ``"cuda:1"`` -> 1), via
    :func:`cellseg_deploy.backends.devices.parse_device`; TensorRT runs on GPUs only.

    Raises:
        UserError: not a CUDA device (``ConfigError`` for a malformed name).
    """
    from cellseg_deploy.backends.devices import parse_device
    from cellseg_deploy.errors import UserError

    kind, index = parse_device(device)
    if kind != "cuda" or index is None:
        raise UserError(
            f"TensorRT runs on an NVIDIA GPU; got device {device!r}: use --device cuda (or cuda:N)"
        )
    return index


class CudaApi:
    """Every CUDA call of the TensorRT path, through ``torch.cuda``, for one GPU (``index``).

    Keeping them here, behind one small class, leaves the rest of the path (plans, bindings, ordering of
    stream operations) plain Python that the tests run on a CPU with a stand-in for this class
    (``tests/trt_double/cuda.py``), selected through :data:`CUDA_API`.
    """

    def __init__(self, index: int = 0) -> None:
        self.index = int(index)

    @staticmethod
    def unavailable_reason() -> str | None:
        """``None`` when torch sees a CUDA GPU, else why not (one line)."""
        import torch

        if not torch.cuda.is_available():
            return "torch sees no NVIDIA GPU here (torch.cuda.is_available() is False)"
        return None

    @property
    def tensor_device(self) -> Any:
        """Where stage tensors live: ``torch.device("cuda", index)``."""
        import torch

        return torch.device("cuda", self.index)

    def name(self) -> str:
        import torch

        return str(torch.cuda.get_device_name(self.index))

    def capability(self) -> tuple[int, int]:
        import torch

        major, minor = torch.cuda.get_device_capability(self.index)
        return int(major), int(minor)

    def runtime_version(self) -> str | None:
        import torch

        return torch.version.cuda

    def activate(self) -> None:
        """Make this GPU torch's current device (TensorRT allocates on the current device)."""
        import torch

        torch.cuda.set_device(self.index)

    def new_stream(self) -> Any:
        import torch

        return torch.cuda.Stream(device=self.index)

    def current_stream(self) -> Any:
        import torch

        return torch.cuda.current_stream(self.index)

    def use(self, stream: Any) -> Any:
        """Context manager: torch ops inside it are queued on ``stream``."""
        import torch

        return torch.cuda.stream(stream)

    def handle(self, stream: Any) -> int:
        """The ``cudaStream_t`` TensorRT's ``execute_async_v3`` takes."""
        return int(stream.cuda_stream)

    def wait(self, waiter: Any, producer: Any) -> None:
        """Work queued on ``waiter`` from now on starts after everything queued on ``producer`` so far."""
        waiter.wait_stream(producer)

    def keep(self, tensor: Any, stream: Any) -> None:
        """Tell torch's allocator that ``stream`` uses ``tensor`` (its memory is not reused before that work)."""
        tensor.record_stream(stream)

    def synchronize(self, stream: Any | None = None) -> None:
        """Block the host until ``stream`` (default: the whole device) is idle."""
        import torch

        if stream is None:
            torch.cuda.synchronize(self.index)
        else:
            stream.synchronize()

    def empty(self, shape: tuple[int, ...], dtype: Any) -> Any:
        """An uninitialised tensor on the GPU (torch's caching allocator: 512-byte aligned blocks)."""
        import torch

        return torch.empty(shape, dtype=dtype, device=self.tensor_device)

    def pointer(self, tensor: Any) -> int:
        """The device address TensorRT is given for ``tensor``."""
        return int(tensor.data_ptr())

    def new_graph(self) -> Any:
        import torch

        return torch.cuda.CUDAGraph()

    def capture(self, graph: Any, stream: Any) -> Any:
        """Context manager: the work queued on ``stream`` inside it is recorded into ``graph``, not run."""
        import torch

        return torch.cuda.graph(graph, stream=stream)

    def replay(self, graph: Any) -> None:
        graph.replay()

    def event(self) -> Any:
        """A timing event recorded now on the current stream."""
        import torch

        ev = torch.cuda.Event(enable_timing=True)
        ev.record(torch.cuda.current_stream(self.index))
        return ev

    def elapsed_s(self, start: Any, end: Any) -> float:
        """Seconds between two recorded events (both must have completed: synchronise first)."""
        return float(start.elapsed_time(end)) / 1000.0


CUDA_API: Callable[[int], CudaApi] = CudaApi
"""Factory of the :class:`CudaApi` of a GPU index (tests put a CPU stand-in here)."""


# ----------------------------------------------------------------------------------------------------------
# Availability and environment
# ----------------------------------------------------------------------------------------------------------
def trt_unavailable_reason() -> str | None:
    """``None`` when TensorRT can run here, else one line: what is missing and how to get it."""
    try:
        import tensorrt as trt
    except ImportError:
        return f"TensorRT is not installed (no 'tensorrt' module): {INSTALL_HINT}"
    except Exception as exc:  # a broken install raises OSError/RuntimeError on import
        return f"TensorRT failed to import ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}): {INSTALL_HINT}"
    major = _major(str(trt.__version__))
    if major not in SUPPORTED_TRT_MAJORS:
        return (
            f"TensorRT {trt.__version__} is not supported (supported majors: {list(SUPPORTED_TRT_MAJORS)}); "
            "pip install 'tensorrt>=10,<12'"
        )
    gpu = CUDA_API(0).unavailable_reason()
    if gpu is not None:
        return f"TensorRT needs an NVIDIA GPU: {gpu}; {INSTALL_HINT}, or run the stages with --engine staged-onnx"
    return None


def require_tensorrt() -> Any:
    """The ``tensorrt`` module, or :class:`BackendUnavailable` with :func:`trt_unavailable_reason`'s line."""
    reason = trt_unavailable_reason()
    if reason is not None:
        raise BackendUnavailable(reason)
    import tensorrt as trt

    return trt


def _major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        return -1


@dataclass(frozen=True)
class TrtEnvironment:
    """What an engine is tied to: TensorRT version and GPU.

    Attributes:
        trt_version: ``tensorrt.__version__`` (e.g. ``"10.9.0.34"``).
        gpu_name: e.g. ``"NVIDIA H100 80GB HBM3"``.
        compute_capability: ``(major, minor)``, e.g. ``(9, 0)``.
        cuda_version: CUDA runtime torch was built with (informational).
    """

    trt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]
    cuda_version: str | None = None

    @property
    def sm(self) -> str:
        """``"sm_90"`` for compute capability 9.0."""
        return f"sm_{self.compute_capability[0]}{self.compute_capability[1]}"

    def describe(self) -> str:
        return f"TensorRT {self.trt_version} on {self.gpu_name} ({self.sm})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "trt_version": self.trt_version,
            "gpu_name": self.gpu_name,
            "compute_capability": list(self.compute_capability),
            "cuda_version": self.cuda_version,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrtEnvironment:
        cc = data.get("compute_capability") or [0, 0]
        return cls(
            trt_version=str(data.get("trt_version", "")),
            gpu_name=str(data.get("gpu_name", "")),
            compute_capability=(int(cc[0]), int(cc[1])),
            cuda_version=data.get("cuda_version"),
        )


def current_environment(device: int | str = 0) -> TrtEnvironment:
    """TensorRT version and GPU of this machine (needs TensorRT and a GPU); ``device``: an index or a CUDA
    device name (``"cuda"``, ``"cuda:1"``)."""
    trt = require_tensorrt()
    cuda = CUDA_API(device if isinstance(device, int) else cuda_index(device))
    return TrtEnvironment(
        trt_version=str(trt.__version__),
        gpu_name=cuda.name(),
        compute_capability=cuda.capability(),
        cuda_version=cuda.runtime_version(),
    )


# ----------------------------------------------------------------------------------------------------------
# Build plan (pure)
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BuildPlan:
    """How to build engines of one precision on one TensorRT version.

    Attributes:
        precision: ``"fp32"`` or ``"fp16"``.
        graph_precision: which stage graphs to parse (the same as ``precision``: strong typing takes the
            precision from the graph).
        trt_major: 10 or 11.
        disable_tf32: clear ``BuilderFlag.TF32`` so ``fp32`` engines compute in true FP32.
    """

    precision: str
    graph_precision: str
    trt_major: int
    disable_tf32: bool

    @property
    def typing(self) -> str:
        """Always ``"strong"``: the one typing mode of every supported version."""
        return "strong"

    def network_flags(self, strongly_typed_bit: int) -> int:
        """The ``flags`` of ``Builder.create_network``; ``strongly_typed_bit``:
        ``int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)``. See :func:`network_flags`."""
        return network_flags(self.trt_major, strongly_typed_bit)


def network_flags(trt_major: int, strongly_typed_bit: int) -> int:
    """``Builder.create_network(flags)`` for a strongly typed network.

    TensorRT 10 builds weakly typed networks unless ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` is set
    (``1 << STRONGLY_TYPED``); in TensorRT 11 every network is strongly typed and that flag is deprecated
    ("always enabled", ``pyCore.cpp`` of 11.0), so nothing is passed.
    """
    if trt_major == 10:
        return 1 << int(strongly_typed_bit)
    if trt_major == 11:
        return 0
    raise BackendUnavailable(
        f"TensorRT {trt_major}.x is not supported (supported majors: {list(SUPPORTED_TRT_MAJORS)})"
    )


def build_plan(trt_version: str, precision: str) -> BuildPlan:
    """Graphs and builder settings for ``precision`` on a TensorRT version (see the module docstring).

    Args:
        trt_version: ``tensorrt.__version__``.
        precision: ``"fp32"`` or ``"fp16"``.

    Raises:
        BackendUnavailable: an unsupported TensorRT major version.
        ConfigError: an unknown precision.
    """
    major = _major(trt_version)
    if major not in SUPPORTED_TRT_MAJORS:
        raise BackendUnavailable(
            f"TensorRT {trt_version} is not supported (supported majors: {list(SUPPORTED_TRT_MAJORS)}); "
            "pip install 'tensorrt>=10,<12'"
        )
    if precision not in ("fp32", "fp16"):
        raise ConfigError(f"engine precision {precision!r}; expected 'fp32' or 'fp16'")
    return BuildPlan(precision, precision, trt_major=major, disable_tf32=precision == "fp32")


def engine_file(stage: str, precision: str) -> str:
    """``backbone_rpn.fp16.engine``."""
    return f"{stage}.{precision}.engine"


def default_engine_dir(stage_dir: Path, precision: str) -> Path:
    """Where engines of ``precision`` go by default: ``<stage_dir>/engines/<precision>``."""
    return Path(stage_dir) / "engines" / precision


# ----------------------------------------------------------------------------------------------------------
# Manifest (pure)
# ----------------------------------------------------------------------------------------------------------
def engine_manifest(
    *,
    folder: StageFolder,
    out_dir: Path,
    plan: BuildPlan,
    env: TrtEnvironment,
    profile: StageProfile,
    engines: dict[str, dict[str, Any]],
    workspace_gib: float,
    build_seconds: dict[str, float],
) -> dict[str, Any]:
    """The ``engines.json`` dict.

    ``engines``: ``{stage: {"file", "sha256", "bytes"}}``. The stage folder is recorded relative to
    ``out_dir`` when it can be (so the pair can move together), with the model config, geometry and the
    SHA-256 of the graphs each engine was built from.
    """
    stage_dir = os.path.relpath(Path(folder.root).resolve(), Path(out_dir).resolve())
    stages = {}
    for stage in STAGES:
        stages[stage] = {
            **engines[stage],
            "source_graph": folder.graph(stage, plan.graph_precision).name,
            "source_graph_sha256": folder.graph_sha256(stage, plan.graph_precision),
            "input": STAGE_INPUTS[stage],
            "build_seconds": round(build_seconds.get(stage, 0.0), 3),
        }
    return {
        "format": ENGINES_FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "precision": plan.precision,
        "graph_precision": plan.graph_precision,
        "typing": plan.typing,
        "tf32": not plan.disable_tf32,
        "environment": env.to_dict(),
        "workspace_gib": workspace_gib,
        "profile": profile.to_dict(),
        "stage_dir": stage_dir,
        "stage_manifest_sha256": sha256_file(folder.root / "manifest.json"),
        "checkpoint_sha256": folder.manifest["checkpoint"]["sha256"],
        "model_config": folder.manifest["model_config"],
        "geometry": folder.manifest["geometry"],
        "stages": stages,
        "versions": {**folder.manifest.get("versions", {}), "tensorrt": env.trt_version},
    }


def engine_mismatch(
    manifest: dict[str, Any], env: TrtEnvironment, graph_sha256: dict[str, str] | None = None
) -> str | None:
    """Why engines described by ``manifest`` cannot run in ``env`` (one line ending in how to rebuild), or
    ``None`` when they can.

    Refused: another TensorRT version (engines are not portable across versions), another compute capability
    (GPU architecture), or source graphs whose SHA-256 differs from ``graph_sha256`` (``{stage: sha}``, the
    stage folder's current graphs: the engines are stale). A different GPU name of the same compute
    capability is allowed (TensorRT loads it; speed may differ) and only logged.
    """
    built = TrtEnvironment.from_dict(manifest.get("environment", {}))
    hint = "rebuild with 'cellseg-deploy export --format trt' (or runner option rebuild=true)"
    if built.trt_version != env.trt_version:
        return f"engines were built with {built.describe()}, this machine has {env.describe()}: TensorRT versions differ; {hint}"
    if built.compute_capability != env.compute_capability:
        return f"engines were built for {built.describe()}, this machine has {env.describe()}: GPU architectures differ; {hint}"
    if graph_sha256:
        stale = [
            s
            for s, sha in graph_sha256.items()
            if manifest.get("stages", {}).get(s, {}).get("source_graph_sha256") != sha
        ]
        if stale:
            return f"stage graph(s) {stale} changed after the engines were built; {hint}"
    if built.gpu_name != env.gpu_name:
        log.warning(
            "engines were built on %s and run on %s (same %s): they load, but timings may differ",
            built.gpu_name,
            env.gpu_name,
            env.sm,
        )
    return None


@dataclass(frozen=True)
class EngineSet:
    """A loaded ``engines.json``: its manifest and the stage folder it was built from."""

    root: Path
    manifest: dict[str, Any]

    @property
    def precision(self) -> str:
        return str(self.manifest["precision"])

    @property
    def stage_dir(self) -> Path:
        return (self.root / self.manifest["stage_dir"]).resolve()

    @property
    def profile(self) -> StageProfile:
        return StageProfile.from_dict(self.manifest["profile"])

    def engine_paths(self) -> dict[str, Path]:
        return {s: self.root / self.manifest["stages"][s]["file"] for s in STAGES}

    def verify_files(self) -> None:
        """Raise :class:`ModelFileError` when an engine is missing or differs from its recorded SHA-256."""
        for stage, path in self.engine_paths().items():
            if not path.is_file():
                raise ModelFileError(
                    f"engine {path} is missing; rebuild with 'cellseg-deploy export --format trt'"
                )
            if sha256_file(path) != self.manifest["stages"][stage]["sha256"]:
                raise ModelFileError(
                    f"engine {path} does not match the SHA-256 in {self.root / ENGINES_MANIFEST}; rebuild it"
                )


def load_engine_set(path: Path) -> EngineSet:
    """Read ``engines.json`` (or the folder holding it)."""
    from cellseg_deploy.backends.metadata import read_manifest

    missing = f"no {ENGINES_MANIFEST} at {path}; build engines with 'cellseg-deploy export --format trt'"
    manifest_path, manifest = read_manifest(
        path, ENGINES_MANIFEST, ENGINES_FORMAT, missing, "an engine manifest"
    )
    return EngineSet(root=manifest_path.parent, manifest=manifest)


def resolve_engine_manifest(model_path: Path, precision: str) -> Path:
    """``engines.json`` for a runner's ``model_path``: the file itself, a folder holding one, or a stage folder
    (then ``<stage folder>/engines/<precision>/engines.json``, which may not exist yet)."""
    model_path = Path(model_path)
    if model_path.is_file():
        return model_path
    if (model_path / ENGINES_MANIFEST).is_file():
        return model_path / ENGINES_MANIFEST
    return default_engine_dir(model_path, precision) / ENGINES_MANIFEST


# ----------------------------------------------------------------------------------------------------------
# Building (needs TensorRT and a GPU)
# ----------------------------------------------------------------------------------------------------------
@dataclass
class EngineBuildResult:
    """What :func:`build_engines` wrote.

    Attributes:
        out_dir: the engine folder; manifest: its ``engines.json``.
        engines: ``{stage: path}``; precision; environment: where they were built.
        timing_cache: the timing cache file used and updated; seconds: total build time.
    """

    out_dir: Path
    manifest: Path
    engines: dict[str, Path]
    precision: str
    environment: TrtEnvironment
    timing_cache: Path
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "manifest": str(self.manifest),
            "engines": {s: str(p) for s, p in self.engines.items()},
            "precision": self.precision,
            "environment": self.environment.to_dict(),
            "timing_cache": str(self.timing_cache),
            "seconds": round(self.seconds, 3),
        }


def build_engines(
    stage_dir: Path,
    out_dir: Path | None = None,
    *,
    fp16: bool = True,
    workspace_gib: float = 4,
    timing_cache: Path | None = None,
    profile: StageProfile | None = None,
) -> EngineBuildResult:
    """Build one TensorRT engine per stage of a stage folder.

    Args:
        stage_dir: made by :func:`~cellseg_deploy.backends.staged.export.export_staged` (or its ``manifest.json``).
        out_dir: engine folder; default ``<stage_dir>/engines/<fp16|fp32>``.
        fp16: build FP16 engines from the FP16 stage graphs (strongly typed, see :func:`build_plan`), else FP32.
        workspace_gib: builder workspace limit in GiB.
        timing_cache: timing cache file, read if present and rewritten after the builds; default
            ``<stage_dir>/engines/timing.cache`` (shared by both precisions).
        profile: optimisation profile; default the stage folder's.

    Raises:
        BackendUnavailable: no TensorRT or no GPU (checked first, one line with the install hint).
        ModelFileError: not a stage folder, a missing or changed graph, or TensorRT failed to parse or build.
    """
    trt = require_tensorrt()
    start = time.perf_counter()
    folder = load_stage_folder(Path(stage_dir))
    precision = "fp16" if fp16 else "fp32"
    plan = build_plan(str(trt.__version__), precision)
    graphs = folder.graphs(plan.graph_precision)
    profile = profile or folder.profile
    if workspace_gib <= 0:
        raise ConfigError(f"workspace must be positive (GiB), got {workspace_gib}")
    out_dir = Path(out_dir) if out_dir is not None else default_engine_dir(folder.root, precision)
    cache_path = (
        Path(timing_cache) if timing_cache is not None else folder.root / "engines" / TIMING_CACHE_NAME
    )
    env = current_environment()
    geometry = folder.geometry

    from tqdm import tqdm

    logger = trt.Logger(trt.Logger.WARNING)
    cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""
    engines: dict[str, dict[str, Any]] = {}
    paths: dict[str, Path] = {}
    seconds: dict[str, float] = {}
    for stage in tqdm(STAGES, desc=f"build {precision} engines", unit="engine", disable=None):
        t0 = time.perf_counter()
        shapes = profile.input_shapes(stage, geometry.channels, geometry.roi_size(stage))
        serialized, cache_bytes = _build_one(
            trt, logger, graphs[stage], STAGE_INPUTS[stage], shapes, plan, workspace_gib, cache_bytes
        )
        dest = atomic_write_bytes(out_dir / engine_file(stage, precision), serialized)
        seconds[stage] = time.perf_counter() - t0
        engines[stage] = {"file": dest.name, "sha256": sha256_file(dest), "bytes": dest.stat().st_size}
        paths[stage] = dest
        log.info("built %s in %.1f s", dest, seconds[stage])
    if cache_bytes:
        atomic_write_bytes(cache_path, cache_bytes)
    manifest = engine_manifest(
        folder=folder,
        out_dir=out_dir,
        plan=plan,
        env=env,
        profile=profile,
        engines=engines,
        workspace_gib=workspace_gib,
        build_seconds=seconds,
    )
    manifest_path = atomic_write_json(out_dir / ENGINES_MANIFEST, manifest)
    return EngineBuildResult(
        out_dir=out_dir,
        manifest=manifest_path,
        engines=paths,
        precision=precision,
        environment=env,
        timing_cache=cache_path,
        seconds=time.perf_counter() - start,
    )


def _build_one(
    trt: Any,
    logger: Any,
    graph: Path,
    input_name: str,
    shapes: tuple[tuple[int, ...], ...],
    plan: BuildPlan,
    workspace_gib: float,
    cache_bytes: bytes,
) -> tuple[bytes, bytes]:
    """Parse one ONNX graph and build its serialized engine; returns ``(engine, updated timing cache)``."""
    builder = trt.Builder(logger)
    network = builder.create_network(
        plan.network_flags(int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    )
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(graph)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelFileError(f"TensorRT could not parse {graph}: {errors[:500]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if plan.disable_tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    lo, opt, hi = shapes
    profile.set_shape(input_name, lo, opt, hi)
    config.add_optimization_profile(profile)
    attach_timing_cache(config, cache_bytes)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ModelFileError(f"TensorRT failed to build an engine from {graph}; see its log above")
    new_cache = bytes(memoryview(config.get_timing_cache().serialize()))
    return bytes(memoryview(serialized)), new_cache


def attach_timing_cache(config: Any, cache_bytes: bytes) -> str:
    """Give ``config`` the timing cache in ``cache_bytes``, or a new empty one when TensorRT refuses it.

    TensorRT refuses a cache in two ways: ``create_timing_cache`` returns ``None`` for bytes it cannot read
    (a cache written by another TensorRT version, e.g. a ``timing.cache`` shared across the 10 to 11
    upgrade), and ``set_timing_cache(..., ignore_mismatch=False)`` returns False for a cache made on another
    GPU. Either way the build goes on with a new cache, which replaces the file afterwards.

    Returns:
        ``"reused"``, ``"new"`` (no bytes given), ``"unreadable"`` or ``"other GPU"`` (for the log and tests).
    """
    if cache_bytes:
        cache = config.create_timing_cache(cache_bytes)
        if cache is None:
            log.warning(
                "timing cache is not readable by this TensorRT (another version?); starting a new one"
            )
            outcome = "unreadable"
        elif config.set_timing_cache(cache, ignore_mismatch=False):
            return "reused"
        else:
            log.warning("timing cache was made on another GPU; starting a new one")
            outcome = "other GPU"
    else:
        outcome = "new"
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        raise ModelFileError("TensorRT could not create an empty timing cache")
    return outcome
