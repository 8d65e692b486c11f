"""The training dataset: torchvision targets from the layout, seeded augmentation, validation ground truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cellseg_deploy.data.coco import dataset_to_coco
from cellseg_deploy.data.layout import list_train_ids, load_sample
from cellseg_deploy.training.augment import boxes_from_masks
from cellseg_deploy.training.dataset import InstanceDataset, collate, validation_ground_truth
from cellseg_deploy.training.recipe import AugmentSettings, DataSettings


def test_plain_items_are_the_samples_as_torchvision_wants_them(small_data: Path) -> None:
    ids = list_train_ids(small_data)[:3]
    ds = InstanceDataset(small_data, ids)
    for i, sid in enumerate(ids):
        image, target = ds[i]
        sample = load_sample(small_data, sid)
        assert image.dtype == torch.uint8 and image.shape == (3, *sample.image.shape[:2])
        np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), sample.image)
        assert target["masks"].dtype == torch.uint8 and target["labels"].dtype == torch.int64
        assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (len(sample.labels), 4)
        np.testing.assert_array_equal(target["masks"].numpy().astype(bool), sample.masks)
        np.testing.assert_array_equal(target["labels"].numpy(), sample.labels)
        np.testing.assert_array_equal(target["boxes"].numpy(), sample.boxes)
    images, targets = collate([ds[0], ds[1]])
    assert len(images) == len(targets) == 2


def test_augmented_items_depend_only_on_seed_epoch_and_index(small_data: Path) -> None:
    ids = list_train_ids(small_data)[:2]
    settings = AugmentSettings(scale_range=(0.8, 1.2), brightness=0.2, stain=0.05)
    a = InstanceDataset(small_data, ids, augment=settings, seed=5)
    b = InstanceDataset(small_data, ids, augment=settings, seed=5, cache=False)
    b[1]  # a different history must not matter
    for epoch in (0, 3):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        ia, ta = a[0]
        ib, tb = b[0]
        assert (
            torch.equal(ia, ib)
            and torch.equal(ta["masks"], tb["masks"])
            and torch.equal(ta["boxes"], tb["boxes"])
        )
        np.testing.assert_array_equal(ta["boxes"].numpy(), boxes_from_masks(ta["masks"].numpy()))
    a.set_epoch(0)
    first = a[0][0]
    a.set_epoch(1)
    assert not torch.equal(first, a[0][0]), "a new epoch draws new augmentations"


def test_validation_ground_truth_is_what_eval_scores(small_data: Path) -> None:
    _, val = InstanceDataset.split(small_data, DataSettings(), augment=AugmentSettings(), seed=0)
    gt = validation_ground_truth(val)
    assert gt == dataset_to_coco(small_data, "val", val_fraction=0.2, seed=0)
    assert [im["sample_id"] for im in gt["images"]] == val.ids
