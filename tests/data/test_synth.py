"""Synthetic data: byte-identical for a seed, the real file formats, realistic extremes, accepted by check."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import tifffile

from cellseg_deploy.cli.main import main
from cellseg_deploy.data.layout import list_train_ids, load_sample, load_test_index
from cellseg_deploy.data.synth import SynthConfig, make_synthetic_dataset


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    config = SynthConfig(n_train=3, n_test=2, min_size=40, max_size=90, seed=11)
    make_synthetic_dataset(tmp_path / "a", config, progress=False)
    make_synthetic_dataset(tmp_path / "b", config, progress=False)
    ha, hb = tree_hashes(tmp_path / "a"), tree_hashes(tmp_path / "b")
    assert ha == hb and len(ha) >= 3 + 2 + 2
    make_synthetic_dataset(tmp_path / "c", SynthConfig(n_train=3, n_test=2, min_size=40, max_size=90, seed=12), progress=False)
    assert tree_hashes(tmp_path / "c") != ha


def test_real_formats(small_synth: Path) -> None:
    for sid in list_train_ids(small_synth):
        folder = small_synth / "train" / sid
        page = tifffile.TiffFile(folder / "image.tif").pages[0]
        assert page.compression == tifffile.COMPRESSION.LZW
        rgba = tifffile.imread(folder / "image.tif")
        assert rgba.dtype == np.uint8 and rgba.ndim == 3 and rgba.shape[2] == 4 and (rgba[:, :, 3] == 255).all()
        class_files = sorted(folder.glob("class*.tif"))
        assert class_files, "every image has cells"
        for f in class_files:
            ids = tifffile.imread(f)
            assert ids.dtype == np.float64 and ids.shape == rgba.shape[:2]
            assert tifffile.TiffFile(f).pages[0].compression == tifffile.COMPRESSION.NONE
            assert (np.unique(ids) != 0).sum() > 0  # only classes present are written
    entries = load_test_index(small_synth)
    assert [e.image_id for e in entries] == [1, 2]
    gt = json.loads((small_synth / "test_ground_truth.json").read_text())
    assert {im["id"] for im in gt["images"]} == {1, 2} and gt["annotations"]


def test_extremes_cover_the_real_range(tmp_path: Path) -> None:
    summary = make_synthetic_dataset(tmp_path, SynthConfig(n_train=0, n_test=1, min_size=40, max_size=50, extremes=True),
                                     progress=False)
    sizes = [load_sample(tmp_path, sid).image_size for sid in list_train_ids(tmp_path)]
    assert min(min(s) for s in sizes) <= 45 and max(max(s) for s in sizes) > 1000
    assert summary.max_id > 255 and summary.max_instances >= 300
    # IDs are sparse (gaps) and touching cells exist: more instances than connected blobs somewhere.
    dense = max((load_sample(tmp_path, sid) for sid in list_train_ids(tmp_path)), key=lambda s: len(s.labels))
    ids = np.sort(dense.instance_ids[dense.labels == 2])
    assert (np.diff(ids) > 1).any()


def test_check_accepts_synthetic(small_synth: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["data", "check", str(small_synth)]) == 0
    out = capsys.readouterr().out
    assert "training images: 4" in out and "instances per class" in out and "OK" in out
