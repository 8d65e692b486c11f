"""What ``cellseg-deploy bench`` does, as one library call: :func:`run_bench`.

It resolves the models (:mod:`cellseg_deploy.bench.models`), builds the workload
(:mod:`cellseg_deploy.bench.workload`), measures (:mod:`cellseg_deploy.bench.runner_bench`), runs the asked
sweeps (:mod:`cellseg_deploy.bench.sweep`) and writes the report (:mod:`cellseg_deploy.bench.report`).

Models come from exactly one source:

- ``checkpoint`` (``--model CKPT``), plus optional explicit files per engine (``--model-for ENGINE=PATH``);
  engines that read another kind of file get one exported from the checkpoint into ``cache_dir``;
- explicit files only (every engine with ``--model-for``);
- ``untrained=ARCH`` (``--untrained ARCH``): a random-weight model whose detection count equals the cell
  count of the images (see :func:`~cellseg_deploy.bench.models.build_untrained_checkpoint`), one per cell
  count, exported for the engines that need it. Latency then measures a controlled amount of work.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cellseg_deploy.bench.models import (
    EngineModel,
    build_untrained_checkpoint,
    check_checkpoint_path,
    resolve_engine_models,
)
from cellseg_deploy.bench.report import write_report
from cellseg_deploy.bench.runner_bench import BenchSettings, run_benchmark, split_label
from cellseg_deploy.bench.sweep import DEFAULT_CELLS, DEFAULT_SIZES, run_sweep
from cellseg_deploy.bench.workload import Workload, folder_workload, synthetic_workload
from cellseg_deploy.errors import ConfigError

Log = Callable[[str], None]


@dataclass(frozen=True)
class BenchRequest:
    """Everything ``cellseg-deploy bench`` was asked for.

    Attributes:
        settings: how to measure (engines, warm-up, iterations, device, threads, ...).
        checkpoint: ``--model``; ``model_for``: ``--model-for``; ``untrained``: ``--untrained ARCH``.
        allow_mismatch: benchmark ``model_for`` files not exported from ``checkpoint`` (marked in the table).
        untrained_min_size: the untrained model's input size (short side, px).
        proposals: RPN proposals per image at inference (``--proposals``), a model change: ``--model`` is
            retuned into ``cache_dir/retuned/`` (:func:`~cellseg_deploy.modeling.retune.retune_checkpoint`),
            the untrained model is built with it; ``None``: the model's own setting.
        data: a dataset root or image folder (``--data``); ``limit``: at most this many of its images.
        imgsz / cells / images / seed: the synthetic workload (square side px, cells per image, image count).
        sweeps: ``("cells",)``, ``("size",)``, both or none; ``sweep_cells`` / ``sweep_sizes``: their points.
        out_dir: where the report goes; ``cache_dir``: exported models and synthetic images (reused).
    """

    settings: BenchSettings
    checkpoint: Path | None = None
    model_for: dict[str, Path] = field(default_factory=dict)
    allow_mismatch: bool = False
    untrained: str | None = None
    untrained_min_size: int = 512
    proposals: int | None = None
    data: Path | None = None
    limit: int | None = None
    imgsz: int = 512
    cells: int = 150
    images: int = 1
    seed: int = 0
    sweeps: tuple[str, ...] = ()
    sweep_cells: tuple[int, ...] = DEFAULT_CELLS
    sweep_sizes: tuple[int, ...] = DEFAULT_SIZES
    out_dir: Path = Path("runs/bench")
    cache_dir: Path = Path("runs/bench-cache")

    def __post_init__(self) -> None:
        if self.untrained is not None and (self.checkpoint is not None or self.model_for):
            raise ConfigError(
                "--untrained builds its own models; do not combine it with --model or --model-for"
            )
        if self.untrained is None and self.checkpoint is None and not self.model_for:
            raise ConfigError(
                "no model given: pass --model CKPT, --model-for ENGINE=PATH, or --untrained ARCH"
            )
        if self.data is None and (self.imgsz < 1 or self.cells < 1 or self.images < 1):
            raise ConfigError(
                f"--imgsz, --cells and --images must be positive, got {self.imgsz}, {self.cells}, {self.images}"
            )
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be at least 1, got {self.limit}")
        if self.proposals is not None and self.proposals < 1:
            raise ConfigError(f"--proposals must be at least 1, got {self.proposals}")
        if self.proposals is not None and self.checkpoint is None and self.untrained is None:
            raise ConfigError(
                "--proposals retunes a checkpoint (exported files keep the count they were exported with): "
                "pass --model CKPT or --untrained ARCH with it"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON (the settings are reported separately)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "settings"}
        for key in ("checkpoint", "data", "out_dir", "cache_dir"):
            d[key] = None if d[key] is None else str(d[key])
        d["model_for"] = {k: str(v) for k, v in self.model_for.items()}
        d["sweeps"] = list(self.sweeps)
        d["sweep_cells"] = list(self.sweep_cells)
        d["sweep_sizes"] = list(self.sweep_sizes)
        return d


def models_by_label(
    labels: tuple[str, ...], precision: str, resolve: Callable[[list[str]], dict[str, EngineModel]]
) -> dict[str, EngineModel]:
    """Give every engine label (``runner[:precision]``) its model file: ``resolve`` is called once with the
    labels, a label without a precision getting ``precision`` when that is not fp32, so engines of one runner
    share a file unless an exporter is made for their precision (int8)."""
    explicit = {
        label: label if split_label(label)[1] or precision == "fp32" else f"{label}:{precision}"
        for label in labels
    }
    by_explicit = resolve(list(dict.fromkeys(explicit.values())))
    return {label: by_explicit[explicit[label]] for label in labels}


def _models_provider(request: BenchRequest, log: Log) -> Callable[[int], dict[str, EngineModel]]:
    """``cells -> {engine label: EngineModel}`` (the same models for every point unless untrained)."""
    labels = request.settings.engines
    precision = request.settings.precision
    if request.untrained is None:
        checkpoint = request.checkpoint
        if checkpoint is not None and request.proposals is not None:
            checkpoint = retuned_checkpoint(checkpoint, request.proposals, request.cache_dir, log)
        models = models_by_label(
            labels,
            precision,
            lambda engines: resolve_engine_models(
                engines,
                checkpoint=checkpoint,
                model_for=request.model_for,
                cache_dir=request.cache_dir,
                on_export=log,
                allow_mismatch=request.allow_mismatch,
            ),
        )
        return lambda _cells: models
    cache: dict[int, dict[str, EngineModel]] = {}
    arch = request.untrained

    def provide(cells: int) -> dict[str, EngineModel]:
        if cells not in cache:
            props = "" if request.proposals is None else f"-prop{request.proposals}"
            ckpt = (
                request.cache_dir
                / "untrained"
                / (f"{arch}-det{cells}-min{request.untrained_min_size}{props}-seed{request.seed}.pt")
            )
            build_untrained_checkpoint(
                ckpt,
                arch,
                cells,
                min_size=request.untrained_min_size,
                seed=request.seed,
                proposals=request.proposals,
            )
            cache[cells] = models_by_label(
                labels,
                precision,
                lambda engines: resolve_engine_models(
                    engines, checkpoint=ckpt, cache_dir=request.cache_dir, on_export=log
                ),
            )
        return cache[cells]

    provide(request.cells)  # fail early on a bad engine or model before any image is made
    return provide


def retuned_checkpoint(checkpoint: Path, proposals: int, cache_dir: Path, log: Log) -> Path:
    """``checkpoint`` with ``proposals`` RPN proposals, in ``cache_dir/retuned/`` (written once, then reused)."""
    from cellseg_deploy.modeling.retune import retuned_copy  # torch: only when asked for

    check_checkpoint_path(checkpoint)
    out = retuned_copy(checkpoint, cache_dir / "retuned", proposals)
    log(f"{checkpoint} with {proposals} RPN proposals per image: {out}")
    return out


def build_workload(request: BenchRequest) -> Workload:
    """The images of the main measurement: the ``--data`` folder, or synthetic images in the cache folder."""
    if request.data is not None:
        return folder_workload(request.data, limit=request.limit)
    folder = (
        request.cache_dir
        / "workloads"
        / f"{request.imgsz}px-{request.cells}cells-{request.images}img-seed{request.seed}"
    )
    return synthetic_workload(
        folder, request.imgsz, request.imgsz, request.cells, images=request.images, seed=request.seed
    )


def run_bench(request: BenchRequest, log: Log | None = None) -> dict[str, Any]:
    """Measure, sweep and write the report; returns the result dict (also written to ``out_dir/bench.json``).

    The result is :func:`~cellseg_deploy.bench.runner_bench.run_benchmark`'s, plus ``request``, ``sweeps``
    (``{kind: sweep result}``) and ``outputs`` (the written files).
    """
    log = log or (lambda _msg: None)
    provider = _models_provider(request, log)
    workload = build_workload(request)
    models = provider(request.cells)
    result = run_benchmark(request.settings, models, workload)
    result["request"] = request.to_dict()
    if request.untrained is not None:
        result["models_note"] = (
            f"untrained {request.untrained} models (random weights, seed {request.seed}) with score_thresh 0 and "
            f"detections_per_img = cells, so each image yields exactly as many detections as it has cells "
            f"({request.cells} here); box sizes come from random proposals, not from cells"
        )
    if request.proposals is not None:
        note = result.get("models_note")
        retuned = f"{request.proposals} RPN proposals per image (--proposals, a model change)"
        result["models_note"] = f"{note}; {retuned}" if note else retuned
    sweeps: dict[str, Any] = {}
    for kind in request.sweeps:
        values = request.sweep_cells if kind == "cells" else request.sweep_sizes
        log(f"sweep over {kind}: {list(values)}")
        sweeps[kind] = run_sweep(
            kind,
            values,
            request.settings,
            provider,
            request.cache_dir / "workloads" / "sweeps",
            imgsz=request.imgsz,
            cells=request.cells,
            images=request.images,
            seed=request.seed,
        )
    if sweeps:
        result["sweeps"] = sweeps
    write_report(result, request.out_dir)  # adds result["outputs"]
    return result
