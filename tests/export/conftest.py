"""Fixtures of the export tests: a random tiny checkpoint tuned for the hard cases, and its ONNX export
(made once per session).

``dense_checkpoint`` is an untrained tiny model with ``detections_per_img=200`` (random weights give a
detection on nearly every proposal, so dense images give hundreds) and a score threshold placed, by
measurement, between the best score on a uniform grey image and the lowest best score on the cell images
the tests use: grey images give **no** detection, cell images give some. Both facts are asserted where
they are relied on, so a change in the model or the exporter cannot silently turn a test into a no-op.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from export_helpers import fixed_export_time, grey_image

from cellseg_deploy.backends.onnxrt.export import ExportResult


@pytest.fixture(scope="session")
def cell_images() -> dict[str, np.ndarray]:
    """The images the hard-case tests run (name -> RGB uint8)."""
    from cellseg_deploy.data.synth import fluorescence_cell_image

    return {
        "tiny 33x35": fluorescence_cell_image(33, 35, seed=3, n_cells=3),
        "large 2500x1900": fluorescence_cell_image(2500, 1900, seed=4, n_cells=500),
        "non-square 180x620": fluorescence_cell_image(180, 620, seed=5, n_cells=40),
        "dense 512x512, 700 cells": fluorescence_cell_image(512, 512, seed=6, n_cells=700),
    }


@pytest.fixture(scope="session")
def dense_checkpoint(tmp_path_factory: pytest.TempPathFactory, cell_images: dict[str, np.ndarray]) -> Path:
    """Random tiny checkpoint: 200 detections per image at most, grey images give none (see module doc)."""
    import torch

    from cellseg_deploy.data.synth import fluorescence_cell_image
    from cellseg_deploy.modeling import ModelConfig, RawMaskRCNN, build_model, save_checkpoint

    torch.manual_seed(1)
    config = ModelConfig(arch="tiny", min_size=256, max_size=512, detections_per_img=200, score_thresh=0.0)
    model = build_model(config).eval()
    raw = RawMaskRCNN(model).eval()
    with torch.inference_mode():
        grey_best = float(raw(torch.from_numpy(grey_image()))[2].max())
        cells = [
            *cell_images.values(),
            fluorescence_cell_image(320, 416, seed=0, n_cells=60),
        ]  # + the exporter's first fallback trace image
        cells_best = min(float(raw(torch.from_numpy(im))[2].max()) for im in cells)
    assert grey_best < cells_best - 0.005, f"cannot separate grey ({grey_best}) from cells ({cells_best})"
    config = dataclasses.replace(config, score_thresh=round((grey_best + cells_best) / 2, 4))
    path = tmp_path_factory.mktemp("dense") / "tiny-dense.pt"
    save_checkpoint(path, model, config)
    return path


@pytest.fixture(scope="session")
def dense_export(dense_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    """:class:`ExportResult` of ``dense_checkpoint`` (export time fixed by ``SOURCE_DATE_EPOCH``)."""
    from cellseg_deploy.backends.onnxrt.export import export_onnx

    with fixed_export_time():
        return export_onnx(dense_checkpoint, tmp_path_factory.mktemp("onnx") / "tiny-dense.onnx")
