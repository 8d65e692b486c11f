"""Which model file each benchmarked engine reads, and where benchmark models come from.

Each runner declares the files it reads (:attr:`Runner.model_suffixes`). :func:`resolve_engine_models` maps
every engine (``runner`` or ``runner:precision``) to exactly one file:

1. an explicit file (``--model-for ENGINE=PATH``), checked by the runner (one-line error when it does not fit)
   and, when there is a checkpoint to compare with, checked to have been exported from it: the provenance
   every export records (:func:`recorded_source`) must name the checkpoint's SHA-256, else the benchmark
   would time two different models against each other; ``allow_mismatch`` (``--allow-mismatch``) benchmarks
   such a file anyway and marks it in the table;
2. else the checkpoint (``--model CKPT``) when the runner reads checkpoints (``.pt``);
3. else a file exported from the checkpoint into a cache folder, when the format registry can export that
   kind of file (:data:`EXPORTERS`, the formats with a ``cache_name``: the single ONNX graph, the stage
   folder that ``staged-onnx`` reads and from which ``trt`` builds its engines with its ``rebuild`` option,
   and the int8 OpenVINO IR that ``openvino`` runs at ``int8``, calibrated on synthetic images), reused
   while the checkpoint is unchanged (:func:`~cellseg_deploy.backends.cache.cached_export`); a format made
   for the engine's precision wins over a general one;
4. else a one-line :class:`~cellseg_deploy.errors.ModelFileError` saying which flag to pass.

:func:`build_untrained_checkpoint` makes random-weight models whose detection count is fixed: a
benchmark's cost grows with the number of detections (the mask head runs once per detection, and pasting
and RLE encoding once per instance), so latency measured on an untrained model means something only when
that number is controlled. With ``score_thresh = 0`` every candidate survives the score filter, and
``detections_per_img = K`` caps the survivors of per-class NMS at ``K``; a random-weight model has far more
than ``K`` candidates (up to ``rpn_post_nms_top_n_test`` proposals x 4 classes), so it returns exactly
``K`` detections on every image, on every backend. The benchmark records the count it actually got.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cellseg_deploy.backends import get_runner_class
from cellseg_deploy.backends.cache import cached_export
from cellseg_deploy.backends.registry import CHECKPOINT_SUFFIXES, Format, cacheable_formats
from cellseg_deploy.errors import ConfigError, ModelFileError, UserError
from cellseg_deploy.io_utils import sha256_file

log = logging.getLogger(__name__)

EXPORTERS: tuple[Format, ...] = cacheable_formats()
"""Formats the benchmark may export on its own, by the model file kind a runner reads (from the registry)."""


@dataclass(frozen=True)
class EngineModel:
    """The model file one engine reads in a benchmark.

    Attributes:
        engine: runner name.
        path: the file or folder.
        source: ``"given"`` (``--model-for``), ``"checkpoint"`` (``--model``) or ``"exported"`` (made here
            from the checkpoint, see :attr:`note`).
        sha256: SHA-256 of the file (``None`` for a folder).
        note: how it was obtained, for the report.
        provenance: for a given file, whether it was exported from the benchmark's checkpoint:
            ``"verified"``, ``"mismatch"`` or ``"unverified"`` (no source recorded; both only with
            ``allow_mismatch``); ``""`` when there was nothing to compare with.
    """

    engine: str
    path: Path
    source: str
    sha256: str | None
    note: str = ""
    provenance: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def parse_model_for(items: list[str] | tuple[str, ...]) -> dict[str, Path]:
    """``["onnx=models/x.onnx", ...]`` -> ``{"onnx": Path("models/x.onnx")}``; malformed items raise UserError."""
    out: dict[str, Path] = {}
    for item in items:
        engine, sep, path = item.partition("=")
        engine, path = engine.strip(), path.strip()
        if not sep or not engine or not path:
            raise UserError(f"--model-for expects ENGINE=PATH (e.g. onnx=models/tiny.onnx), got {item!r}")
        if engine in out:
            raise UserError(f"--model-for names engine {engine!r} twice ({out[engine]} and {path})")
        out[engine] = Path(path)
    return out


def _file_sha(path: Path) -> str | None:
    return sha256_file(path) if path.is_file() else None


def _describe(suffixes: tuple[str, ...]) -> str:
    return " or ".join("a folder" if s == "/" else f"a {s} file" for s in suffixes) or "a model file"


def recorded_source(path: Path) -> str | None:
    """SHA-256 of the checkpoint that ``path`` records it was made from; ``None`` when it records none.

    A checkpoint (``.pt``) is its own source. ONNX files carry it in their metadata (``source_sha256``), an
    OpenVINO IR keeps the ONNX file's metadata under ``rt_info["framework"]``, a stage folder's
    ``manifest.json`` under ``checkpoint.sha256`` and an engine manifest as ``checkpoint_sha256``.
    """
    import json

    suffix = path.suffix.lower()
    if path.is_file() and suffix in CHECKPOINT_SUFFIXES:
        return sha256_file(path)
    if path.is_file() and suffix == ".onnx":
        from cellseg_deploy.backends.metadata import read_onnx_metadata

        value = read_onnx_metadata(path).get("source_sha256")
        return str(value) if value else None
    if path.is_file() and suffix == ".xml":
        return _openvino_source(path)
    manifest_path = path / "manifest.json" if path.is_dir() else path
    if path.is_dir() and not manifest_path.is_file():
        manifest_path = path / "engines.json"
    if manifest_path.is_file() and manifest_path.suffix.lower() == ".json":
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            return None
        if isinstance(manifest, dict):
            ckpt = manifest.get("checkpoint")
            value = ckpt.get("sha256") if isinstance(ckpt, dict) else manifest.get("checkpoint_sha256")
            return str(value) if value else None
    return None


def _openvino_source(path: Path) -> str | None:
    try:
        import openvino as ov
    except ImportError:
        return None
    from cellseg_deploy.backends.openvino.ir import read_provenance

    try:
        value = read_provenance(ov.Core().read_model(str(path))).get("source_sha256")
    except RuntimeError:
        return None
    return str(value) if value else None


def check_provenance(
    engine: str, path: Path, checkpoint: Path, checkpoint_sha: str, allow_mismatch: bool
) -> str:
    """``"verified"`` when ``path`` was exported from ``checkpoint``; otherwise ``"mismatch"`` /
    ``"unverified"`` with ``allow_mismatch``, else a one-line :class:`UserError` saying how to fix it."""
    source = recorded_source(path)
    if source == checkpoint_sha:
        return "verified"
    if allow_mismatch:
        log.warning(
            "--model-for %s=%s was not exported from %s: benchmarked anyway", engine, path, checkpoint
        )
        return "mismatch" if source else "unverified"
    what = (
        f"was exported from another checkpoint (SHA-256 {source[:12]}...)"
        if source
        else "records no source checkpoint"
    )
    raise UserError(
        f"--model-for {engine}={path} {what}, not from --model {checkpoint} ({checkpoint_sha[:12]}...): the "
        "benchmark would compare two different models; export it from the checkpoint (or drop --model-for), "
        "or pass --allow-mismatch to benchmark it anyway"
    )


def check_checkpoint_path(checkpoint: Path) -> None:
    """Raise :class:`ModelFileError` unless ``checkpoint`` is an existing ``.pt``/``.pth`` file."""
    if checkpoint.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise ModelFileError(
            f"--model takes a checkpoint (.pt), got {checkpoint}; pass exported files with --model-for ENGINE=PATH"
        )
    if not checkpoint.is_file():
        raise ModelFileError(f"checkpoint {checkpoint} does not exist")


def resolve_engine_models(
    engines: list[str] | tuple[str, ...],
    *,
    checkpoint: Path | None = None,
    model_for: Mapping[str, Path] | None = None,
    cache_dir: Path | None = None,
    exporters: tuple[Format, ...] = EXPORTERS,
    on_export: Callable[[str], None] | None = None,
    allow_mismatch: bool = False,
) -> dict[str, EngineModel]:
    """Map every engine to the model file it reads (see the module docstring for the order of choice).

    Args:
        engines: runner names or ``runner:precision`` labels (already checked).
        checkpoint: a cellseg-deploy checkpoint (``.pt``), optional when every engine has a file.
        model_for: explicit files per engine (by label, or by runner name for all its precisions).
        cache_dir: where exported files go (``<cache_dir>/<checkpoint sha256[:16]>/<filename>``); required
            only when something must be exported.
        on_export: called with a one-line message each time a file is exported or reused from the cache.
        allow_mismatch: benchmark ``model_for`` files that were not exported from ``checkpoint`` (marked
            in :attr:`EngineModel.provenance`) instead of refusing them.

    Raises:
        ModelFileError: a file that does not exist or does not fit its engine, or an engine left without one.
        UserError: ``model_for`` names an engine that is not benchmarked, or a file that was not exported
            from ``checkpoint`` (without ``allow_mismatch``).
    """
    model_for = dict(model_for or {})
    extra = sorted(set(model_for) - set(engines) - {e.partition(":")[0] for e in engines})
    if extra:
        raise UserError(
            f"--model-for names engine(s) {extra} that are not benchmarked (--engine {','.join(engines)})"
        )
    if checkpoint is not None:
        check_checkpoint_path(checkpoint)
    ckpt_sha: str | None = None
    out: dict[str, EngineModel] = {}
    for engine in engines:
        runner, _, precision = engine.partition(":")
        cls = get_runner_class(runner)
        suffixes = tuple(s.lower() for s in cls.model_suffixes)
        if engine in model_for or runner in model_for:
            path = model_for[engine] if engine in model_for else model_for[runner]
            cls.check_model_path(path)
            provenance = ""
            if checkpoint is not None:
                ckpt_sha = ckpt_sha or sha256_file(checkpoint)
                provenance = check_provenance(engine, path, checkpoint, ckpt_sha, allow_mismatch)
            out[engine] = EngineModel(
                engine, path, "given", _file_sha(path), "given with --model-for", provenance
            )
            continue
        if checkpoint is not None and any(s in suffixes for s in CHECKPOINT_SUFFIXES):
            cls.check_model_path(checkpoint)
            ckpt_sha = ckpt_sha or sha256_file(checkpoint)
            out[engine] = EngineModel(engine, checkpoint, "checkpoint", ckpt_sha, "the checkpoint itself")
            continue
        exporter = _pick_exporter(exporters, suffixes, precision or None)
        if checkpoint is None or exporter is None:
            how = f"--model-for {engine}=PATH ({_describe(cls.model_suffixes)})" + (
                ", or --model CKPT to export one" if exporter is not None else ""
            )
            raise ModelFileError(f"engine {engine!r} has no model file; pass {how}")
        if cache_dir is None:
            raise ConfigError(
                f"engine {engine!r} needs a file exported from the checkpoint, but no cache folder was given"
            )
        ckpt_sha = ckpt_sha or sha256_file(checkpoint)
        cached = cached_export(exporter, checkpoint, cache_dir, checkpoint_sha=ckpt_sha)
        path = cached.path
        note = (
            f"reused {path} exported earlier from {checkpoint} (same SHA-256)"
            if cached.reused
            else f"exported {path} from {checkpoint} for this benchmark"
        )
        if on_export is not None:
            on_export(f"{engine}: {note}")
        cls.check_model_path(path)
        out[engine] = EngineModel(engine, path, "exported", _file_sha(path), note)
    return out


def _pick_exporter(
    exporters: tuple[Format, ...], suffixes: tuple[str, ...], precision: str | None
) -> Format | None:
    """The format made for ``precision`` among those writing one of ``suffixes``, else a general one."""
    fitting = [e for e in exporters if e.suffix in suffixes]
    return next(
        (e for e in fitting if e.cache_precision == precision and precision is not None), None
    ) or next((e for e in fitting if e.cache_precision is None), None)


def build_untrained_checkpoint(
    out: Path,
    arch: str,
    detections: int,
    *,
    min_size: int = 512,
    max_size: int | None = None,
    anchor_sizes: str | None = None,
    seed: int = 0,
    proposals: int | None = None,
) -> Path:
    """Write a random-weight checkpoint that returns exactly ``detections`` detections per image.

    See the module docstring for why. ``score_thresh`` is 0, ``detections_per_img`` is ``detections``, and
    the RPN keeps at least ``2 * detections`` proposals after its NMS so enough candidates exist (at least
    1000, torchvision's default), unless ``proposals`` sets that number (and the per-level pre-NMS top-k, see
    :func:`~cellseg_deploy.modeling.retune.with_proposals`): each proposal gives a candidate per class, so
    fewer proposals than detections can still fill the cap, and the benchmark records the count it got.
    Weights are drawn with ``torch.manual_seed(seed)``; an existing ``out`` with the same settings is kept.

    Args:
        out: checkpoint path (``.pt``).
        arch: architecture name (``cellseg-deploy`` registry).
        detections: detections per image, ``>= 1``.
        min_size / max_size: the model's input resizing (short side / long side cap, pixels); ``max_size``
            defaults to ``2 * min_size`` (the proportions of the model config's defaults).
        anchor_sizes: an anchor preset name, or ``None`` for the architecture's default.
        seed: weight initialisation seed.
        proposals: RPN proposals per image at inference; ``None``: ``max(1000, 2 * detections)``.
    """
    import torch

    from cellseg_deploy.modeling import (
        ModelConfig,
        build_model,
        load_checkpoint,
        save_checkpoint,
        with_proposals,
    )

    if detections < 1:
        raise ConfigError(f"detections must be at least 1, got {detections}")
    config = ModelConfig(
        arch=arch,
        min_size=min_size,
        max_size=max_size if max_size is not None else 2 * min_size,
        anchor_sizes=anchor_sizes,
        detections_per_img=detections,
        score_thresh=0.0,
        rpn_post_nms_top_n_test=max(1000, 2 * detections),
        rpn_pre_nms_top_n_test=max(1000, 2 * detections),
        extra={"purpose": "benchmark: untrained, fixed detection count", "seed": seed},
    )
    config.validate()
    if proposals is not None:
        config = with_proposals(config, proposals)
    if out.is_file():
        try:
            if load_checkpoint(out).model_config == config:
                return out
        except UserError:
            pass
    torch.manual_seed(seed)
    model = build_model(config)
    save_checkpoint(out, model, config)
    return out
