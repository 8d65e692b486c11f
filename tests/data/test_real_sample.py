"""The real competition sample reads exactly: instance counts per class and masks equal to the ID regions."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cellseg_deploy.data.io import read_id_mask
from cellseg_deploy.data.layout import list_train_ids, load_sample


def test_real_sample_instances(hw3_sample: Path) -> None:
    ids = list_train_ids(hw3_sample)
    assert ids == ["sample-0001"]
    sample = load_sample(hw3_sample, "sample-0001")
    assert sample.image.dtype == np.uint8 and sample.image.shape == (397, 482, 3)
    assert int((sample.labels == 1).sum()) == 2
    assert int((sample.labels == 2).sum()) == 159
    for k in (1, 2):
        id_mask = read_id_mask(hw3_sample / "train" / "sample-0001" / f"class{k}.tif")
        for i in np.flatnonzero(sample.labels == k):
            assert np.array_equal(sample.masks[i], id_mask == sample.instance_ids[i])
    # Touching cells: fewer connected blobs than instances, yet every instance kept separately.
    assert len(np.unique(sample.instance_ids[sample.labels == 2])) == 159


def test_boxes_are_tight_and_exclusive(hw3_sample: Path) -> None:
    sample = load_sample(hw3_sample, "sample-0001")
    for mask, box in zip(sample.masks[:20], sample.boxes[:20], strict=True):
        ys, xs = np.nonzero(mask)
        assert tuple(box) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
