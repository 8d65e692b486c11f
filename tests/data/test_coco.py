"""COCO conversion: RLEs decode back to exactly the instance masks; splits are deterministic and disjoint."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cellseg_deploy.cli.main import main
from cellseg_deploy.data.coco import dataset_to_coco, sample_id_of, samples_to_coco, train_image_ids
from cellseg_deploy.data.io import write_id_mask_tif, write_image_tif
from cellseg_deploy.data.layout import list_train_ids, load_sample, load_test_index, split_train_val
from cellseg_deploy.data.rle import decode_rle
from cellseg_deploy.errors import ConfigError, DataError


def _coco(gt: dict[str, object]) -> COCO:
    coco = COCO()
    coco.dataset = gt
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def test_to_coco_round_trip(small_synth: Path, tmp_path: Path) -> None:
    out = tmp_path / "ann.json"
    assert main(["data", "to-coco", str(small_synth), "--out", str(out)]) == 0
    gt = json.loads(out.read_text())
    coco = _coco(gt)
    ids = train_image_ids(small_synth)
    assert [im["id"] for im in gt["images"]] == [ids[sid] for sid in list_train_ids(small_synth)]
    assert [c["name"] for c in gt["categories"]] == ["class1", "class2", "class3", "class4"]
    assert [a["id"] for a in gt["annotations"]] == list(range(1, len(gt["annotations"]) + 1))
    for image in gt["images"]:
        sid = sample_id_of(image)
        assert image["file_name"] == f"{sid}/image.tif"
        sample = load_sample(small_synth, sid)
        assert (image["height"], image["width"]) == sample.image.shape[:2]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        assert len(anns) == len(sample.labels)
        for ann, mask, label, box in zip(anns, sample.masks, sample.labels, sample.boxes, strict=True):
            assert np.array_equal(decode_rle(ann["segmentation"]), mask)
            assert np.array_equal(coco.annToMask(ann).astype(bool), mask)
            assert ann["category_id"] == label and ann["area"] == mask.sum() and ann["iscrowd"] == 0
            assert ann["bbox"] == [box[0], box[1], box[2] - box[0], box[3] - box[1]]
            assert isinstance(ann["segmentation"]["counts"], str)


def test_ground_truth_scores_itself_perfectly(small_synth: Path) -> None:
    gt = dataset_to_coco(small_synth)
    coco = _coco(gt)
    dets = [{**a, "score": 1.0} for a in gt["annotations"]]
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco, coco.loadRes(dets), "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[1] == pytest.approx(1.0)  # AP50


def test_touching_cells_with_ids_above_255_round_trip(tmp_path: Path) -> None:
    folder = tmp_path / "train" / "s1"
    folder.mkdir(parents=True)
    write_image_tif(folder / "image.tif", np.full((12, 14, 3), 200, np.uint8))
    ids = np.zeros((12, 14))
    ids[2:6, 2:5], ids[2:6, 5:8], ids[9:11, 1:13] = 256.0, 257.0, 4000.0  # 256/257 touch
    write_id_mask_tif(folder / "class3.tif", ids)
    gt = dataset_to_coco(tmp_path)
    sample = load_sample(tmp_path, "s1")
    assert sample.instance_ids.tolist() == [256, 257, 4000] and sample.labels.tolist() == [3, 3, 3]
    masks = [decode_rle(a["segmentation"]) for a in gt["annotations"]]
    assert [m.sum() for m in masks] == [12, 12, 24]
    for m, value in zip(masks, [256, 257, 4000], strict=True):
        assert np.array_equal(m, ids == value)


def test_real_sample_round_trip(hw3_sample: Path) -> None:
    gt = dataset_to_coco(hw3_sample)
    sample = load_sample(hw3_sample, "sample-0001")
    assert len(gt["annotations"]) == 161 and gt["images"][0]["sample_id"] == "sample-0001"
    for ann, mask in zip(gt["annotations"], sample.masks, strict=True):
        assert np.array_equal(decode_rle(ann["segmentation"]), mask)


def test_split_is_deterministic(small_synth: Path) -> None:
    ids = list_train_ids(small_synth)
    train, val = split_train_val(ids, 0.25, seed=1)
    assert split_train_val(list(reversed(ids)), 0.25, seed=1) == (train, val)
    assert set(train).isdisjoint(val) and sorted(train + val) == sorted(ids) and len(val) == 1
    assert split_train_val(ids, 0.01, seed=1)[1] != []  # at least one validation image
    assert split_train_val(ids, 0.0) == (ids, [])
    tv = dataset_to_coco(small_synth, "val", val_fraction=0.25, seed=1)
    assert [im["sample_id"] for im in tv["images"]] == val
    all_ids = {im["sample_id"]: im["id"] for im in dataset_to_coco(small_synth)["images"]}
    assert all(all_ids[im["sample_id"]] == im["id"] for im in tv["images"])  # same image id in every split
    with pytest.raises(ConfigError):
        split_train_val(ids, 1.0)


def test_test_split_uses_the_id_map(small_synth: Path, tmp_path: Path) -> None:
    out = tmp_path / "test.json"
    assert main(["data", "to-coco", str(small_synth), "--out", str(out), "--split", "test"]) == 0
    gt = json.loads(out.read_text())
    assert {im["id"]: im["file_name"] for im in gt["images"]} == {
        e.image_id: e.file_name for e in load_test_index(small_synth)
    }
    with pytest.raises(DataError):
        sample_id_of(gt["images"][0])


def test_test_split_without_ground_truth_is_a_user_error(
    hw3_sample: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["data", "to-coco", str(hw3_sample), "--out", "/nonexistent/x.json", "--split", "test"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "test_ground_truth.json" in err[0]


def test_samples_to_coco_default_ids(small_synth: Path) -> None:
    samples = [load_sample(small_synth, sid) for sid in list_train_ids(small_synth)[:2]]
    gt = samples_to_coco(samples)
    assert [im["id"] for im in gt["images"]] == [1, 2]
