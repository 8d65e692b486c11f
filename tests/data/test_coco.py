"""COCO conversion: RLEs decode back to exactly the instance masks; splits are deterministic and disjoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO

from cellseg_deploy.cli.main import main
from cellseg_deploy.data.coco import dataset_to_coco
from cellseg_deploy.data.layout import list_train_ids, load_sample, split_train_val
from cellseg_deploy.data.rle import decode_rle, encode_crop, encode_mask


def test_to_coco_round_trip(small_synth: Path, tmp_path: Path) -> None:
    out = tmp_path / "ann.json"
    assert main(["data", "to-coco", str(small_synth), "--out", str(out)]) == 0
    gt = json.loads(out.read_text())
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    for image in gt["images"]:
        sample = load_sample(small_synth, image["sample_id"])
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        assert len(anns) == len(sample.labels)
        for ann, mask, label in zip(anns, sample.masks, sample.labels, strict=True):
            assert np.array_equal(decode_rle(ann["segmentation"]), mask)
            assert ann["category_id"] == label and ann["area"] == mask.sum() and ann["iscrowd"] == 0
            assert isinstance(ann["segmentation"]["counts"], str)


def test_real_sample_round_trip(hw3_sample: Path) -> None:
    gt = dataset_to_coco(hw3_sample)
    sample = load_sample(hw3_sample, "sample-0001")
    assert len(gt["annotations"]) == 161
    for ann, mask in zip(gt["annotations"], sample.masks, strict=True):
        assert np.array_equal(decode_rle(ann["segmentation"]), mask)


def test_split_is_deterministic(small_synth: Path) -> None:
    ids = list_train_ids(small_synth)
    train, val = split_train_val(ids, 0.25, seed=1)
    assert split_train_val(list(reversed(ids)), 0.25, seed=1) == (train, val)
    assert set(train).isdisjoint(val) and sorted(train + val) == sorted(ids) and len(val) == 1
    tv = dataset_to_coco(small_synth, "val", val_fraction=0.25, seed=1)
    assert [im["sample_id"] for im in tv["images"]] == val


def test_encode_crop_equals_full_encoding() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        ch, cw = int(rng.integers(0, h + 1)), int(rng.integers(0, w + 1))
        y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = rng.random((ch, cw)) < 0.5
        full = np.zeros((h, w), bool)
        full[y0 : y0 + ch, x0 : x0 + cw] = crop
        assert encode_crop(crop, x0, y0, (h, w)) == encode_mask(full)
