"""Fixtures of the staged-pipeline tests: one stage export of the random tiny checkpoint per session, cell
images, and the PyTorch reference's predictions on them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cellseg_deploy.structures import Instances


@pytest.fixture(scope="session")
def stage_dir(random_tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FP32 and FP16 stage graphs of the random tiny checkpoint (with the exporter's finite check)."""
    from cellseg_deploy.backends.staged.export import export_staged

    out = tmp_path_factory.mktemp("stages")
    export_staged(random_tiny_checkpoint, out, fp16=True)
    return out


@pytest.fixture(scope="session")
def cell_images() -> dict[int, np.ndarray]:
    """Synthetic cell images of three shapes: non-square, square, tall and inverted (dark cells)."""
    from cellseg_deploy.data.synth import fluorescence_cell_image

    return {
        1: fluorescence_cell_image(300, 400, seed=1, n_cells=50),
        2: fluorescence_cell_image(256, 256, seed=2, n_cells=80),
        3: fluorescence_cell_image(500, 200, seed=3, n_cells=30, invert=True),
    }


@pytest.fixture(scope="session")
def torch_predictions(
    random_tiny_checkpoint: Path, cell_images: dict[int, np.ndarray]
) -> dict[int, Instances]:
    """The PyTorch reference's instances (every detection kept) on :func:`cell_images`."""
    from cellseg_deploy.backends import create_runner

    with create_runner("torch", random_tiny_checkpoint) as runner:
        return {i: runner.predict(im) for i, im in cell_images.items()}


from tests.trt_double import trt_double  # noqa: E402, F401  (the TensorRT + CUDA doubles, as a fixture)
