"""Image and ID-mask reading: conversions of every accepted layout, and one-line errors for bad files."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from cellseg_deploy.data.io import image_size, read_id_mask, read_image, write_id_mask_tif, write_image_tif
from cellseg_deploy.data.layout import instances_from_id_mask
from cellseg_deploy.errors import DataError

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (21, 34, 3), dtype=np.uint8)


def test_write_image_tif_is_the_real_format(tmp_path: Path) -> None:
    write_image_tif(tmp_path / "a.tif", RGB)
    with tifffile.TiffFile(tmp_path / "a.tif") as tif:
        page = tif.pages[0]
        assert isinstance(page, tifffile.TiffPage)
        assert page.compression == tifffile.COMPRESSION.LZW
        assert page.predictor == tifffile.PREDICTOR.HORIZONTAL
        assert page.shape == (21, 34, 4) and page.dtype == np.uint8
        assert not {"DateTime", "Software", "ImageDescription"} & {t.name for t in page.tags.values()}
        rgba = page.asarray()
    assert (rgba[:, :, 3] == 255).all() and np.array_equal(rgba[:, :, :3], RGB)
    assert np.array_equal(read_image(tmp_path / "a.tif"), RGB)
    assert image_size(tmp_path / "a.tif") == (21, 34)


def test_write_id_mask_is_float64_uncompressed(tmp_path: Path) -> None:
    ids = np.zeros((6, 7))
    ids[1:3, 1:3] = 300
    write_id_mask_tif(tmp_path / "class1.tif", ids)
    page = tifffile.TiffFile(tmp_path / "class1.tif").pages[0]
    assert page.dtype == np.float64 and page.compression == tifffile.COMPRESSION.NONE
    assert np.array_equal(read_id_mask(tmp_path / "class1.tif"), ids)


GRAY = RGB[:, :, 0]
GRAY3 = np.repeat(GRAY[:, :, None], 3, axis=2)


@pytest.mark.parametrize(
    ("array", "kwargs", "expected"),
    [
        (GRAY, {}, GRAY3),
        (RGB.astype(np.uint16) * 257, {}, RGB),
        ((RGB.astype(np.uint16) * 257)[:, :, 0], {}, GRAY3),
        (RGB, {}, RGB),
        (
            np.dstack([RGB, np.full((21, 34), 7, np.uint8)]),
            {"photometric": "rgb", "extrasamples": ["unassalpha"]},
            RGB,
        ),
        (np.moveaxis(RGB, -1, 0), {"photometric": "rgb", "planarconfig": "separate"}, RGB),
        (RGB.astype(np.float32) / 255.0, {"photometric": "rgb"}, RGB),
        (RGB.astype(np.float64), {"photometric": "rgb"}, RGB),
        (
            np.dstack([GRAY, np.full((21, 34), 255, np.uint8)]),
            {"photometric": "minisblack", "planarconfig": "contig"},
            GRAY3,
        ),
        (RGB, {"compression": "lzw"}, RGB),
        (RGB, {"compression": "zlib"}, RGB),
    ],
    ids=[
        "gray",
        "16bit",
        "16bit-gray",
        "rgb",
        "rgba",
        "planar",
        "float01",
        "float255",
        "gray+alpha",
        "lzw",
        "deflate",
    ],
)
def test_tiff_conversions(
    tmp_path: Path, array: np.ndarray, kwargs: dict[str, object], expected: np.ndarray
) -> None:
    tifffile.imwrite(tmp_path / "x.tif", array, **kwargs)  # type: ignore[arg-type]
    out = read_image(tmp_path / "x.tif")
    assert out.dtype == np.uint8 and out.shape == (21, 34, 3) and out.flags.c_contiguous
    assert np.array_equal(out, expected)


def test_16bit_uses_the_fixed_scale_not_a_stretch(tmp_path: Path) -> None:
    dark = np.full((4, 5), 4095, np.uint16)  # 12-bit white in 16 bits: documented to come out dark (15)
    dark[0, 0] = 0
    tifffile.imwrite(tmp_path / "x.tif", dark)
    out = read_image(tmp_path / "x.tif")
    assert out.max() == 4095 // 257 and out.min() == 0


def test_float_out_of_range_is_min_max_scaled(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "x.tif", np.array([[-1.0, 0.0], [1.0, 3.0]], np.float32))
    assert read_image(tmp_path / "x.tif")[:, :, 0].tolist() == [[0, 64], [128, 255]]


def test_float_nan_image_is_an_error(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "x.tif", np.array([[np.nan, 0.0]], np.float32))
    with pytest.raises(DataError, match="NaN"):
        read_image(tmp_path / "x.tif")


@pytest.mark.parametrize(
    ("suffix", "array", "expected"),
    [
        (".png", RGB, RGB),
        (".png", GRAY, GRAY3),
        (".png", RGB.astype(np.uint16) * 257, RGB),
        (".png", np.dstack([RGB, np.full((21, 34), 9, np.uint8)]), RGB),
    ],
    ids=["rgb", "gray", "16bit", "rgba"],
)
def test_png_conversions(tmp_path: Path, suffix: str, array: np.ndarray, expected: np.ndarray) -> None:
    bgr = (
        array
        if array.ndim == 2
        else cv2.cvtColor(array, cv2.COLOR_RGB2BGR if array.shape[2] == 3 else cv2.COLOR_RGBA2BGRA)
    )
    assert cv2.imwrite(str(tmp_path / f"x{suffix}"), bgr)
    assert np.array_equal(read_image(tmp_path / f"x{suffix}"), expected)


def test_jpeg_is_rgb_not_bgr(tmp_path: Path) -> None:
    red = np.zeros((16, 16, 3), np.uint8)
    red[:, :, 0] = 250
    assert cv2.imwrite(str(tmp_path / "x.jpg"), cv2.cvtColor(red, cv2.COLOR_RGB2BGR))
    out = read_image(tmp_path / "x.jpg").astype(int)
    assert out[:, :, 0].mean() > 200 and out[:, :, 2].mean() < 50


def _one_line_error(path: Path, capfd: pytest.CaptureFixture[str], word: str) -> None:
    with pytest.raises(DataError) as err:
        read_image(path)
    message = str(err.value)
    assert path.name in message and "\n" not in message and word in message, message
    assert capfd.readouterr().err == ""  # tifffile's own log lines are folded into the message, not printed


def test_truncated_tiff_is_one_line_error(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    write_image_tif(tmp_path / "a.tif", RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = (tmp_path / "a.tif").read_bytes()
    (tmp_path / "half.tif").write_bytes(data[: len(data) // 2])
    _one_line_error(tmp_path / "half.tif", capfd, "truncated")
    (tmp_path / "head.tif").write_bytes(data[:60])
    _one_line_error(tmp_path / "head.tif", capfd, "TIFF")


def test_corrupt_tiff_is_one_line_error(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    write_image_tif(tmp_path / "a.tif", RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = bytearray((tmp_path / "a.tif").read_bytes())
    for i in range(400, len(data) - 400):
        data[i] ^= 0x5A
    (tmp_path / "bad.tif").write_bytes(bytes(data))
    _one_line_error(tmp_path / "bad.tif", capfd, "cannot decode TIFF")
    (tmp_path / "text.tif").write_text("not an image\n")
    _one_line_error(tmp_path / "text.tif", capfd, "not a TIFF")


def test_bad_png_jpeg_and_missing_files(tmp_path: Path) -> None:
    ok, png = cv2.imencode(".png", RGB)
    ok2, jpg = cv2.imencode(".jpg", RGB)
    assert ok and ok2
    (tmp_path / "t.png").write_bytes(png.tobytes()[: png.size // 2])
    (tmp_path / "t.jpg").write_bytes(jpg.tobytes()[: jpg.size // 2])
    (tmp_path / "x.bmp").write_bytes(b"BM")
    for name, word in [
        ("t.png", "corrupt or truncated"),
        ("t.jpg", "truncated"),
        ("nope.tif", "not found"),
        ("x.bmp", "unsupported"),
    ]:
        with pytest.raises(DataError, match=word):
            read_image(tmp_path / name)


@pytest.mark.parametrize(
    ("value", "word"), [(np.nan, "NaN"), (np.inf, "infinite"), (-3.0, "negative"), (2.5, "non-integer")]
)
def test_bad_ids(tmp_path: Path, value: float, word: str) -> None:
    ids = np.zeros((8, 9))
    ids[2, 3] = value
    write_id_mask_tif(tmp_path / "class1.tif", ids)
    with pytest.raises(DataError, match=word) as err:
        read_id_mask(tmp_path / "class1.tif")
    assert "class1.tif" in str(err.value) and "1 pixel(s)" in str(err.value)


def test_id_mask_must_be_2d(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "class1.tif", np.zeros((4, 5, 3)), photometric="rgb")
    with pytest.raises(DataError, match="2-D"):
        read_id_mask(tmp_path / "class1.tif")


def test_large_ids_stay_exact(tmp_path: Path) -> None:
    ids = np.zeros((4, 4))
    ids[0, 0], ids[0, 1], ids[1, 1] = 256.0, 257.0, 2.0**40  # neighbours that a uint8 cast would merge
    write_id_mask_tif(tmp_path / "class2.tif", ids)
    values = np.unique(read_id_mask(tmp_path / "class2.tif"))
    assert values.tolist() == [0.0, 256.0, 257.0, 2.0**40]


def test_touching_instances_and_large_ids_survive() -> None:
    ids = np.zeros((10, 12))
    ids[2:6, 2:5] = 300.0  # touches the next one: one blob, two instances
    ids[2:6, 5:8] = 1001.0
    ids[8, 10] = 7.0
    masks, boxes, values = instances_from_id_mask(ids)
    assert list(values) == [7, 300, 1001]
    assert masks.sum(axis=(1, 2)).tolist() == [1, 12, 12]
    assert boxes[1].tolist() == [2, 2, 5, 6] and boxes[2].tolist() == [5, 2, 8, 6]
    for mask, value in zip(masks, values, strict=True):
        assert np.array_equal(mask, ids == value)
