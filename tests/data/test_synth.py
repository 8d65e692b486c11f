"""Synthetic data: byte-identical for a seed, the real file formats, realistic extremes, accepted by check."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from cellseg_deploy.cli.main import main
from cellseg_deploy.data.check import check_dataset
from cellseg_deploy.data.coco import dataset_to_coco
from cellseg_deploy.data.io import read_id_mask
from cellseg_deploy.data.layout import instances_from_id_mask, list_train_ids, load_sample, load_test_index
from cellseg_deploy.data.rle import decode_rle
from cellseg_deploy.data.synth import SynthConfig, make_synthetic_dataset
from cellseg_deploy.errors import ConfigError, DataError
from tests.data.helpers import tree_hashes

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    config = SynthConfig(n_train=3, n_test=2, min_size=40, max_size=90, min_cells=5, max_cells=30, seed=11)
    make_synthetic_dataset(tmp_path / "a", config, progress=False)
    make_synthetic_dataset(tmp_path / "b", config, progress=False)
    ha, hb = tree_hashes(tmp_path / "a"), tree_hashes(tmp_path / "b")
    assert ha == hb and len(ha) >= 3 * 2 + 2 + 2
    assert list_train_ids(tmp_path / "a") == list_train_ids(tmp_path / "b")
    assert all(UUID.match(sid) for sid in list_train_ids(tmp_path / "a"))
    # the same config into the same folder again rewrites the same bytes
    make_synthetic_dataset(tmp_path / "a", config, progress=False)
    assert tree_hashes(tmp_path / "a") == ha
    other = SynthConfig(n_train=3, n_test=2, min_size=40, max_size=90, min_cells=5, max_cells=30, seed=12)
    make_synthetic_dataset(tmp_path / "c", other, progress=False)
    assert tree_hashes(tmp_path / "c") != ha
    # another config into a folder holding a dataset would mix two sets: refused, nothing written
    with pytest.raises(DataError, match="already holds"):
        make_synthetic_dataset(tmp_path / "a", other, progress=False)
    assert tree_hashes(tmp_path / "a") == ha


def test_real_formats(small_synth: Path) -> None:
    present: set[int] = set()
    for sid in list_train_ids(small_synth):
        folder = small_synth / "train" / sid
        with tifffile.TiffFile(folder / "image.tif") as tif:
            page = tif.pages[0]
            assert page.compression == tifffile.COMPRESSION.LZW
            rgba = page.asarray()
        assert (
            rgba.dtype == np.uint8 and rgba.ndim == 3 and rgba.shape[2] == 4 and (rgba[:, :, 3] == 255).all()
        )
        class_files = sorted(folder.glob("class*.tif"))
        assert class_files, "every image has cells"
        assert {p.name for p in folder.iterdir()} == {"image.tif"} | {p.name for p in class_files}
        for f in class_files:
            present.add(int(f.stem[5:]))
            with tifffile.TiffFile(f) as tif:
                assert tif.pages[0].compression == tifffile.COMPRESSION.NONE
                ids = tif.pages[0].asarray()
            assert ids.dtype == np.float64 and ids.shape == rgba.shape[:2]
            assert np.count_nonzero(np.unique(ids)) > 0  # only classes present are written
    assert present == {1, 2, 3, 4}
    entries = load_test_index(small_synth, check_sizes=True)
    assert [e.image_id for e in entries] == [1, 2]
    assert all(UUID.match(e.file_name[:-4]) and e.file_name.endswith(".tif") for e in entries)
    gt = json.loads((small_synth / "test_ground_truth.json").read_text())
    assert [(im["id"], im["file_name"]) for im in gt["images"]] == [
        (e.image_id, e.file_name) for e in entries
    ]
    assert gt["annotations"] and {c["id"] for c in gt["categories"]} == {1, 2, 3, 4}


def test_test_ground_truth_matches_the_test_images(small_synth: Path) -> None:
    gt = dataset_to_coco(small_synth, "test")
    for image in gt["images"]:
        assert image["path"] == f"test_release/{image['file_name']}"
        h, w = tifffile.imread(small_synth / image["path"]).shape[:2]
        assert (image["height"], image["width"]) == (h, w)
        masks = [decode_rle(a["segmentation"]) for a in gt["annotations"] if a["image_id"] == image["id"]]
        assert masks and all(m.shape == (h, w) and m.sum() >= 12 for m in masks)
        union = np.sum(masks, axis=0)
        assert union.max() == 1  # the visible parts of occluding cells do not overlap


def test_extremes_cover_the_real_range(extremes_synth: Path) -> None:
    report = check_dataset(extremes_synth, progress=False)
    assert report.defects == []
    stats = report.stats
    assert stats["height"][0] <= 45 and max(stats["height"][1], stats["width"][1]) > 1000
    assert stats["max_id"] > 255 and stats["max_instances"] >= 300 and stats["n_train"] == 4


def test_dense_image_ids_are_sparse_touching_and_above_255(extremes_synth: Path) -> None:
    folders = [extremes_synth / "train" / sid for sid in list_train_ids(extremes_synth)]
    # the dense extreme image: 420 x 460 px (the large one is 1100 x 1300)
    dense = next(f for f in folders if tifffile.TiffFile(f / "image.tif").pages[0].shape[:2] == (420, 460))
    blobs = instances = highest = 0
    for f in sorted(dense.glob("class*.tif")):
        ids = read_id_mask(f)
        masks, _, values = instances_from_id_mask(ids)
        assert len(values) == np.count_nonzero(np.unique(ids)) >= 100
        assert (np.diff(values) > 1).any()  # sparse, non-contiguous IDs
        assert np.array_equal(masks[-1], ids == values[-1])  # the highest ID keeps exactly its pixels
        blobs += ndimage.label(ids > 0)[1]
        instances += len(values)
        highest = max(highest, int(values.max()))
    assert highest > 255
    assert blobs < instances  # touching instances: fewer connected blobs than instances, all kept apart


def test_zero_instance_images_are_allowed(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    make_synthetic_dataset(
        root,
        SynthConfig(n_train=2, n_test=1, min_size=32, max_size=40, min_cells=0, max_cells=0),
        progress=False,
    )
    sid = list_train_ids(root)[0]
    assert [p.name for p in (root / "train" / sid).iterdir()] == ["image.tif"]
    sample = load_sample(root, sid)
    assert sample.masks.shape == (0, *sample.image.shape[:2]) and sample.boxes.shape == (0, 4)
    assert check_dataset(root, progress=False).stats["images_without_instances"] == 2
    assert dataset_to_coco(root)["annotations"] == [] and dataset_to_coco(root, "test")["annotations"] == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_train": -1},
        {"n_train": 0, "n_test": 0},
        {"min_size": 300, "max_size": 200},
        {"min_cells": 9, "max_cells": 3},
    ],
)
def test_bad_config(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        SynthConfig(**kwargs)


def test_synth_cli_and_check_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, js = tmp_path / "ds", tmp_path / "synth.json"
    args = ["data", "synth", str(out), "--train", "2", "--test", "1", "--min-size", "40", "--max-size", "64"]
    assert main([*args, "--seed", "4", "--json", str(js)]) == 0
    summary = json.loads(js.read_text())
    assert summary["n_train"] == 2 and summary["n_test"] == 1 and summary["config"]["seed"] == 4
    capsys.readouterr()
    assert main(["data", "check", str(out), "--json", str(tmp_path / "check.json")]) == 0
    text = capsys.readouterr().out
    assert (
        "training images: 2" in text
        and "test images: 1" in text
        and "instances per class" in text
        and "OK" in text
    )
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["ok"] and report["stats"]["n_train"] == 2
    assert main([*args, "--seed", "5"]) == 2  # a folder holding files: refused without --overwrite
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds files already" in err[0] and "--overwrite" in err[0]
    assert main([*args, "--seed", "5", "--overwrite"]) == 2  # ... and another dataset never mixes in
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "(--overwrite)" in err[0]
    assert "already holds" in err[1] and "another dataset" in err[1]
    assert main([*args, "--seed", "4", "--overwrite"]) == 0  # the same set again: the same files
    assert main(["data", "synth", str(tmp_path / "x"), "--train", "0", "--test", "0"]) == 2
