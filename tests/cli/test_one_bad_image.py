"""One bad image never stops a folder (issue 16): ``predict`` and ``eval`` treat each image alone.

- Images of extreme aspect ratio (1 x 600, 1 x 3000), which PyTorch and ONNX Runtime cannot resize, are
  padded for the model and their instances cut back to the image (:func:`predict_image`).
- An image that still cannot be read or run (a corrupt file, a size a static export refuses, more pixels
  than ``--max-pixels``) is skipped and named at the end with exit 1; the others are written or scored.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile

from cellseg_deploy.backends import create_runner
from cellseg_deploy.evaluation.predict import ImageFailures, pad_to_aspect, predict_image
from tests.cli.conftest import Result, write_images

THIN = {"thin-1x600.tif": (1, 600), "thin-1x3000.tif": (1, 3000)}


def _zip_results(path: Path) -> list[dict]:
    with zipfile.ZipFile(path) as zf:
        return json.loads(zf.read("test-results.json"))


def test_pad_to_aspect_keeps_pixels_in_place_and_ordinary_images_untouched() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (1, 600, 3), dtype=np.uint8)
    padded = pad_to_aspect(image)
    assert padded.shape == (75, 600, 3)  # 600 / 8
    assert np.array_equal(padded[:1], image)
    assert np.all(padded[1:] == np.median(image.reshape(-1, 3), axis=0).astype(np.uint8))
    tall = rng.integers(0, 255, (3000, 1, 3), dtype=np.uint8)
    assert pad_to_aspect(tall).shape == (3000, 375, 3)
    ordinary = rng.integers(0, 255, (33, 260, 3), dtype=np.uint8)
    assert pad_to_aspect(ordinary) is ordinary


@pytest.mark.parametrize("engine", ["torch", "onnx"])
@pytest.mark.parametrize(("h", "w"), [(1, 600), (1, 3000), (600, 1)])
def test_predict_image_takes_what_the_runner_alone_cannot(
    engine: str, h: int, w: int, random_tiny_checkpoint: Path, tiny_onnx: Path
) -> None:
    model = random_tiny_checkpoint if engine == "torch" else tiny_onnx
    image = np.random.default_rng(1).integers(0, 255, (h, w, 3), dtype=np.uint8)
    with create_runner(engine, model) as runner:
        with pytest.raises(Exception):  # noqa: B017 - torch RuntimeError / ORT Fail: why predict_image pads
            runner.predict(image)
        inst = predict_image(runner, image)
        ordinary = np.random.default_rng(2).integers(0, 255, (96, 128, 3), dtype=np.uint8)
        same = predict_image(runner, ordinary)
        ref = runner.predict(ordinary)
    assert inst.image_size == (h, w)
    assert all(r["size"] == [h, w] for r in inst.rles)
    assert np.all(inst.boxes[:, 0::2] <= w) and np.all(inst.boxes[:, 1::2] <= h) and np.all(inst.boxes >= 0)
    # An image of ordinary proportions goes through untouched.
    assert np.array_equal(same.boxes, ref.boxes) and same.rles == ref.rles


def test_padded_instances_are_the_padded_image_s_cut_to_the_original(random_tiny_checkpoint: Path) -> None:
    """The crop is exact: every kept mask equals the padded image's mask restricted to the original rows."""
    from cellseg_deploy.data.rle import decode_rle
    from cellseg_deploy.postprocess import postprocess

    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, (40, 600, 3), dtype=np.uint8)  # aspect 15: padded to 75 rows
    with create_runner("torch", random_tiny_checkpoint) as runner:
        inst = predict_image(runner, image)
        full = postprocess(runner.infer(pad_to_aspect(image)))
    full_masks = [decode_rle(r)[:40] for r in full.rles]
    kept = [m for m in full_masks if m.any()]
    assert len(inst) == len(kept) > 0
    for rle, expected in zip(inst.rles, kept, strict=True):
        assert np.array_equal(decode_rle(rle), expected)


