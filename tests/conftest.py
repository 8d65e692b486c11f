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
from typing import NamedTuple

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
        return (
            "needs an NVIDIA GPU (torch.cuda.is_available() is False); run 'pytest -m gpu' on a GPU machine"
        )
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _gpu_skip_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # a marker, not a parametrize id named gpu
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


class TrainedTiny(NamedTuple):
    """What ``trained_tiny`` gives: a checkpoint and the synthetic dataset it was trained on."""

    checkpoint: Path
    data_root: Path


# The tiny_cpu recipe, bounded for CI: 12 synthetic training images (10 train / 2 val), 150 steps of 1 image.
TRAINED_TINY_DATA = {"n_train": 12, "n_test": 4, "min_size": 128, "max_size": 192, "seed": 0}
TRAINED_TINY_OVERRIDES = [
    "model.min_size=160",  # about the images' own scale: 40% of the recipe's pixels per image
    "model.max_size=320",
    "train.batch_size=1",
    "train.epochs=15",  # 10 steps of 1 image per epoch: 150 steps
    "schedule.warmup_steps=30",
    "val.every_epochs=15",  # validate once, at the end
    "train.checkpoint_every_steps=0",
    "train.time_limit_min=0",  # bounded by steps, not by the clock: the same model on any machine
    "schedule.time_aware=false",
]


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory: pytest.TempPathFactory) -> TrainedTiny:
    """A ``tiny`` model trained from random init on a small synthetic set (12 train + 4 test images of
    128-192 px, seed 0) with the ``tiny_cpu`` recipe at input size 160 for 150 steps of one image: real
    detections (segm AP50 about 0.58 on its 2 validation images; 15-30 per image score >= 0.5). Built once
    per session (about 80 s on one thread). Unpacks as ``checkpoint, data_root = trained_tiny``: ``checkpoint``
    is the run's ``best.pt``; ``data_root`` holds ``train/``, ``test_release/``, the id map and
    ``test_ground_truth.json``."""
    from cellseg_deploy.data.synth import SynthConfig, make_synthetic_dataset
    from cellseg_deploy.training import load_recipe, train

    root = tmp_path_factory.mktemp("trained_tiny")
    data_root = root / "data"
    make_synthetic_dataset(data_root, SynthConfig(**TRAINED_TINY_DATA), progress=False)
    result = train(load_recipe("tiny_cpu", TRAINED_TINY_OVERRIDES), data_root, root / "run", progress=False)
    assert result.best_checkpoint is not None
    return TrainedTiny(result.best_checkpoint, data_root)
