"""Every defect on a damaged copy gives its own one-line message and a non-zero exit; the source is unchanged."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cellseg_deploy.cli.main import main
from cellseg_deploy.data.io import write_id_mask_tif
from tests.data.test_synth import tree_hashes


def first_sample(root: Path) -> Path:
    return sorted(p for p in (root / "train").iterdir() if p.is_dir())[0]


def _remove_image(root: Path) -> None:
    (first_sample(root) / "image.tif").unlink()


def _truncate_image(root: Path) -> None:
    p = first_sample(root) / "image.tif"
    p.write_bytes(p.read_bytes()[:200])


def _wrong_shape(root: Path) -> None:
    write_id_mask_tif(first_sample(root) / "class1.tif", np.ones((5, 7)))


def _nan_ids(root: Path) -> None:
    f = sorted(first_sample(root).glob("class*.tif"))[0]
    from cellseg_deploy.data.io import read_id_mask

    ids = read_id_mask(f)
    ids[0, 0] = np.nan
    write_id_mask_tif(f, ids)


def _negative_ids(root: Path) -> None:
    f = sorted(first_sample(root).glob("class*.tif"))[0]
    from cellseg_deploy.data.io import read_id_mask

    ids = read_id_mask(f)
    ids[0, 0] = -4
    write_id_mask_tif(f, ids)


def _fractional_ids(root: Path) -> None:
    f = sorted(first_sample(root).glob("class*.tif"))[0]
    from cellseg_deploy.data.io import read_id_mask

    ids = read_id_mask(f)
    ids[0, 0] = 1.5
    write_id_mask_tif(f, ids)


def _class5(root: Path) -> None:
    shutil.copy(sorted(first_sample(root).glob("class*.tif"))[0], first_sample(root) / "class5.tif")


def _empty_train(root: Path) -> None:
    shutil.rmtree(root / "train")
    (root / "train").mkdir()


def _map_mismatch(root: Path) -> None:
    p = root / "test_image_name_to_ids.json"
    entries = json.loads(p.read_text())
    entries[0]["file_name"] = "missing.tif"
    p.write_text(json.dumps(entries))


def _map_wrong_size(root: Path) -> None:
    p = root / "test_image_name_to_ids.json"
    entries = json.loads(p.read_text())
    entries[0]["height"] += 1
    p.write_text(json.dumps(entries))


DEFECTS: dict[str, tuple[Callable[[Path], None], str]] = {
    "missing image": (_remove_image, "missing image.tif"),
    "truncated tiff": (_truncate_image, "cannot decode TIFF"),
    "mask shape": (_wrong_shape, "differs from image.tif"),
    "nan ids": (_nan_ids, "NaN"),
    "negative ids": (_negative_ids, "negative"),
    "non-integer ids": (_fractional_ids, "non-integer"),
    "class outside 1..4": (_class5, "class 5 is outside 1..4"),
    "empty train": (_empty_train, "empty train folder"),
    "id map files": (_map_mismatch, "missing.tif"),
    "id map size": (_map_wrong_size, "but the map says"),
}


@pytest.mark.parametrize("name", list(DEFECTS))
def test_defect(name: str, small_synth: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = tree_hashes(small_synth)
    copy = tmp_path / "copy"
    shutil.copytree(small_synth, copy)
    damage, expected = DEFECTS[name]
    damage(copy)
    assert main(["data", "check", str(copy)]) == 1
    err = capsys.readouterr().err
    defect_lines = [line for line in err.splitlines() if line.startswith("defect:")]
    assert len(defect_lines) == 1, err
    assert expected in defect_lines[0] and str(copy) in defect_lines[0]
    assert "Traceback" not in err
    assert tree_hashes(small_synth) == before


def test_missing_root_is_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "check", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
