"""The real competition sample reads exactly: instance counts per class and masks equal to the ID regions.

Uses ``../shared/fixtures/hw3-sample`` beside the repository (or ``$CELLSEG_SHARED``); skipped with the reason
when it is absent (fixture ``hw3_sample`` in ``tests/conftest.py``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage

from cellseg_deploy.data.check import check_dataset
from cellseg_deploy.data.io import read_id_mask, read_image
from cellseg_deploy.data.layout import list_train_ids, load_sample


def test_real_sample_instances(hw3_sample: Path) -> None:
    ids = list_train_ids(hw3_sample)
    assert ids == ["sample-0001"]
    sample = load_sample(hw3_sample, "sample-0001")
    assert sample.image.dtype == np.uint8 and sample.image.shape == (397, 482, 3)
    assert int((sample.labels == 1).sum()) == 2
    assert int((sample.labels == 2).sum()) == 159
    assert sample.masks.shape == (161, 397, 482) and sample.masks.dtype == bool
    for k in (1, 2):
        id_mask = read_id_mask(hw3_sample / "train" / "sample-0001" / f"class{k}.tif")
        values = sample.instance_ids[sample.labels == k]
        assert values.tolist() == sorted(values.tolist())  # ordered by class, then ID
        for i in np.flatnonzero(sample.labels == k):
            assert np.array_equal(sample.masks[i], id_mask == sample.instance_ids[i])
    # Touching cells: fewer connected blobs than instances, yet every instance kept separately.
    class2 = read_id_mask(hw3_sample / "train" / "sample-0001" / "class2.tif") > 0
    assert ndimage.label(class2)[1] < 159


def test_real_image_is_rgb_in_file_order(hw3_sample: Path) -> None:
    path = hw3_sample / "train" / "sample-0001" / "image.tif"
    rgba = tifffile.imread(path)
    assert rgba.shape[2] == 4 and (rgba[:, :, 3] == 255).all()
    assert np.array_equal(read_image(path), rgba[:, :, :3])


def test_boxes_are_tight_and_exclusive(hw3_sample: Path) -> None:
    sample = load_sample(hw3_sample, "sample-0001")
    assert sample.boxes.dtype == np.float32 and sample.boxes.shape == (161, 4)
    for mask, box in zip(sample.masks, sample.boxes, strict=True):
        ys, xs = np.nonzero(mask)
        assert tuple(box) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_check_accepts_the_real_sample(hw3_sample: Path) -> None:
    report = check_dataset(hw3_sample, progress=False)
    assert report.defects == []
    assert report.stats["n_train"] == 1 and report.stats["n_test"] == 0
    assert report.stats["instances_per_class"] == {"class1": 2, "class2": 159, "class3": 0, "class4": 0}
    assert report.stats["max_instances"] == 161 and report.stats["height"] == [397, 397]
