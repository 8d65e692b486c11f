"""Helpers shared by the fast-path tests (a module with a unique name, importable from this folder)."""

from __future__ import annotations

import numpy as np


def grey_image(height: int = 96, width: int = 120) -> np.ndarray:
    """A uniform grey RGB uint8 image (the fixtures' random model detects nothing on it)."""
    return np.full((height, width, 3), 128, np.uint8)
