"""A torch ``Dataset`` over the competition layout's training samples, and its collate function.

Samples come from :mod:`cellseg_deploy.data.layout` (``load_sample``); each item is what torchvision's
Mask R-CNN takes in training mode:

- image: uint8 ``[3, H, W]`` RGB (the loop divides by 255 on the device, exactly as inference does);
- target: ``boxes`` float32 ``[N, 4]`` ``x1, y1, x2, y2`` (pixels, exclusive right/bottom edges),
  ``labels`` int64 ``[N]`` in 1..K, ``masks`` uint8 ``[N, H, W]``, ``image_id`` int64 ``[]``.

Decoded samples are cached in memory in a compact form (the image plus each instance's mask cropped to its
box), so memory grows with the cell area, not with cells x image area. Augmentation draws from a generator
seeded with ``(seed, epoch, index)``: an item is a pure function of its position in the run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from cellseg_deploy.errors import DataError
from cellseg_deploy.training.augment import Target, augment, boxes_from_masks
from cellseg_deploy.training.recipe import AugmentSettings, DataSettings


@dataclass
class CompactSample:
    """One decoded sample, stored compactly.

    Attributes:
        sample_id: the ``train/<id>`` folder name.
        image: uint8 ``[H, W, 3]`` RGB.
        labels: int64 ``[N]``.
        boxes: int64 ``[N, 4]`` tight ``x1, y1, x2, y2`` (exclusive right/bottom).
        crops: ``N`` bool masks, each ``[y2 - y1, x2 - x1]`` (the instance inside its box).
    """

    sample_id: str
    image: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray
    crops: list[np.ndarray]

    @classmethod
    def from_masks(
        cls, sample_id: str, image: np.ndarray, masks: np.ndarray, labels: np.ndarray
    ) -> CompactSample:
        """From dense masks ``[N, H, W]`` (empty masks are dropped)."""
        masks = np.asarray(masks)
        boxes = boxes_from_masks(masks).astype(np.int64)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        crops = [masks[i, b[1] : b[3], b[0] : b[2]].astype(bool) for i, b in enumerate(boxes) if keep[i]]
        return cls(
            sample_id, np.ascontiguousarray(image), np.asarray(labels, np.int64)[keep], boxes[keep], crops
        )

    def target(self) -> Target:
        """Dense masks ``[N, H, W]`` and boxes at the image's size."""
        h, w = self.image.shape[:2]
        masks = np.zeros((len(self.crops), h, w), np.uint8)
        for i, (crop, b) in enumerate(zip(self.crops, self.boxes, strict=True)):
            masks[i, b[1] : b[3], b[0] : b[2]] = crop
        return Target(masks, self.boxes.astype(np.float32), self.labels.copy())


def load_compact(root: Path, sample_id: str) -> CompactSample:
    """Read ``<root>/train/<sample_id>`` through :func:`cellseg_deploy.data.layout.load_sample`."""
    from cellseg_deploy.data.layout import load_sample

    sample = load_sample(root, sample_id)
    return CompactSample.from_masks(sample_id, sample.image, sample.masks, sample.labels)


class InstanceDataset(Dataset[tuple[torch.Tensor, dict[str, torch.Tensor]]]):
    """Training (augmented) or validation (plain) samples of one dataset.

    Args:
        root: the dataset root (``<root>/train/<id>/...``).
        ids: sample ids (folder names under ``train/``), in a fixed order.
        augment: augmentation settings, or None for none (validation).
        seed: the recipe's seed (augmentation draws depend on it, the epoch and the index).
        cache: keep decoded samples in memory.
    """

    def __init__(
        self,
        root: Path,
        ids: Sequence[str],
        *,
        augment: AugmentSettings | None = None,
        seed: int = 0,
        cache: bool = True,
    ) -> None:
        self.root = Path(root)
        self.ids = list(ids)
        self.augment = augment
        self.seed = seed
        self.cache = cache
        self.epoch = 0
        self._cache: dict[int, CompactSample] = {}

    @classmethod
    def split(
        cls,
        root: Path,
        settings: DataSettings,
        *,
        augment: AugmentSettings,
        seed: int,
    ) -> tuple[InstanceDataset, InstanceDataset]:
        """The training (augmented) and validation (plain) datasets of ``root`` per ``settings``."""
        from cellseg_deploy.data.layout import list_train_ids, split_train_val

        ids = list_train_ids(root)
        if len(ids) < 2:
            raise DataError(
                f"{root}/train holds {len(ids)} sample(s); training needs at least 2 (1 to validate)"
            )
        train_ids, val_ids = split_train_val(ids, settings.val_fraction, seed=settings.split_seed)
        if settings.max_train_images:
            train_ids = train_ids[: settings.max_train_images]
        if settings.max_val_images:
            val_ids = val_ids[: settings.max_val_images]
        return (
            cls(root, train_ids, augment=augment, seed=seed, cache=settings.cache),
            cls(root, val_ids, augment=None, seed=seed, cache=settings.cache),
        )

    def __len__(self) -> int:
        return len(self.ids)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation draws :meth:`__getitem__` makes."""
        self.epoch = epoch

    def compact(self, index: int) -> CompactSample:
        """The decoded sample ``index`` (cached when ``cache``)."""
        sample = self._cache.get(index)
        if sample is None:
            sample = load_compact(self.root, self.ids[index])
            if self.cache:
                self._cache[index] = sample
        return sample

    def image(self, index: int) -> np.ndarray:
        """The un-augmented image, uint8 ``[H, W, 3]``."""
        return self.compact(index).image

    def arrays(self, index: int) -> tuple[np.ndarray, Target]:
        """Image uint8 ``[H, W, 3]`` and instances after augmentation (training) or as stored (validation)."""
        sample = self.compact(index)
        image, target = sample.image, sample.target()
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            image, target = augment(image, target, self.augment, rng)
        return image, target

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image, target = self.arrays(index)
        h, w = image.shape[:2]
        return (
            torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            {
                "boxes": torch.from_numpy(target.boxes.astype(np.float32).reshape(-1, 4)),
                "labels": torch.from_numpy(target.labels.astype(np.int64)),
                "masks": torch.from_numpy(target.masks.astype(np.uint8).reshape(-1, h, w)),
                "image_id": torch.tensor(index, dtype=torch.int64),
            },
        )


def collate(
    batch: list[tuple[torch.Tensor, dict[str, torch.Tensor]]],
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Lists of images and targets (torchvision batches images of different sizes itself)."""
    return [b[0] for b in batch], [b[1] for b in batch]


def validation_ground_truth(dataset: InstanceDataset) -> dict[str, Any]:
    """The COCO ground truth of ``dataset``'s samples, in the dataset's order.

    Built by :func:`cellseg_deploy.data.coco.samples_to_coco` with the image ids of
    :func:`~cellseg_deploy.data.coco.train_image_ids` (a sample's index among all training folders): for the
    full validation split this is exactly what ``cellseg-deploy eval --split val`` scores against.
    """
    from cellseg_deploy.data.coco import iter_samples, samples_to_coco, train_image_ids

    return samples_to_coco(iter_samples(dataset.root, dataset.ids), image_ids=train_image_ids(dataset.root))
