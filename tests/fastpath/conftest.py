"""Fixtures of the CPU fast-path tests: a random tiny checkpoint whose score threshold separates a grey image
(no detection) from cell images (many), and its ONNX export made by the project's exporter, once per session.

The threshold is placed by measurement between the best score on the grey image and the lowest best score on
the cell images, and both facts are asserted where the tests rely on them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from fastpath_helpers import grey_image


@pytest.fixture(scope="session")
def fast_cell_images() -> dict[str, np.ndarray]:
    """Cell images the runner tests use: non-square, odd sizes, one dense."""
    from cellseg_deploy.data.synth import fluorescence_cell_image

    return {
        "cells 200x264": fluorescence_cell_image(200, 264, seed=11, n_cells=40),
        "cells 257x190": fluorescence_cell_image(257, 190, seed=12, n_cells=30),
        "dense 320x320": fluorescence_cell_image(320, 320, seed=13, n_cells=300),
    }


@pytest.fixture(scope="session")
def fast_checkpoint(
    tmp_path_factory: pytest.TempPathFactory, fast_cell_images: dict[str, np.ndarray]
) -> Path:
    """Random ``tiny`` checkpoint (input 256 px, at most 150 detections), grey images give none."""
    import torch

    from cellseg_deploy.data.synth import fluorescence_cell_image
    from cellseg_deploy.modeling import ModelConfig, RawMaskRCNN, build_model, save_checkpoint

    torch.manual_seed(2)
    config = ModelConfig(arch="tiny", min_size=256, max_size=512, detections_per_img=150, score_thresh=0.0)
    model = build_model(config).eval()
    raw = RawMaskRCNN(model).eval()
    with torch.inference_mode():
        grey_best = float(raw(torch.from_numpy(grey_image()))[2].max())
        # the exporter's first fallback trace image
        trace = fluorescence_cell_image(320, 416, seed=0, n_cells=60)
        cells_best = min(
            float(raw(torch.from_numpy(im))[2].max()) for im in [*fast_cell_images.values(), trace]
        )
    assert grey_best < cells_best - 0.005, f"cannot separate grey ({grey_best}) from cells ({cells_best})"
    config = dataclasses.replace(config, score_thresh=round((grey_best + cells_best) / 2, 4))
    path = tmp_path_factory.mktemp("fastpath") / "tiny-random.pt"
    save_checkpoint(path, model, config)
    return path


@pytest.fixture(scope="session")
def fast_onnx(fast_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's single-graph ONNX export of :func:`fast_checkpoint`."""
    from cellseg_deploy.backends.onnxrt.export import export_onnx

    out = tmp_path_factory.mktemp("fastpath-onnx") / "tiny-random.onnx"
    export_onnx(fast_checkpoint, out)
    return out
