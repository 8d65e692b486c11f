"""Every defect on a damaged copy gives its own one-line message and a non-zero exit; the source is unchanged."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cellseg_deploy.cli.main import main
from cellseg_deploy.data.io import read_id_mask, write_id_mask_tif
from tests.data.helpers import first_sample, tree_hashes


def _first_mask(root: Path) -> Path:
    return sorted(first_sample(root).glob("class*.tif"))[0]


def _set_pixel(root: Path, value: float) -> None:
    f = _first_mask(root)
    ids = read_id_mask(f)
    ids[0, 0] = value
    write_id_mask_tif(f, ids)


def _remove_image(root: Path) -> None:
    (first_sample(root) / "image.tif").unlink()


def _truncate_image(root: Path) -> None:
    p = first_sample(root) / "image.tif"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _cut_header(root: Path) -> None:
    p = first_sample(root) / "image.tif"
    p.write_bytes(p.read_bytes()[:200])


def _corrupt_image(root: Path) -> None:
    p = first_sample(root) / "image.tif"
    data = bytearray(p.read_bytes())
    for i in range(len(data) // 3, 2 * len(data) // 3):
        data[i] ^= 0x5A
    p.write_bytes(bytes(data))


def _garbage_image(root: Path) -> None:
    (first_sample(root) / "image.tif").write_text("this is not a TIFF\n")


def _truncate_mask(root: Path) -> None:
    p = _first_mask(root)
    p.write_bytes(p.read_bytes()[: p.stat().st_size - 64])


def _wrong_shape(root: Path) -> None:
    write_id_mask_tif(first_sample(root) / "class1.tif", np.ones((5, 7)))


def _class5(root: Path) -> None:
    shutil.copy(_first_mask(root), first_sample(root) / "class5.tif")


def _class0(root: Path) -> None:
    shutil.copy(_first_mask(root), first_sample(root) / "class0.tif")


def _empty_train(root: Path) -> None:
    shutil.rmtree(root / "train")
    (root / "train").mkdir()


def _no_train(root: Path) -> None:
    shutil.rmtree(root / "train")


def _sample_without_image(root: Path) -> None:
    (root / "train" / "extra-sample").mkdir()


def _map_missing_file(root: Path) -> None:
    p = root / "test_image_name_to_ids.json"
    entries = json.loads(p.read_text())
    (root / "test_release" / entries[0]["file_name"]).unlink()


def _map_extra_file(root: Path) -> None:
    src = sorted((root / "test_release").iterdir())[0]
    shutil.copy(src, root / "test_release" / "unlisted.tif")


def _map_duplicate_id(root: Path) -> None:
    p = root / "test_image_name_to_ids.json"
    entries = json.loads(p.read_text())
    entries[1]["id"] = entries[0]["id"]
    p.write_text(json.dumps(entries))


def _map_wrong_size(root: Path) -> None:
    p = root / "test_image_name_to_ids.json"
    entries = json.loads(p.read_text())
    entries[0]["height"] += 1
    p.write_text(json.dumps(entries))


def _map_not_json(root: Path) -> None:
    (root / "test_image_name_to_ids.json").write_text("[{")


DEFECTS: dict[str, tuple[Callable[[Path], None], str]] = {
    "missing image": (_remove_image, "missing image.tif"),
    "sample folder without image": (_sample_without_image, "extra-sample/image.tif: missing image.tif"),
    "truncated tiff": (_truncate_image, "truncated TIFF"),
    "tiff cut in the header": (_cut_header, "cannot decode TIFF"),
    "corrupt tiff": (_corrupt_image, "cannot decode TIFF"),
    "unreadable image": (_garbage_image, "not a TIFF"),
    "truncated mask": (_truncate_mask, "truncated TIFF"),
    "mask shape": (_wrong_shape, "differs from image.tif"),
    "nan ids": (lambda r: _set_pixel(r, np.nan), "NaN"),
    "negative ids": (lambda r: _set_pixel(r, -4), "negative"),
    "non-integer ids": (lambda r: _set_pixel(r, 1.5), "non-integer"),
    "class 5": (_class5, "class5.tif: class file name outside class1..class4"),
    "class 0": (_class0, "class0.tif: class file name outside class1..class4"),
    "empty train": (_empty_train, "empty train folder"),
    "no train": (_no_train, "missing train/ folder"),
    "id map lists a missing file": (_map_missing_file, "which is not in"),
    "id map misses a file": (_map_extra_file, "unlisted.tif: image not listed"),
    "id map duplicate id": (_map_duplicate_id, "appears more than once"),
    "id map size": (_map_wrong_size, "but the map says"),
    "id map not json": (_map_not_json, "not valid JSON"),
}


@pytest.mark.parametrize("name", list(DEFECTS))
def test_defect(name: str, small_synth: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = tree_hashes(small_synth)
    copy = tmp_path / "copy"
    shutil.copytree(small_synth, copy)
    damage, expected = DEFECTS[name]
    damage(copy)
    damaged = tree_hashes(copy)
    assert main(["data", "check", str(copy), "--json", str(tmp_path / "report.json")]) == 1
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    defect_lines = [line for line in err if line.startswith("defect:")]
    assert len(defect_lines) == 1, captured.err
    assert expected in defect_lines[0] and str(copy) in defect_lines[0], defect_lines[0]
    assert err[-1].startswith("FAILED: 1 defect(s)")
    assert "Traceback" not in captured.err and "WARNING" not in captured.err
    assert "training images:" in captured.out  # statistics are printed even when defects are found
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ok"] is False and len(report["defects"]) == 1
    assert tree_hashes(small_synth) == before  # the source was never touched
    assert tree_hashes(copy) == damaged  # and check itself writes nothing


def test_several_defects_are_all_listed(
    small_synth: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(small_synth, copy)
    _class5(copy)
    _map_extra_file(copy)
    _set_pixel(copy, -1)
    assert main(["data", "check", str(copy)]) == 1
    defects = [line for line in capsys.readouterr().err.splitlines() if line.startswith("defect:")]
    assert len(defects) == 3


def test_missing_root_is_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "check", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
