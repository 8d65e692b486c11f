"""Fixtures of the data tests: one small synthetic dataset per session (copied before any damage)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cellseg_deploy.data.synth import SynthConfig, make_synthetic_dataset


@pytest.fixture(scope="session")
def small_synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 training and 2 test images of 48-96 px (read-only by convention: copy before damaging)."""
    root = tmp_path_factory.mktemp("synth") / "ds"
    make_synthetic_dataset(root, SynthConfig(n_train=4, n_test=2, min_size=48, max_size=96, min_cells=5,
                                             max_cells=20, seed=3), progress=False)
    return root