@pytest.mark.parametrize("engine", ["torch", "onnx"])
def test_predict_folder_with_thin_images_writes_all(
    cli: Callable[..., Result], engine: str, random_tiny_checkpoint: Path, tiny_onnx: Path, tmp_path: Path
) -> None:
    model = random_tiny_checkpoint if engine == "torch" else tiny_onnx
    images = write_images(tmp_path / "imgs", {"a.tif": (96, 128), "b.tif": (120, 100), **THIN})
    r = cli("predict", model, images, "--out", tmp_path / "o" / "s.zip", "--json", tmp_path / "p.json")
    assert r.code == 0, r.err
    summary = json.loads((tmp_path / "p.json").read_text())
    assert summary["num_predicted"] == 4 and summary["failed"] == []
    ids = {d["image_id"] for d in _zip_results(tmp_path / "o" / "s.zip")}
    assert {1, 2} <= ids  # a.tif and b.tif (ids in sorted file-name order)
    for d in _zip_results(tmp_path / "o" / "s.zip"):
        if d["image_id"] in (3, 4):
            assert d["segmentation"]["size"] == [1, 3000 if d["image_id"] == 3 else 600]


def test_predict_skips_a_corrupt_image_names_it_and_writes_the_others(
    cli: Callable[..., Result], random_tiny_checkpoint: Path, tmp_path: Path
) -> None:
    images = write_images(tmp_path / "imgs", {"a.tif": (96, 128), "b.tif": (120, 100), "thin.tif": (1, 600)})
    (images / "c-broken.tif").write_bytes(b"II*\x00garbage")
    r = cli("predict", random_tiny_checkpoint, images, "--out", tmp_path / "o" / "s.zip")
    assert r.code == 1, r.err
    assert "c-broken.tif" in r.err.splitlines()[-1] and "1 of 4" in r.err
    assert {1, 2} <= {d["image_id"] for d in _zip_results(tmp_path / "o" / "s.zip")}


def test_predict_skips_images_the_model_cannot_take(
    cli: Callable[..., Result], static_onnx: Path, tmp_path: Path
) -> None:
    """A graph exported for 320 x 416 only refuses a 100 x 100 image: that image is skipped and named."""
    images = write_images(tmp_path / "imgs", {"a.tif": (320, 416), "b.tif": (100, 100), "c.tif": (320, 416)})
    r = cli("predict", static_onnx, images, "--out", tmp_path / "o" / "s.zip", "--json", tmp_path / "p.json")
    assert r.code == 1, r.err
    last = r.err.strip().splitlines()[-1]
    assert last.startswith("FAILED: 1 of 3") and "b.tif" in last
    summary = json.loads((tmp_path / "p.json").read_text())
    assert summary["num_predicted"] == 2
    assert summary["failed"][0]["file"] == "b.tif" and "320x416" in summary["failed"][0]["reason"]
    assert {d["image_id"] for d in _zip_results(tmp_path / "o" / "s.zip")} == {1, 3}


def test_strict_stops_at_the_image_the_model_cannot_take(
    cli: Callable[..., Result], static_onnx: Path, tmp_path: Path
) -> None:
    images = write_images(tmp_path / "imgs", {"a.tif": (320, 416), "b.tif": (100, 100)})
    r = cli("predict", static_onnx, images, "--out", tmp_path / "o" / "s.zip", "--strict", "--no-progress")
    assert r.code == 2 and len(r.err_lines) == 1 and "b.tif" in r.err and "--strict" in r.err, r.err
    assert not (tmp_path / "o" / "s.zip").exists()


