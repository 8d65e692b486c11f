"""COCO instance annotations (RLE) from the dataset layout.

Image ids: a training image gets the 1-based index of its folder name among *all* sorted training folders
(stable across splits, so ``train``, ``val`` and ``all`` agree), and each image entry carries the extra key
``"sample_id"`` (the folder name) and ``"file_name": "<sample_id>/image.tif"`` (relative to ``train/``). Test
images keep the ids of ``test_image_name_to_ids.json``. Annotation ids run from 1. Every annotation has
``segmentation`` (compressed RLE, ``counts`` as str, at the original resolution), ``area`` (mask pixel count),
``bbox`` (``[x, y, w, h]`` tight around the mask) and ``iscrowd: 0``.

To go from an image entry back to its sample, use :func:`sample_id_of` (or ``entry["sample_id"]``); from a
sample id to its image id, :func:`train_image_ids`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from cellseg_deploy import CLASS_NAMES
from cellseg_deploy.data.io import DEFAULT_MAX_PIXELS
from cellseg_deploy.data.layout import (
    DEFAULT_VAL_FRACTION,
    SPLITS,
    TEST_GT_NAME,
    Sample,
    list_train_ids,
    load_sample,
    load_test_index,
    split_train_val,
)
from cellseg_deploy.data.rle import encode_crop, rle_area
from cellseg_deploy.errors import ConfigError, DataError


def categories(class_names: Sequence[str] = CLASS_NAMES) -> list[dict[str, Any]]:
    """COCO categories ``1..len(class_names)`` (default: the four ``class1`` .. ``class4``), supercategory ``cell``."""
    return [{"id": k, "name": name, "supercategory": "cell"} for k, name in enumerate(class_names, start=1)]


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


def samples_to_coco(samples: Iterable[Sample], image_ids: Mapping[str, int] | None = None) -> dict[str, Any]:
    """A COCO instances dict (``images``, ``annotations``, ``categories``) from samples.

    Args:
        samples: consumed one at a time (a generator keeps memory at one image).
        image_ids: sample id -> COCO image id; by default 1, 2, ... in iteration order. For samples of a
            dataset use :func:`train_image_ids` so every split agrees (what :func:`dataset_to_coco` does).

    Returns:
        Image entries ``{"id", "file_name": "<sample_id>/image.tif", "height", "width", "sample_id"}``;
        annotations as described in the module docstring, ids 1, 2, ... in sample order, then class, then ID.
    """
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for n, sample in enumerate(samples, start=1):
        if image_ids is not None and sample.sample_id not in image_ids:
            raise ValueError(f"samples_to_coco: no image id given for sample {sample.sample_id!r}")
        image_id = image_ids[sample.sample_id] if image_ids is not None else n
        h, w = sample.image_size
        images.append(
            {
                "id": image_id,
                "file_name": f"{sample.sample_id}/image.tif",
                "height": h,
                "width": w,
                "sample_id": sample.sample_id,
            }
        )
        annotations += sample_annotations(sample, image_id, len(annotations) + 1)
    return {"images": images, "annotations": annotations, "categories": categories()}


def sample_id_of(image_entry: Mapping[str, Any]) -> str:
    """The training folder name of a COCO image entry made here (``"sample_id"``, else from ``file_name``).

    Raises:
        DataError: the entry names no sample (e.g. a test image, whose ``file_name`` is ``<uuid>.tif``).
    """
    if image_entry.get("sample_id"):
        return str(image_entry["sample_id"])
    name = str(image_entry.get("file_name", ""))
    if name.endswith("/image.tif"):
        return name[: -len("/image.tif")]
    raise DataError(
        f"COCO image entry {image_entry.get('id')!r} ({name or 'no file_name'}) is not a training sample"
    )


def train_image_ids(root: str | Path) -> dict[str, int]:
    """Sample id -> COCO image id (1-based index among all sorted training folders)."""
    return {sid: i for i, sid in enumerate(list_train_ids(root), start=1)}


def split_ids(
    root: str | Path, split: str, val_fraction: float = DEFAULT_VAL_FRACTION, seed: int = 0
) -> list[str]:
    """The training-layout sample ids of ``split`` (``all``, ``train`` or ``val``)."""
    ids = list_train_ids(root)
    if split == "all":
        return ids
    train, val = split_train_val(ids, val_fraction, seed)
    if split == "train":
        return train
    if split == "val":
        return val
    raise ConfigError(f"unknown split {split!r}; expected one of {list(SPLITS)}")


def iter_samples(
    root: str | Path,
    sample_ids: Iterable[str],
    progress: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Iterator[Sample]:
    """Load samples one at a time (memory stays one image's worth); ``progress`` shows a tqdm bar on a TTY."""
    ids = list(sample_ids)
    for sid in tqdm(ids, desc="load", unit="img", disable=None if progress else True):
        yield load_sample(root, sid, max_pixels=max_pixels)


def dataset_to_coco(
    root: str | Path,
    split: str = "all",
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
    progress: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> dict[str, Any]:
    """COCO ground truth of a dataset split.

    Args:
        root: the dataset folder.
        split: ``all`` (every training image), ``train`` / ``val`` (:func:`~cellseg_deploy.data.layout.split_train_val`
            with ``val_fraction`` and ``seed``), or ``test`` (``test_ground_truth.json``, written by ``data synth``).
        progress: a tqdm bar over the images on a TTY.
        max_pixels: the training images' pixel limit (:func:`~cellseg_deploy.data.io.read_image`).

    Returns:
        For ``all``/``train``/``val``: :func:`samples_to_coco` with :func:`train_image_ids`. For ``test``: the
        stored ground truth, checked against ``test_image_name_to_ids.json`` (same image ids and file names), its
        image entries given the extra key ``"path"`` (``test_release/<file_name>``).

    Raises:
        DataError: a broken layout, or ``test`` on a dataset without ground truth or whose ground truth does not
            match the id map. ConfigError: an unknown split or a bad ``val_fraction``.
    """
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    root = Path(root)
    if split == "test":
        return _test_ground_truth(root)
    ids = split_ids(root, split, val_fraction, seed)
    return samples_to_coco(iter_samples(root, ids, progress, max_pixels), train_image_ids(root))


def require_images(
    gt: Mapping[str, Any], root: str | Path, split: str, val_fraction: float = DEFAULT_VAL_FRACTION
) -> None:
    """The one rule for an empty split, shared by ``data to-coco`` and ``eval``: it is an error.

    Raises:
        DataError: ``gt`` has no images; the message says why the split came out empty and what to use.
    """
    if gt.get("images"):
        return
    if split == "test":
        raise DataError(f"split 'test' of {root} has no images: {TEST_GT_NAME} lists none")
    n = len(list_train_ids(root))
    if split == "val" and n:
        why = (
            f"{n} training image(s), and the val split needs at least 2 (it keeps one for training)"
            if n < 2
            else f"val_fraction {val_fraction} of {n} training image(s) rounds to none"
        )
        raise DataError(f"split 'val' of {root} has no images: {why}; use --split all, or add images")
    raise DataError(f"split {split!r} of {root} has no images ({n} training image(s) in train/)")


def _test_ground_truth(root: Path) -> dict[str, Any]:
    gt_path = root / TEST_GT_NAME
    if not gt_path.is_file():
        raise DataError(
            f"{root} has no {TEST_GT_NAME}: the test side has no ground truth (only synthetic sets ship one); "
            "evaluate on --split val instead"
        )
    try:
        gt = json.loads(gt_path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{gt_path}: not valid JSON ({str(exc).splitlines()[0][:120]})") from exc
    if not isinstance(gt, dict) or not {"images", "annotations"} <= set(gt):
        raise DataError(f"{gt_path}: not a COCO instances file (needs 'images' and 'annotations')")
    entries = {e.image_id: e for e in load_test_index(root)}
    for img in gt["images"]:
        entry = entries.get(img.get("id"))
        if entry is None:
            raise DataError(f"{gt_path}: image id {img.get('id')!r} is not in the test id map")
        if img.get("file_name") != entry.file_name:
            raise DataError(
                f"{gt_path}: image id {entry.image_id} is {img.get('file_name')!r} but the id map says {entry.file_name!r}"
            )
        img["path"] = f"test_release/{entry.file_name}"
    missing = sorted(set(entries) - {img["id"] for img in gt["images"]})
    if missing:
        raise DataError(
            f"{gt_path}: {len(missing)} test image(s) of the id map have no ground truth, e.g. id {missing[0]}"
        )
    gt.setdefault("categories", categories())
    return dict(gt)
