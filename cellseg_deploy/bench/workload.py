"""The images a benchmark runs on: TIFF files on disk, so that decoding is part of what is measured.

- :func:`synthetic_workload`: ``images`` synthetic cell images of ``height x width`` px with ``cells`` cells
  each, rendered by :mod:`cellseg_deploy.data.synth` and written in the real dataset's image format (RGBA
  uint8, LZW-compressed TIFF), reused when they already exist.
- :func:`folder_workload`: the images of a dataset root (``test_release/``, else ``train/*/image.tif``) or
  of a plain folder of TIFF/PNG files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cellseg_deploy.errors import DataError, UserError
from cellseg_deploy.io_utils import atomic_write_json, atomic_write_with

IMAGE_SUFFIXES: tuple[str, ...] = (".tif", ".tiff", ".png")


@dataclass(frozen=True)
class BenchImage:
    """One benchmark image.

    Attributes:
        name: a short name for reports.
        path: the image file (decoded by :func:`cellseg_deploy.data.io.read_image` in every sample).
        height / width: pixels.
        cells: cells placed in it (synthetic images), ``None`` when unknown.
        visible_cells: of those, the instances left after occlusion (what a perfect model would detect).
    """

    name: str
    path: Path
    height: int
    width: int
    cells: int | None = None
    visible_cells: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        return {
            "name": self.name,
            "path": str(self.path),
            "height": self.height,
            "width": self.width,
            "cells": self.cells,
            "visible_cells": self.visible_cells,
        }


@dataclass(frozen=True)
class Workload:
    """The images of one benchmark and where they came from."""

    images: tuple[BenchImage, ...]
    source: str
    description: str

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        return {
            "source": self.source,
            "description": self.description,
            "images": [im.to_dict() for im in self.images],
        }


def render_cells(height: int, width: int, cells: int, seed: int) -> tuple[np.ndarray, int]:
    """A synthetic RGB uint8 ``[height, width, 3]`` image with ``cells`` cells placed
    (:func:`cellseg_deploy.data.synth.render_image`), and how many stay visible after occlusion."""
    from cellseg_deploy.data.synth import render_image

    synth = render_image(np.random.default_rng(seed), height, width, cells)
    visible = sum(int(np.count_nonzero(np.unique(m))) for m in synth.id_masks.values())
    return synth.image, visible


def write_tiff(path: Path, image: np.ndarray) -> Path:
    """Write RGB uint8 ``[H, W, 3]`` as the dataset does (RGBA, alpha 255, LZW), atomically."""
    from cellseg_deploy.data.io import write_image_tif

    return atomic_write_with(path, lambda tmp: write_image_tif(tmp, image))


def synthetic_workload(
    folder: Path, height: int, width: int, cells: int, *, images: int = 1, seed: int = 0
) -> Workload:
    """``images`` synthetic images (seeds ``seed``, ``seed + 1``, ...) written as TIFF files into ``folder``.

    Files made earlier with the same settings (recorded in ``folder/workload.json``) are reused. Each image
    records the cells placed and those still visible after occlusion (cells may overlap).
    """
    if min(height, width, cells, images) < 1:
        raise UserError(
            f"a synthetic workload needs positive sizes and counts, got {height}x{width}, "
            f"{cells} cells, {images} images"
        )
    spec = {"height": height, "width": width, "cells": cells, "images": images, "seed": seed, "version": 2}
    manifest = folder / "workload.json"
    paths = [folder / f"synth-{i:03d}.tif" for i in range(images)]
    saved = json.loads(manifest.read_text()) if manifest.is_file() else {}
    if saved.get("spec") == spec and all(p.is_file() for p in paths):
        visible = [int(v) for v in saved["visible_cells"]]
    else:
        folder.mkdir(parents=True, exist_ok=True)
        visible = []
        for i, path in enumerate(paths):
            image, n_visible = render_cells(height, width, cells, seed + i)
            write_tiff(path, image)
            visible.append(n_visible)
        atomic_write_json(manifest, {"spec": spec, "visible_cells": visible})
    items = [
        BenchImage(f"synth-{height}x{width}-{cells}c-s{seed + i}", path, height, width, cells, visible[i])
        for i, path in enumerate(paths)
    ]
    return Workload(
        tuple(items),
        "synthetic",
        f"{images} synthetic image(s) of {height} x {width} px with {cells} cells each (seed {seed})",
    )


def folder_workload(root: Path, limit: int | None = None) -> Workload:
    """The images of a dataset root (``test_release/``, else ``train/<id>/image.tif``) or of a plain folder.

    Sizes are read from the files' headers. ``limit`` keeps the first images in sorted order.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"--data {root} is not a folder; expected a dataset root or a folder of TIFF/PNG images"
        )
    if (root / "test_release").is_dir():
        paths, where = _images_in(root / "test_release"), "test_release/"
    elif (root / "train").is_dir():
        paths, where = sorted((root / "train").glob("*/image.tif")), "train/*/image.tif"
    else:
        paths, where = _images_in(root), "the folder"
    if not paths:
        raise DataError(f"no TIFF/PNG images in {root} ({where})")
    if limit is not None:
        paths = paths[:limit]
    items = []
    for p in paths:
        h, w = _image_size(p)
        name = p.parent.name if p.name == "image.tif" else p.stem
        items.append(BenchImage(name, p, h, w, None))
    return Workload(tuple(items), "folder", f"{len(items)} image(s) from {root} ({where})")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _image_size(path: Path) -> tuple[int, int]:
    """``(H, W)`` from the file header (TIFF, PNG, JPEG; :func:`cellseg_deploy.data.io.image_size`), whose
    errors are one line that never quotes the file's bytes."""
    from cellseg_deploy.data.io import image_size

    return image_size(path)
