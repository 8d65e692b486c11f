"""Fixtures of the data tests: small synthetic datasets made once per session.

They are read-only by convention: a test that damages data copies the folder to ``tmp_path`` first (and
checks with :func:`tests.data.helpers.tree_hashes` that the source did not change).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cellseg_deploy.data.synth import SynthConfig, make_synthetic_dataset

SMALL = SynthConfig(n_train=4, n_test=2, min_size=48, max_size=96, min_cells=5, max_cells=20, seed=3)
EXTREMES = SynthConfig(
    n_train=1, n_test=1, min_size=48, max_size=64, min_cells=5, max_cells=10, seed=5, extremes=True
)


@pytest.fixture(scope="session")
def small_synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 training and 2 test images of 48-96 px, 5-20 cells (seed 3)."""
    root = tmp_path_factory.mktemp("synth") / "ds"
    make_synthetic_dataset(root, SMALL, progress=False)
    return root


@pytest.fixture(scope="session")
def extremes_synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small training and one test image plus the extremes: ~40 px, >1000 px, IDs > 255."""
    root = tmp_path_factory.mktemp("extremes") / "ds"
    make_synthetic_dataset(root, EXTREMES, progress=False)
    return root
