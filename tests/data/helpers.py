"""Helpers shared by the data tests (plain functions; fixtures live in ``conftest.py``)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def tree_hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root``, keyed by relative path (compare before / after to prove no writes)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def first_sample(root: Path) -> Path:
    """The first training sample folder (sorted by name)."""
    return sorted(p for p in (root / "train").iterdir() if p.is_dir())[0]
