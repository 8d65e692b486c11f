"""``cellseg-deploy data check``: validate a dataset and collect its statistics, without changing anything.

Each defect is one line naming the file and what is wrong. Checked:

- ``train/`` exists and holds sample folders (a missing or empty ``train/`` is a defect);
- every sample folder has an ``image.tif`` that reads and decodes completely (missing, unreadable, corrupt and
  truncated files are defects);
- every ``class*.tif`` is named ``classK.tif`` with K in 1..4 (``class0.tif``, ``class5.tif``, ``classA.tif``
  are defects), decodes, has the image's height and width, and holds finite, non-negative, integer IDs;
- the test side, when either half is present: ``test_image_name_to_ids.json`` parses, has no duplicate ids or
  names, lists exactly the images in ``test_release/``, every one decodes, and its height and width match.

A dataset without any test side (no map, no ``test_release/``) is fine: ``n_test`` is 0. Files are only read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from cellseg_deploy import CLASS_NAMES
from cellseg_deploy.data.io import read_id_mask, read_image
from cellseg_deploy.data.layout import CLASS_FILE, TEST_MAP_NAME, list_train_ids, read_test_index
from cellseg_deploy.errors import DataError

_CLASS_LIKE = re.compile(r"^class.*\.tiff?$", re.IGNORECASE)


@dataclass
class CheckReport:
    """Statistics and defects of a dataset.

    Attributes:
        root: the dataset folder.
        stats: ``n_train``, ``n_test`` (images), ``height`` / ``width`` ranges ``[min, max]`` in pixels over the
            training and test images that decoded, ``instances_per_class`` {``class1``..``class4``: count},
            ``instances`` (total), ``max_instances`` (most in one training image) and ``max_instances_image``
            (its folder name), ``max_id`` (highest ID value in any class file), ``images_without_instances``.
        defects: one line per problem, each naming the file.
    """

    root: Path
    stats: dict[str, Any] = field(default_factory=dict)
    defects: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when there are no defects."""
        return not self.defects

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for ``--json``: ``root``, ``ok``, ``stats``, ``defects``."""
        return {"root": str(self.root), "ok": self.ok, "stats": self.stats, "defects": self.defects}

    def text(self) -> str:
        """The statistics as a few human-readable lines (the defects are printed separately)."""
        s = self.stats
        lines = [
            f"dataset {self.root}",
            f"  training images: {s.get('n_train', 0)}   test images: {s.get('n_test', 0)}",
        ]
        if s.get("height"):
            lines.append(
                f"  height {s['height'][0]}-{s['height'][1]} px, width {s['width'][0]}-{s['width'][1]} px"
            )
        per = s.get("instances_per_class", {})
        lines.append("  instances per class: " + ", ".join(f"{k} {v}" for k, v in per.items()))
        lines.append(
            f"  total instances: {s.get('instances', 0)}; most in one image: {s.get('max_instances', 0)}"
            + (f" ({s['max_instances_image']})" if s.get("max_instances_image") else "")
            + f"; highest ID: {s.get('max_id', 0)}; images without instances: {s.get('images_without_instances', 0)}"
        )
        lines.append("  OK" if self.ok else f"  {len(self.defects)} defect(s)")
        return "\n".join(lines)


def _check_sample(
    folder: Path, report: CheckReport, sizes: list[tuple[int, int]]
) -> tuple[dict[int, int], int]:
    """Check one sample folder; returns ``({class: instances}, highest ID)`` of the masks that passed."""
    image_path = folder / "image.tif"
    shape: tuple[int, int] | None = None
    if not image_path.is_file():
        report.defects.append(f"{image_path}: missing image.tif (every sample folder needs one)")
    else:
        try:
            h, w = read_image(image_path).shape[:2]
            shape = (int(h), int(w))
            sizes.append(shape)
        except DataError as exc:
            report.defects.append(str(exc))
    counts: dict[int, int] = {}
    max_id = 0
    for path in sorted(folder.iterdir()):
        if not _CLASS_LIKE.match(path.name):
            continue
        m = CLASS_FILE.match(path.name)
        k = int(m.group(1)) if m else None
        if k is None or not 1 <= k <= len(CLASS_NAMES):
            report.defects.append(
                f"{path}: class file name outside class1..class{len(CLASS_NAMES)}.tif; rename or remove it"
            )
            continue
        try:
            ids = read_id_mask(path)
        except DataError as exc:
            report.defects.append(str(exc))
            continue
        if shape is not None and ids.shape != shape:
            report.defects.append(
                f"{path}: mask is {ids.shape[0]}x{ids.shape[1]} (HxW), which differs from image.tif {shape[0]}x{shape[1]}"
            )
            continue
        values = np.unique(ids)
        counts[k] = counts.get(k, 0) + int(np.count_nonzero(values))
        max_id = max(max_id, int(values[-1]) if values.size else 0)
    return counts, max_id


def check_dataset(root: str | Path, progress: bool = True) -> CheckReport:
    """Validate ``root`` (see the module docstring) and gather its statistics; reads, never writes.

    Args:
        root: the dataset folder (holding ``train/`` and optionally ``test_release/`` + the id map).
        progress: show a tqdm bar (rate, ETA) on a terminal; off when stderr is not a TTY.

    Raises:
        DataError: only when ``root`` itself is missing; everything else becomes a line in ``defects``.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist")
    report = CheckReport(root)
    sizes: list[tuple[int, int]] = []
    per_class = dict.fromkeys(CLASS_NAMES, 0)
    most, most_at, max_id, without = 0, "", 0, 0
    train = root / "train"
    ids: list[str] = []
    if not train.is_dir():
        report.defects.append(f"{train}: missing train/ folder (expected train/<id>/image.tif + classK.tif)")
    else:
        ids = list_train_ids(root)
        if not ids:
            report.defects.append(f"{train}: empty train folder (no sample folders)")
    for sid in tqdm(ids, desc="check train", unit="img", disable=None if progress else True):
        counts, sample_max = _check_sample(train / sid, report, sizes)
        for k, n in counts.items():
            per_class[CLASS_NAMES[k - 1]] += n
        n_image = sum(counts.values())
        without += n_image == 0
        max_id = max(max_id, sample_max)
        if n_image > most:
            most, most_at = n_image, sid
    n_test = 0
    if (root / TEST_MAP_NAME).exists() or (root / "test_release").exists():
        entries, problems = read_test_index(root)
        report.defects += problems
        n_test = len(entries)
        for e in tqdm(entries, desc="check test", unit="img", disable=None if progress else True):
            try:
                h, w = read_image(e.path).shape[:2]
            except DataError as exc:
                report.defects.append(str(exc))
                continue
            sizes.append((int(h), int(w)))
            if (h, w) != (e.height, e.width):
                report.defects.append(
                    f"{root / TEST_MAP_NAME}: {e.file_name} is {h}x{w} (HxW) but the map says {e.height}x{e.width}"
                )
    report.stats = {
        "n_train": len(ids),
        "n_test": n_test,
        "height": [min(s[0] for s in sizes), max(s[0] for s in sizes)] if sizes else [],
        "width": [min(s[1] for s in sizes), max(s[1] for s in sizes)] if sizes else [],
        "instances_per_class": per_class,
        "instances": sum(per_class.values()),
        "max_instances": most,
        "max_instances_image": most_at,
        "max_id": max_id,
        "images_without_instances": without,
    }
    return report
