"""TensorRT engines for the stage graphs (:mod:`cellseg_deploy.export.staged`), and their manifest.

One engine per stage (``backbone_rpn``, ``box_head``, ``mask_head``), built with an optimisation profile
(min/opt/max image size and RoI count), a workspace limit and a timing cache shared by every build in the
folder. Engines are written atomically next to ``engines.json``, which records the TensorRT version, GPU
name and compute capability, precision, profile, and the SHA-256 of the source graphs and checkpoint.

Precision by TensorRT version (see :func:`build_plan`):

- TensorRT 10 (``BuilderFlag.FP16`` exists): ``fp16`` parses the **FP32** graphs and sets ``BuilderFlag.FP16``
  (TensorRT picks FP16 kernels where it can); ``fp32`` parses the FP32 graphs with TF32 switched off.
- TensorRT 11 (no FP16 flag; networks are strongly typed): ``fp16`` parses the **FP16** graphs
  (``*.fp16.onnx``), whose types fix every layer's precision; ``fp32`` parses the FP32 graphs.
  ``strongly_typed=True`` chooses this path on TensorRT 10 too.

An engine only loads on the TensorRT version and GPU architecture it was built with: a runner compares
``engines.json`` with the machine (:func:`engine_mismatch`) and refuses with a one-line "rebuild" message
(or rebuilds when asked). Everything here except :func:`build_engines` and :func:`current_environment` is
pure and runs without TensorRT.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellseg_deploy.errors import BackendUnavailable, ConfigError, ModelFileError
from cellseg_deploy.export.staged import STAGE_INPUTS, STAGES, StageFolder, StageProfile, load_stage_folder
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
    import torch

    if not torch.cuda.is_available():
        return (
            "TensorRT needs an NVIDIA GPU, and torch sees none here (torch.cuda.is_available() is False); "
            f"{INSTALL_HINT}, or run the stages with --engine staged-onnx"
        )
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


def current_environment(device: int = 0) -> TrtEnvironment:
    """TensorRT version and GPU of this machine (needs TensorRT and a GPU)."""
    trt = require_tensorrt()
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return TrtEnvironment(
        trt_version=str(trt.__version__),
        gpu_name=torch.cuda.get_device_name(device),
        compute_capability=(int(major), int(minor)),
        cuda_version=torch.version.cuda,
    )


# ----------------------------------------------------------------------------------------------------------
# Build plan (pure)
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BuildPlan:
    """How to build engines of one precision on one TensorRT version.

    Attributes:
        precision: ``"fp32"`` or ``"fp16"``.
        graph_precision: which stage graphs to parse (``"fp32"`` or ``"fp16"``).
        strongly_typed: create the network with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` (TensorRT 10;
            TensorRT 11 networks are always strongly typed).
        fp16_flag: set ``BuilderFlag.FP16`` (weakly typed TensorRT 10 only).
        disable_tf32: clear ``BuilderFlag.TF32`` so ``fp32`` engines compute in true FP32.
    """

    precision: str
    graph_precision: str
    strongly_typed: bool
    fp16_flag: bool
    disable_tf32: bool

    @property
    def typing(self) -> str:
        return "strong" if self.strongly_typed else "weak"


def build_plan(
    trt_version: str, has_fp16_flag: bool, precision: str, strongly_typed: bool | None = None
) -> BuildPlan:
    """Choose graphs and builder flags for ``precision`` on a TensorRT version (see the module docstring).

    Args:
        trt_version: ``tensorrt.__version__``.
        has_fp16_flag: ``hasattr(tensorrt.BuilderFlag, "FP16")`` (False from TensorRT 11).
        precision: ``"fp32"`` or ``"fp16"``.
        strongly_typed: force strong typing (FP16 graphs) where the version allows both; ``None`` chooses
            strong typing exactly when the FP16 flag is gone.

    Raises:
        BackendUnavailable: an unsupported TensorRT major version.
        ConfigError: a weakly typed build asked for where TensorRT has no FP16 flag, or an unknown precision.
    """
    major = _major(trt_version)
    if major not in SUPPORTED_TRT_MAJORS:
        raise BackendUnavailable(
            f"TensorRT {trt_version} is not supported (supported majors: {list(SUPPORTED_TRT_MAJORS)}); "
            "pip install 'tensorrt>=10,<12'"
        )
    if precision not in ("fp32", "fp16"):
        raise ConfigError(f"engine precision {precision!r}; expected 'fp32' or 'fp16'")
    strong = (not has_fp16_flag) if strongly_typed is None else strongly_typed
    if not strong and not has_fp16_flag and precision == "fp16":
        raise ConfigError(
            f"TensorRT {trt_version} has no BuilderFlag.FP16 (its networks are strongly typed): "
            "build fp16 engines from the FP16 graphs (strongly_typed=True)"
        )
    if precision == "fp32":
        return BuildPlan("fp32", "fp32", strongly_typed=strong, fp16_flag=False, disable_tf32=True)
    if strong:
        return BuildPlan("fp16", "fp16", strongly_typed=True, fp16_flag=False, disable_tf32=False)
    return BuildPlan("fp16", "fp32", strongly_typed=False, fp16_flag=True, disable_tf32=False)


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
        "fp16_flag": plan.fp16_flag,
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
    from cellseg_deploy.export.metadata import read_manifest

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
    strongly_typed: bool | None = None,
) -> EngineBuildResult:
    """Build one TensorRT engine per stage of a stage folder.

    Args:
        stage_dir: made by :func:`~cellseg_deploy.export.staged.export_staged` (or its ``manifest.json``).
        out_dir: engine folder; default ``<stage_dir>/engines/<fp16|fp32>``.
        fp16: build FP16 engines (see :func:`build_plan` for how, per TensorRT version), else FP32.
        workspace_gib: builder workspace limit in GiB.
        timing_cache: timing cache file, read if present and rewritten after the builds; default
            ``<stage_dir>/engines/timing.cache`` (shared by both precisions).
        profile: optimisation profile; default the stage folder's.
        strongly_typed: see :func:`build_plan`.

    Raises:
        BackendUnavailable: no TensorRT or no GPU (checked first, one line with the install hint).
        ModelFileError: not a stage folder, a missing or changed graph, or TensorRT failed to parse or build.
    """
    trt = require_tensorrt()
    start = time.perf_counter()
    folder = load_stage_folder(Path(stage_dir))
    precision = "fp16" if fp16 else "fp32"
    plan = build_plan(str(trt.__version__), hasattr(trt.BuilderFlag, "FP16"), precision, strongly_typed)
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
    flags = 0
    if plan.strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(graph)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelFileError(f"TensorRT could not parse {graph}: {errors[:500]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if plan.fp16_flag:
        config.set_flag(trt.BuilderFlag.FP16)
    if plan.disable_tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    lo, opt, hi = shapes
    profile.set_shape(input_name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("timing cache does not fit this TensorRT/GPU; starting a new one")
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ModelFileError(f"TensorRT failed to build an engine from {graph}; see its log above")
    new_cache = bytes(memoryview(config.get_timing_cache().serialize()))
    return bytes(memoryview(serialized)), new_cache