def _deflate_tiled(path: Path, side: int) -> Path:
    """A few hundred KB of TIFF that decodes to ``side x side`` RGBA (the hostile file of issue 16)."""
    tile = np.zeros((256, 256, 4), np.uint8)
    tile[..., 3] = 255
    n = ((side + 255) // 256) ** 2
    tifffile.imwrite(
        path,
        data=(tile for _ in range(n)),
        shape=(side, side, 4),
        dtype=np.uint8,
        tile=(256, 256),
        compression="deflate",
        photometric="rgb",
        extrasamples=["unassalpha"],
    )
    return path


def test_a_huge_tiff_is_refused_from_its_header(
    cli: Callable[..., Result], random_tiny_checkpoint: Path, tmp_path: Path
) -> None:
    import resource

    images = write_images(tmp_path / "imgs", {"a.tif": (96, 128)})
    _deflate_tiled(images / "huge.tif", 10000)
    assert (images / "huge.tif").stat().st_size < 2_000_000
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = cli(
        "predict",
        random_tiny_checkpoint,
        images,
        "--out",
        tmp_path / "o" / "s.zip",
        "--json",
        tmp_path / "p.json",
    )
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    assert r.code == 1, r.err
    failed = json.loads((tmp_path / "p.json").read_text())["failed"]
    assert [f["file"] for f in failed] == ["huge.tif"]
    assert "10000 x 10000" in failed[0]["reason"] and "--max-pixels" in failed[0]["reason"]
    assert grown_mb < 300, f"peak memory grew by {grown_mb:.0f} MB: the 400 MB of pixels were decoded"


def test_max_pixels_raises_the_limit(tmp_path: Path) -> None:
    from cellseg_deploy.data.io import DEFAULT_MAX_PIXELS, read_image
    from cellseg_deploy.errors import DataError

    path = _deflate_tiled(tmp_path / "big.tif", 5200)  # 27 megapixels: just above the default
    assert DEFAULT_MAX_PIXELS < 5200 * 5200
    with pytest.raises(DataError, match=r"above the limit of 25\.0 megapixels"):
        read_image(path)
    assert read_image(path, max_pixels=5200 * 5200).shape == (5200, 5200, 3)


def test_the_help_text_states_the_library_default() -> None:
    from cellseg_deploy.cli.main import cli as group
    from cellseg_deploy.data.io import DEFAULT_MAX_PIXELS

    option = next(p for p in group.commands["predict"].params if p.name == "max_pixels")
    assert f"default: {DEFAULT_MAX_PIXELS}" in (option.help or "")


def test_png_and_jpeg_limits_come_from_the_header(tmp_path: Path) -> None:
    import cv2

    from cellseg_deploy.data.io import image_size, read_image
    from cellseg_deploy.errors import DataError

    big = np.zeros((3000, 4000, 3), np.uint8)
    for suffix in (".png", ".jpg"):
        path = tmp_path / f"big{suffix}"
        assert cv2.imwrite(str(path), big)
        assert image_size(path) == (3000, 4000)
        with pytest.raises(DataError, match="3000 x 4000 px"):
            read_image(path, max_pixels=10_000_000)
        assert read_image(path).shape == (3000, 4000, 3)


def test_eval_scores_the_other_images_and_names_the_skipped_one(
    cli: Callable[..., Result], static_onnx: Path, tmp_path: Path
) -> None:
    from cellseg_deploy.data.io import write_id_mask_tif

    root = tmp_path / "ds"
    for i, (h, w) in enumerate([(320, 416), (100, 100), (320, 416)]):
        folder = root / "train" / f"s{i}"
        folder.mkdir(parents=True)
        write_images(folder, {"image.tif": (h, w)}, seed=i)
        ids = np.zeros((h, w))
        ids[10:30, 10:30] = 5
        write_id_mask_tif(folder / "class1.tif", ids)
    r = cli(
        "eval", static_onnx, "--data", root, "--split", "all", "--json", tmp_path / "e.json", "--no-progress"
    )
    assert r.code == 1, r.err
    last = r.err.strip().splitlines()[-1]
    assert last.startswith("FAILED: 1 of 3") and "image.tif" in last and "other 2" in last
    data = json.loads((tmp_path / "e.json").read_text())
    assert data["info"]["images_scored"] == 2
    assert "320x416" in data["info"]["skipped_images"][0]["reason"]


def test_image_failures_record_and_stop() -> None:
    from cellseg_deploy.errors import CheckFailed, DataError, InvalidModelOutput

    failures = ImageFailures()
    assert failures.run("a.tif", lambda: 7) == 7
    assert failures.run("/x/b.tif", lambda: (_ for _ in ()).throw(RuntimeError("boom\nmore"))) is None
    assert failures.items == [("b.tif", "the model could not process this image (RuntimeError: boom)")]
    with pytest.raises(InvalidModelOutput):  # a broken model stops the run: every image would fail
        failures.run("c.tif", lambda: (_ for _ in ()).throw(InvalidModelOutput("bad boxes")))
    err = failures.error(3, "the others are in s.zip")
    assert isinstance(err, CheckFailed) and "1 of 3" in str(err) and "b.tif" in str(err)
    with pytest.raises(DataError, match="--strict"):
        ImageFailures(strict=True).run("d.tif", lambda: (_ for _ in ()).throw(DataError("d.tif: corrupt")))
