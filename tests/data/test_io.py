"""Image and ID-mask reading: conversions of every accepted layout, and one-line errors for bad files."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from cellseg_deploy.data.io import read_id_mask, read_image, write_id_mask_tif, write_image_tif
from cellseg_deploy.data.layout import instances_from_id_mask
from cellseg_deploy.errors import DataError

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (21, 34, 3), dtype=np.uint8)


def test_rgba_lzw_round_trip(tmp_path: Path) -> None:
    write_image_tif(tmp_path / "a.tif", RGB)
    page = tifffile.TiffFile(tmp_path / "a.tif").pages[0]
    assert page.compression == tifffile.COMPRESSION.LZW and page.shape == (21, 34, 4)
    assert np.array_equal(read_image(tmp_path / "a.tif"), RGB)


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (RGB[:, :, 0], np.repeat(RGB[:, :, :1], 3, axis=2)),  # grayscale
        (RGB.astype(np.uint16) * 257, RGB),  # 16-bit
        (RGB, RGB),  # 3-channel
    ],
    ids=["gray", "16bit", "rgb"],
)
def test_tiff_conversions(tmp_path: Path, array: np.ndarray, expected: np.ndarray) -> None:
    tifffile.imwrite(tmp_path / "x.tif", array)
    out = read_image(tmp_path / "x.tif")
    assert out.dtype == np.uint8 and out.shape == (21, 34, 3)
    assert np.array_equal(out, expected)


def test_png_is_rgb(tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "x.png"), cv2.cvtColor(RGB, cv2.COLOR_RGB2BGR))
    assert np.array_equal(read_image(tmp_path / "x.png"), RGB)


def test_truncated_tiff_is_one_line_error(tmp_path: Path) -> None:
    write_image_tif(tmp_path / "a.tif", RGB)
    data = (tmp_path / "a.tif").read_bytes()
    (tmp_path / "b.tif").write_bytes(data[: len(data) // 3])
    with pytest.raises(DataError) as err:
        read_image(tmp_path / "b.tif")
    assert "b.tif" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(("value", "word"), [(np.nan, "NaN"), (-3.0, "negative"), (2.5, "non-integer")])
def test_bad_ids(tmp_path: Path, value: float, word: str) -> None:
    ids = np.zeros((8, 9))
    ids[2, 3] = value
    write_id_mask_tif(tmp_path / "class1.tif", ids)
    with pytest.raises(DataError, match=word):
        read_id_mask(tmp_path / "class1.tif")


def test_touching_instances_and_large_ids_survive() -> None:
    ids = np.zeros((10, 12))
    ids[2:6, 2:5] = 300.0  # touches the next one: one blob, two instances
    ids[2:6, 5:8] = 1001.0
    ids[8, 10] = 7.0
    masks, boxes, values = instances_from_id_mask(ids)
    assert list(values) == [7, 300, 1001]
    assert masks.sum(axis=(1, 2)).tolist() == [1, 12, 12]
    assert boxes[1].tolist() == [2, 2, 5, 6] and boxes[2].tolist() == [5, 2, 8, 6]
