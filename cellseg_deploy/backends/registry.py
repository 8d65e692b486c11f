"""The registry of formats and engines: one :class:`Format` entry per kind of model file, and the runners.

:data:`FORMATS` is the single table. Everything that used to list backends by hand is derived from it:
``export --format`` choices (:data:`EXPORT_FORMATS`), the options each format accepts (:func:`refused_option`),
the runner-module map behind ``--engine`` (:data:`RUNNER_MODULES`), the files ``bench`` may export on its own
(:func:`cacheable_formats`) and the engine a model file implies (:func:`engine_for_path`). Adding a backend is
its folder under ``cellseg_deploy/backends/`` plus one entry here.

Runner modules register their classes with :func:`register_runner`; the registry imports them lazily by
name, so that an optional backend that is not installed costs nothing until asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellseg_deploy.backends.base import Runner
from cellseg_deploy.errors import ModelFileError, UserError


@dataclass(frozen=True)
class Format:
    """One kind of model file: how it is exported, which runners read it, what ``export`` accepts for it.

    Attributes:
        name: ``export --format`` name (entries without an exporter are runner-only, e.g. ``torch``).
        kind: ``"checkpoint"``, ``"file"`` or ``"folder"``.
        suffix: the model file's suffix (``".onnx"``; ``"/"`` for a folder).
        runners: runner names that read it (the first is the one a file of this kind implies).
        runner_module: the module defining those runners (imported on first use).
        summary: what it is, for ``--format``'s help.
        exporter: ``"module:function"`` called as ``function(source, out, **options)`` (imported lazily);
            ``None``: nothing exports it.
        precisions: the precisions the export accepts (``export --precision``); the first is not special.
        default_precision: the precision exported when none is asked for.
        options: ``export`` options (click parameter names) it accepts besides those every format takes.
        marker: for a folder, the manifest inside it that marks a finished export and names its kind.
        also_reads: further suffixes that imply its first runner (``.pth``, a stage manifest's ``.yaml``).
        companions: suffixes of files written beside ``--out`` (OpenVINO's ``.bin``).
        source_format: from a checkpoint, export this format first and build from it (``trt`` from stages).
        preflight: ``"module:function"`` called before anything is written (a missing TensorRT is one line).
        cache_name: the file or folder name when ``bench`` exports it into its cache (``None``: it does not).
        cache_precision: the engine precision such a cached export is made for (``None``: any).
        file_label: how a file of this kind is named in error messages.
    """

    name: str
    kind: str
    suffix: str
    runners: tuple[str, ...]
    runner_module: str
    summary: str = ""
    exporter: str | None = None
    precisions: tuple[str, ...] = ("fp32",)
    default_precision: str = "fp32"
    options: frozenset[str] = frozenset()
    marker: str | None = None
    also_reads: tuple[str, ...] = ()
    companions: tuple[str, ...] = ()
    source_format: str | None = None
    preflight: str | None = None
    cache_name: str | None = None
    cache_precision: str | None = None
    file_label: str = ""

    def load_exporter(self) -> Callable[..., Any]:
        """The exporter function (imported now); ``ModelFileError`` when the format has none or it cannot load."""
        return _load(self.exporter, f"--format {self.name}")

    def run_preflight(self) -> None:
        """Call :attr:`preflight` (when set): raises its one-line error before anything is written."""
        if self.preflight is not None:
            _load(self.preflight, f"--format {self.name}")()


_ONNX_OPTIONS = frozenset({"opset", "simplify", "static", "trace_image"})
_STAGE_OPTIONS = frozenset({"opset", "fp16", "max_batch", "opt_size", "profile_json"})

FORMATS: tuple[Format, ...] = (
    Format(
        "torch",
        "checkpoint",
        ".pt",
        ("torch",),
        "cellseg_deploy.backends.pytorch.runner",
        precisions=("fp32", "bf16", "fp16"),
        also_reads=(".pth",),
        file_label="a .pt/.pth checkpoint",
    ),
    Format(
        "onnx",
        "file",
        ".onnx",
        ("onnx",),
        "cellseg_deploy.backends.onnxrt.runner",
        summary="one graph (uint8 image in, 28x28 mask probabilities out)",
        exporter="cellseg_deploy.backends.onnxrt.export:export_onnx",
        options=_ONNX_OPTIONS,
        cache_name="model.onnx",
        file_label="an .onnx file",
    ),
    Format(
        "staged",
        "folder",
        "/",
        ("staged-onnx", "staged-torch"),
        "cellseg_deploy.backends.staged.runner",
        summary="backbone+RPN, box head and mask head graphs (fp32, and fp16 with --precision fp16, the default)",
        exporter="cellseg_deploy.backends.staged.export:export_staged",
        precisions=("fp32", "fp16"),
        default_precision="fp16",
        options=_STAGE_OPTIONS,
        marker="manifest.json",
        also_reads=(".json", ".yaml", ".yml"),
        cache_name="stages",
        file_label="a stage folder/manifest",
    ),
    Format(
        "trt",
        "folder",
        "/",
        ("trt",),
        "cellseg_deploy.backends.tensorrt.runner",
        summary="TensorRT engines of the stages (GPU only; fp16 by default, --precision fp32 for fp32 engines)",
        exporter="cellseg_deploy.backends.tensorrt.build:build_engines",
        precisions=("fp32", "fp16"),
        default_precision="fp16",
        options=_STAGE_OPTIONS | {"stage_dir", "workspace_gib", "timing_cache"},
        marker="engines.json",
        source_format="staged",
        preflight="cellseg_deploy.backends.tensorrt.build:require_tensorrt",
        file_label="engines.json",
    ),
    Format(
        "openvino-int8",
        "file",
        ".xml",
        ("openvino",),
        "cellseg_deploy.backends.openvino.runner",
        summary="the onnx graph quantised to int8 for the CPU (an OpenVINO IR, calibrated on --calib-data)",
        exporter="cellseg_deploy.backends.openvino.int8:export_openvino_int8",
        precisions=("int8",),
        default_precision="int8",
        options=frozenset({"calib_data", "calib_images"}),
        companions=(".bin",),
        cache_name="model.int8.xml",
        cache_precision="int8",
        file_label="an OpenVINO .xml",
    ),
)
"""Every format and engine. Add new backends here (and nowhere else)."""

_BY_NAME: dict[str, Format] = {f.name: f for f in FORMATS}

EXPORT_FORMATS: tuple[str, ...] = tuple(f.name for f in FORMATS if f.exporter is not None)
"""Formats of ``cellseg-deploy export --format``."""

EXPORT_PRECISIONS: tuple[str, ...] = tuple(
    dict.fromkeys(p for f in FORMATS if f.exporter for p in f.precisions)
)
"""Every precision some format exports (``export --precision``'s choices)."""

EXPORT_OPTIONS: frozenset[str] = frozenset().union(*(f.options for f in FORMATS))
"""Format-specific ``export`` options: each accepted only by the formats that list it."""

RUNNER_MODULES: dict[str, str] = {r: f.runner_module for f in FORMATS for r in f.runners}
"""Runner name -> module that defines it (imported on first use)."""

CHECKPOINT_SUFFIXES: tuple[str, ...] = tuple(
    s for f in FORMATS if f.kind == "checkpoint" for s in (f.suffix, *f.also_reads)
)
"""Suffixes of checkpoint files (``.pt``, ``.pth``)."""

SUFFIX_ENGINES: dict[str, str] = {
    s: f.runners[0] for f in FORMATS for s in (f.suffix, *f.also_reads) if s != "/" and f.runners
}
"""File suffix -> the runner a model file with it implies (``.xml`` -> ``openvino``)."""


def get_format(name: str) -> Format:
    """The entry named ``name``; unknown names raise :class:`UserError` listing the export formats."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise UserError(f"unknown format {name!r}; expected one of {', '.join(EXPORT_FORMATS)}") from None


def cacheable_formats() -> tuple[Format, ...]:
    """Formats ``bench`` may export from a checkpoint on its own (they have a :attr:`Format.cache_name`)."""
    return tuple(f for f in FORMATS if f.cache_name is not None and f.exporter is not None)


def flag_name(option: str) -> str:
    """Click parameter name -> its flag: ``"trace_image"`` -> ``"--trace-image"``."""
    return "--" + option.replace("_", "-")


def refused_option(fmt: Format, given: list[str] | tuple[str, ...]) -> str | None:
    """The one-line refusal of the first option in ``given`` (parameter names) that ``fmt`` does not accept,
    naming the formats that do; ``None`` when it accepts them all."""
    for option in given:
        if option in EXPORT_OPTIONS and option not in fmt.options:
            takers = "/".join(f.name for f in FORMATS if option in f.options)
            return f"{flag_name(option)} applies to --format {takers}, not {fmt.name}"
    return None


def engine_for_path(model_path: str | Path) -> str:
    """The runner a model file implies: a folder entry's marker file (``engines.json`` -> ``trt``), a folder by
    the first folder entry whose marker it holds (else the first folder entry: ``staged-onnx``), any other file
    by its suffix (:data:`SUFFIX_ENGINES`). Anything else raises :class:`UserError`."""
    path = Path(model_path)
    folders = [f for f in FORMATS if f.kind == "folder" and f.runners]
    for f in folders:
        if f.marker is not None and path.name == f.marker:
            return f.runners[0]
    if path.is_dir():
        held = next((f for f in folders if f.marker and (path / f.marker).is_file()), folders[0])
        return held.runners[0]
    engine = SUFFIX_ENGINES.get(path.suffix.lower())
    if engine is None:
        labels = [f.file_label for f in FORMATS if f.file_label]
        raise UserError(
            f"cannot tell the engine from {path.name!r} (expected {', '.join(labels[:-1])} or {labels[-1]}); "
            f"pass --engine, one of {', '.join(list_runners())}"
        )
    return engine


def _load(spec: str | None, what: str) -> Callable[..., Any]:
    if spec is None:
        raise ModelFileError(f"{what}: nothing exports this kind of model file")
    module, _, function = spec.partition(":")
    try:
        func: Callable[..., Any] = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as exc:
        raise ModelFileError(f"{what}: {spec} is not available ({type(exc).__name__}: {exc})") from exc
    return func


_REGISTERED: dict[str, type[Runner]] = {}


def register_runner(cls: type[Runner]) -> type[Runner]:
    """Class decorator: make a runner available under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTERED[cls.name] = cls
    return cls


def list_runners() -> list[str]:
    """Every runner name, registered or known by module, sorted."""
    return sorted(set(RUNNER_MODULES) | set(_REGISTERED))


def get_runner_class(name: str) -> type[Runner]:
    """The runner class for ``name``; unknown names raise :class:`UserError` listing the choices."""
    if name not in _REGISTERED:
        module = RUNNER_MODULES.get(name)
        if module is None:
            raise UserError(f"unknown engine {name!r}; expected one of {', '.join(list_runners())}")
        importlib.import_module(module)
    return _REGISTERED[name]


def create_runner(name: str, model_path: str | Path, **kwargs: Any) -> Runner:
    """Instantiate runner ``name`` for ``model_path`` (not loaded yet: use it as a context manager)."""
    return get_runner_class(name)(model_path, **kwargs)
