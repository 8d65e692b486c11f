"""Shared test fixtures and the one place where GPU-only tests are skipped.

- ``@pytest.mark.gpu`` tests need an NVIDIA GPU (and TensorRT for engine tests); they are skipped here with
  the reason shown (``-ra``). On a GPU machine: ``pytest -m gpu``.
- ``shared_dir``: ``../shared`` beside the repository (or ``$CELLSEG_SHARED``), skipped when absent.
- ``random_tiny_checkpoint``: an untrained tiny model checkpoint (fast; for export and runner mechanics).
- ``trained_tiny``: a tiny model trained briefly on a small synthetic set (session-scoped, built once).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Keep test runs predictable on small CI machines: one intra-op thread unless told otherwise.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _gpu_skip_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "needs an NVIDIA GPU (torch.cuda.is_available() is False); run 'pytest -m gpu' on a GPU machine"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _gpu_skip_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    path = Path(os.environ.get("CELLSEG_SHARED", REPO.parent / "shared"))
    if not path.is_dir():
        pytest.skip(f"shared folder not found at {path} (set CELLSEG_SHARED)")
    return path


@pytest.fixture(scope="session")
def hw3_sample(shared_dir: Path) -> Path:
    path = shared_dir / "fixtures" / "hw3-sample"
    if not path.is_dir():
        pytest.skip(f"real sample not found at {path}")
    return path


@pytest.fixture(scope="session")
def random_tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained ``tiny`` checkpoint (random weights, seed 0), input size 256."""
    import torch

    from cellseg_deploy.modeling import ModelConfig, build_model, save_checkpoint

    torch.manual_seed(0)
    config = ModelConfig(arch="tiny", min_size=256, max_size=512)
    model = build_model(config)
    path = tmp_path_factory.mktemp("ckpt") / "tiny-random.pt"
    save_checkpoint(path, model, config)
    return path
