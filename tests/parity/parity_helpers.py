"""Helpers shared by the parity tests (a module with a unique name, importable from this folder)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ParityModel:
    """The model the parity tests check: checkpoint, its synthetic data set, and the score threshold at which
    its instances must agree (0.5 for the trained model; random weights never score that high)."""

    checkpoint: Path
    data_root: Path
    score_thresh: float
    trained: bool
