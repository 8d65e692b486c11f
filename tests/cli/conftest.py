"""Fixtures of the CLI tests: real files only (a random-weight checkpoint, ONNX exports, TIFFs, datasets).

- ``cli``: runs ``cellseg-deploy`` in-process and returns ``(exit code, stdout, stderr, seconds)``.
- ``images``: writes RGB images as the competition stores them (RGBA LZW TIFF).
- ``tiny_onnx``: a dynamic-size ONNX export of the random tiny checkpoint (module scope: one export).
- ``static_onnx``: an export fixed to 320 x 416 px, which cannot run any other size: "an image the model
  cannot take" without any mock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from cellseg_deploy.data.io import write_image_tif


class Result(NamedTuple):
    """What one command run gave."""

    code: int
    out: str
    err: str
    seconds: float

    @property
    def err_lines(self) -> list[str]:
        """Non-empty stderr lines."""
        return [line for line in self.err.splitlines() if line.strip()]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., Result]:
    """``cli("predict", ...)`` runs the command in this process, as the console script does."""
    from cellseg_deploy.cli.main import main

    def run(*args: str | Path) -> Result:
        capsys.readouterr()
        t0 = time.perf_counter()
        code = main([str(a) for a in args])
        seconds = time.perf_counter() - t0
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err, seconds)

    return run


def write_images(folder: Path, sizes: dict[str, tuple[int, int]], seed: int = 0) -> Path:
    """Write ``{file name: (H, W)}`` as RGBA LZW TIFFs of random texture into ``folder`` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, (h, w) in sizes.items():
        write_image_tif(folder / name, rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    return folder


@pytest.fixture(scope="module")
def tiny_onnx(random_tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random tiny checkpoint exported to ONNX with dynamic height and width."""
    from cellseg_deploy.backends.onnxrt.export import export_onnx

    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    export_onnx(random_tiny_checkpoint, out)
    return out


@pytest.fixture(scope="module")
def static_onnx(random_tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random tiny checkpoint exported for 320 x 416 images only (``--static``)."""
    from cellseg_deploy.backends.onnxrt.export import export_onnx

    out = tmp_path_factory.mktemp("onnx-static") / "static.onnx"
    export_onnx(random_tiny_checkpoint, out, dynamic=False)
    return out
