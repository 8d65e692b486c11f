"""Helpers shared by the export tests (a module with a unique name, importable from this folder)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import numpy as np

FIXED_EPOCH = "1767225600"  # 2026-01-01T00:00:00Z: reproducible export time for byte comparisons


@contextlib.contextmanager
def fixed_export_time() -> Iterator[None]:
    """``SOURCE_DATE_EPOCH`` set for the block (the exporter then writes byte-identical files)."""
    old = os.environ.get("SOURCE_DATE_EPOCH")
    os.environ["SOURCE_DATE_EPOCH"] = FIXED_EPOCH
    try:
        yield
    finally:
        if old is None:
            del os.environ["SOURCE_DATE_EPOCH"]
        else:
            os.environ["SOURCE_DATE_EPOCH"] = old


def grey_image(height: int = 240, width: int = 200) -> np.ndarray:
    return np.full((height, width, 3), 128, np.uint8)
