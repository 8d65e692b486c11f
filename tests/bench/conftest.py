"""Fixtures of the benchmark tests: a model to measure, and the CLI entry point."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def bench_model(request: pytest.FixtureRequest) -> tuple[Path, Path | None]:
    """``(checkpoint, data_root)``: the briefly trained tiny model and its synthetic dataset when the
    ``trained_tiny`` fixture exists, else the untrained tiny checkpoint and no dataset."""
    try:
        checkpoint, data_root = request.getfixturevalue("trained_tiny")
        return Path(checkpoint), Path(data_root)
    except pytest.FixtureLookupError:
        return Path(request.getfixturevalue("random_tiny_checkpoint")), None


@pytest.fixture(scope="session")
def small_untrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight tiny checkpoint at input size 128 that returns exactly 6 detections per image."""
    from cellseg_deploy.bench.models import build_untrained_checkpoint

    return build_untrained_checkpoint(
        tmp_path_factory.mktemp("untrained") / "tiny-det6.pt", "tiny", 6, min_size=128
    )
