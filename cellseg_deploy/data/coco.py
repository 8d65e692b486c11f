"""COCO instance annotations (RLE) from the dataset layout.

Image ids: a training image gets the 1-based index of its folder name among *all* sorted training folders
(stable across splits, so ``train``, ``val`` and ``all`` agree), and each image entry carries the extra key
``"sample_id"`` (the folder name) and ``"file_name": "<sample_id>/image.tif"`` (relative to ``train/``). Test
images keep the ids of ``test_image_name_to_ids.json``. Annotation ids run from 1. Every annotation has
``segmentation`` (compressed RLE, ``counts`` as str, at the original resolution), ``area`` (mask pixel count),
``bbox`` (``[x, y, w, h]`` tight around the mask) and ``iscrowd: 0``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from cellseg_deploy import CLASS_NAMES
from cellseg_deploy.data.layout import (
    TEST_GT_NAME,
    Sample,
    list_train_ids,
    load_sample,
    load_test_index,
    split_train_val,
)
from cellseg_deploy.data.rle import encode_crop, rle_area
from cellseg_deploy.errors import DataError

SPLITS: tuple[str, ...] = ("all", "train", "val", "test")


def categories() -> list[dict[str, Any]]:
    """COCO categories 1..4 named ``class1`` .. ``class4``."""
    return [{"id": k, "name": name, "supercategory": "cell"} for k, name in enumerate(CLASS_NAMES, start=1)]


def sample_annotations(sample: Sample, image_id: int, first_ann_id: int) -> list[dict[str, Any]]:
    """COCO annotations of one sample's instances (ids from ``first_ann_id``)."""
    anns = []
    h, w = sample.image_size
    for i in range(len(sample.labels)):
        x0, y0, x1, y1 = (int(v) for v in sample.boxes[i])
        rle = encode_crop(sample.masks[i, y0:y1, x0:x1], x0, y0, (h, w))
        anns.append(
            {
                "id": first_ann_id + i,
                "image_id": image_id,
                "category_id": int(sample.labels[i]),
                "segmentation": rle,
                "area": rle_area(rle),
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "iscrowd": 0,
            }
        )
    return anns


def samples_to_coco(samples: Iterable[Sample], image_ids: dict[str, int] | None = None) -> dict[str, Any]:
    """A COCO instances dict from samples; ``image_ids`` maps sample id -> image id (default 1, 2, ...)."""
    images, annotations = [], []
    for n, sample in enumerate(samples, start=1):
        image_id = image_ids[sample.sample_id] if image_ids is not None else n
        h, w = sample.image_size
        images.append(
            {"id": image_id, "file_name": f"{sample.sample_id}/image.tif", "height": h, "width": w,
             "sample_id": sample.sample_id}
        )
        annotations += sample_annotations(sample, image_id, len(annotations) + 1)
    return {"images": images, "annotations": annotations, "categories": categories()}


def train_image_ids(root: str | Path) -> dict[str, int]:
    """Sample id -> COCO image id (1-based index among all sorted training folders)."""
    return {sid: i for i, sid in enumerate(list_train_ids(root), start=1)}


def split_ids(root: str | Path, split: str, val_fraction: float = 0.2, seed: int = 0) -> list[str]:
    """The training-layout sample ids of ``split`` (``all``, ``train`` or ``val``)."""
    ids = list_train_ids(root)
    if split == "all":
        return ids
    train, val = split_train_val(ids, val_fraction, seed)
    if split == "train":
        return train
    if split == "val":
        return val
    raise DataError(f"unknown split {split!r}; expected one of {list(SPLITS)}")


def iter_samples(root: str | Path, sample_ids: Iterable[str]) -> Iterator[Sample]:
    """Load samples one at a time (memory stays one image's worth)."""
    for sid in sample_ids:
        yield load_sample(root, sid)


def dataset_to_coco(root: str | Path, split: str = "all", val_fraction: float = 0.2, seed: int = 0) -> dict[str, Any]:
    """COCO ground truth of a dataset split.

    ``all``/``train``/``val`` come from ``train/`` (split by :func:`~cellseg_deploy.data.layout.split_train_val`);
    ``test`` is ``test_ground_truth.json`` (written by ``data synth``), whose image entries get the extra key
    ``"path"`` (``test_release/<file_name>``).
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    root = Path(root)
    if split == "test":
        gt_path = root / TEST_GT_NAME
        if not gt_path.is_file():
            raise DataError(
                f"{root} has no {TEST_GT_NAME}: the test side has no ground truth (only synthetic sets ship one); "
                "evaluate on --split val instead"
            )
        gt = json.loads(gt_path.read_text())
        entries = {e.image_id: e for e in load_test_index(root)}
        for img in gt["images"]:
            entry = entries.get(img["id"])
            if entry is None:
                raise DataError(f"{gt_path}: image id {img['id']} is not in the test id map")
            img["path"] = f"test_release/{entry.file_name}"
        return dict(gt)
    ids = split_ids(root, split, val_fraction, seed)
    return samples_to_coco(iter_samples(root, ids), train_image_ids(root))
