"""``cellseg-deploy data check``: validate a dataset and collect its statistics, without changing anything.

Each defect is one line naming the file and what is wrong. Checked: the train folder exists and holds sample
folders; every sample has a readable, decodable ``image.tif``; every ``classK.tif`` has K in 1..4, decodes, has the
image's shape and holds integer, non-negative, finite IDs; the test side (when present) has an id map that matches
``test_release/`` (files, ids, heights and widths).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from cellseg_deploy import CLASS_NAMES
from cellseg_deploy.data.io import read_id_mask, read_image
from cellseg_deploy.data.layout import TEST_MAP_NAME, class_files, list_train_ids, load_test_index
from cellseg_deploy.errors import DataError


@dataclass
class CheckReport:
    """Statistics and defects of a dataset.

    ``stats``: ``n_train``, ``n_test``, ``height``/``width`` ranges ``[min, max]`` (px, training and test images),
    ``instances_per_class`` {class name: count}, ``max_instances`` (most in one image) and ``max_instances_image``.
    ``defects``: one line per problem.
    """

    root: Path
    stats: dict[str, Any] = field(default_factory=dict)
    defects: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.defects

    def to_dict(self) -> dict[str, Any]:
        return {"root": str(self.root), "ok": self.ok, "stats": self.stats, "defects": self.defects}

    def text(self) -> str:
        s = self.stats
        lines = [
            f"dataset {self.root}",
            f"  training images: {s.get('n_train', 0)}   test images: {s.get('n_test', 0)}",
        ]
        if s.get("height"):
            lines.append(f"  height {s['height'][0]}-{s['height'][1]} px, width {s['width'][0]}-{s['width'][1]} px")
        per = s.get("instances_per_class", {})
        lines.append("  instances per class: " + ", ".join(f"{k} {v}" for k, v in per.items()))
        lines.append(f"  total instances: {sum(per.values())}; most in one image: {s.get('max_instances', 0)}"
                     + (f" ({s['max_instances_image']})" if s.get("max_instances_image") else ""))
        lines.append("  OK" if self.ok else f"  {len(self.defects)} defect(s)")
        return "\n".join(lines)


def check_dataset(root: str | Path, progress: bool = True) -> CheckReport:
    """Validate ``root`` (see the module docstring). Raises :class:`DataError` only if ``root`` is missing."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist")
    report = CheckReport(root)
    heights: list[int] = []
    widths: list[int] = []
    per_class = dict.fromkeys(CLASS_NAMES, 0)
    most, most_at = 0, ""
    train = root / "train"
    ids: list[str] = []
    if not train.is_dir():
        report.defects.append(f"{train}: missing train/ folder")
    else:
        ids = list_train_ids(root)
        if not ids:
            report.defects.append(f"{train}: empty train folder (no sample folders)")
    for sid in tqdm(ids, desc="check", unit="img", disable=not progress):
        folder = train / sid
        image_path = folder / "image.tif"
        shape = None
        if not image_path.is_file():
            report.defects.append(f"{image_path}: missing image.tif")
        else:
            try:
                image = read_image(image_path)
                shape = image.shape[:2]
                heights.append(shape[0])
                widths.append(shape[1])
            except DataError as exc:
                report.defects.append(str(exc))
        n_image = 0
        files = class_files(folder)
        for k, path in files:
            if not 1 <= k <= len(CLASS_NAMES):
                report.defects.append(f"{path}: class {k} is outside 1..{len(CLASS_NAMES)}")
                continue
            try:
                ids_mask = read_id_mask(path)
            except DataError as exc:
                report.defects.append(str(exc))
                continue
            if shape is not None and ids_mask.shape != shape:
                report.defects.append(
                    f"{path}: mask shape {ids_mask.shape[0]}x{ids_mask.shape[1]} differs from image.tif {shape[0]}x{shape[1]}"
                )
                continue
            n = int(np.count_nonzero(np.unique(ids_mask)))
            per_class[CLASS_NAMES[k - 1]] += n
            n_image += n
        if n_image > most:
            most, most_at = n_image, sid
    n_test = 0
    if (root / TEST_MAP_NAME).exists() or (root / "test_release").exists():
        try:
            entries = load_test_index(root)
            n_test = len(entries)
            for e in entries:
                try:
                    h, w = read_image(e.path).shape[:2]
                except DataError as exc:
                    report.defects.append(str(exc))
                    continue
                heights.append(h)
                widths.append(w)
                if (h, w) != (e.height, e.width):
                    report.defects.append(
                        f"{root / TEST_MAP_NAME}: {e.file_name} is {h}x{w} but the map says {e.height}x{e.width}"
                    )
        except DataError as exc:
            report.defects.append(str(exc))
    report.stats = {
        "n_train": len(ids),
        "n_test": n_test,
        "height": [min(heights), max(heights)] if heights else [],
        "width": [min(widths), max(widths)] if widths else [],
        "instances_per_class": per_class,
        "max_instances": most,
        "max_instances_image": most_at,
    }
    return report
