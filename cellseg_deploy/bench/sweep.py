"""Latency against the number of cells and against the image size.

A sweep changes one variable and keeps the rest: a ``cells`` sweep renders images of one size with more and
more cells, a ``size`` sweep renders square images of growing side with the same number of cells. Each point
is a full :func:`~cellseg_deploy.bench.runner_bench.run_benchmark` (engines interleaved, warm-up excluded).

What a point's latency depends on is the number of *detections*, not of cells: a trained model detects
roughly the cells; an untrained one returns its cap. ``models_for`` therefore gets the point's cell count and
may return other models per point (the ``--untrained`` mode builds one whose detection count equals it,
see :func:`~cellseg_deploy.bench.models.build_untrained_checkpoint`). Every point records the detections it
actually got.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from cellseg_deploy.bench.models import EngineModel
from cellseg_deploy.bench.runner_bench import BenchSettings, run_benchmark
from cellseg_deploy.bench.workload import Workload, synthetic_workload
from cellseg_deploy.errors import ConfigError

SWEEP_KINDS: tuple[str, ...] = ("cells", "size")
DEFAULT_CELLS: tuple[int, ...] = (25, 100, 250, 500)
DEFAULT_SIZES: tuple[int, ...] = (256, 512, 1024, 2048)

ModelsFor = Callable[[int], dict[str, EngineModel]]


def parse_sweep(spec: str | None) -> tuple[str, ...]:
    """``"cells,size"`` -> ``("cells", "size")``; unknown kinds raise :class:`ConfigError`."""
    if not spec:
        return ()
    kinds = tuple(s.strip() for s in spec.split(",") if s.strip())
    bad = [k for k in kinds if k not in SWEEP_KINDS]
    if bad:
        raise ConfigError(f"unknown sweep {bad[0]!r}; expected one of {', '.join(SWEEP_KINDS)}")
    return kinds


def parse_int_list(spec: str, what: str) -> tuple[int, ...]:
    """``"25,100"`` -> ``(25, 100)``, each ``>= 1``; anything else raises :class:`ConfigError`."""
    try:
        values = tuple(int(s) for s in spec.split(",") if s.strip())
    except ValueError as exc:
        raise ConfigError(f"{what}: expected comma-separated integers, got {spec!r}") from exc
    if not values or min(values) < 1:
        raise ConfigError(f"{what}: expected positive integers, got {spec!r}")
    return values


def run_sweep(
    kind: str,
    values: Sequence[int],
    settings: BenchSettings,
    models_for: ModelsFor,
    work_dir: Path,
    *,
    imgsz: int = 512,
    cells: int = 150,
    images: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Run one benchmark per value of ``kind`` and collect the summaries.

    Args:
        kind: ``"cells"`` (``values`` are cell counts at ``imgsz``) or ``"size"`` (``values`` are image sides
            in pixels, each with ``cells`` cells).
        values: the points, each ``>= 1``.
        settings: measurement settings for every point (without memory probes: those belong to the main run).
        models_for: ``cells -> {engine: EngineModel}`` for a point.
        work_dir: where the point's synthetic images are written.
        imgsz / cells / images / seed: the variables held fixed and the synthetic images per point.

    Returns:
        ``{"sweep", "values", "description", "points": [{"value", "cells", "height", "width", "engines":
        {name: {"latency", "stage_mean_ms", "detections_per_image", "speedup_vs_torch", "model"}},
        "warnings"}]}``.
    """
    if kind not in SWEEP_KINDS:
        raise ConfigError(f"unknown sweep {kind!r}; expected one of {', '.join(SWEEP_KINDS)}")
    if not values or min(values) < 1:
        raise ConfigError(f"sweep over {kind}: values must be positive, got {list(values)}")
    quiet = dataclasses.replace(settings, progress=False, memory=False, profile=False)
    points = []
    for value in tqdm(list(values), desc=f"sweep {kind}", unit="point", disable=not settings.progress):
        n_cells = value if kind == "cells" else cells
        side = imgsz if kind == "cells" else value
        workload: Workload = synthetic_workload(
            work_dir / f"{kind}-{value}", side, side, n_cells, images=images, seed=seed
        )
        result = run_benchmark(quiet, models_for(n_cells), workload)
        points.append(
            {
                "value": value,
                "cells": n_cells,
                "height": side,
                "width": side,
                "engines": {
                    name: {
                        k: e[k]
                        for k in (
                            "latency",
                            "stage_mean_ms",
                            "detections_per_image",
                            "speedup_vs_torch",
                            "model",
                        )
                    }
                    for name, e in result["engines"].items()
                },
                "warnings": result["warnings"],
            }
        )
    fixed = f"{imgsz} x {imgsz} px images" if kind == "cells" else f"{cells} cells per image"
    return {
        "sweep": kind,
        "values": list(values),
        "description": f"latency against {'the number of cells' if kind == 'cells' else 'the image side'}, "
        f"{fixed}, {images} synthetic image(s) per point",
        "points": points,
    }
