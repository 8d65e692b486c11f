"""Fixtures of the training tests: a very small synthetic dataset (10 images of 64-96 px)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 training images of 64-96 px (seed 3), no test images."""
    from cellseg_deploy.data.synth import SynthConfig, make_synthetic_dataset

    root = tmp_path_factory.mktemp("small_synth")
    make_synthetic_dataset(
        root, SynthConfig(n_train=10, n_test=0, min_size=64, max_size=96, seed=3), progress=False
    )
    return root
