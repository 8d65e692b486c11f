"""Quiet surprises turned into one clear line (issue 16): broken checkpoints, multi-page masks, file contents
in messages, usage errors, empty splits, thin overlays."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from tests.cli.conftest import Result, write_images

SECRET = "TOPSECRET-password-123"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cellseg_deploy.data.synth import SynthConfig, make_synthetic_dataset

    root = tmp_path_factory.mktemp("refusals") / "ds"
    config = SynthConfig(n_train=2, n_test=1, min_size=64, max_size=80, min_cells=3, max_cells=5, seed=4)
    make_synthetic_dataset(root, config, progress=False)
    return root


@pytest.fixture(scope="module")
def nan_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint whose first convolution holds NaN: what a diverged training writes."""
    from cellseg_deploy.modeling import ModelConfig, build_model, save_checkpoint

    config = ModelConfig(arch="tiny", min_size=256, max_size=512)
    model = build_model(config)
    with torch.no_grad():
        next(p for p in model.parameters() if p.ndim == 4).fill_(float("nan"))
    path = tmp_path_factory.mktemp("nan") / "nan.pt"
    save_checkpoint(path, model, config)
    return path


class _RunsCode:
    """Pickles to a call of ``os.system`` that creates ``marker`` (the point: it is refused, never run)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def _one_line(r: Result, code: int = 2) -> str:
    assert r.code == code, r
    assert len(r.err_lines) == 1 and "Traceback" not in r.err, r.err
    return r.err_lines[0]


@pytest.mark.parametrize("command", ["predict", "export"])
def test_checkpoint_with_nan_weights_is_refused_at_load(
    cli: Callable[..., Result], nan_checkpoint: Path, dataset: Path, tmp_path: Path, command: str
) -> None:
    args = [dataset / "test_release", "--out", tmp_path / "s.zip", "--no-progress"]
    if command == "export":
        args = ["--out", tmp_path / "m.onnx"]
    line = _one_line(cli(command, nan_checkpoint, *args))
    assert "NaN or infinite" in line and str(nan_checkpoint) in line and "trace image" not in line
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_that_carries_code_names_it_and_is_not_run(
    cli: Callable[..., Result], dataset: Path, tmp_path: Path
) -> None:
    evil = tmp_path / "evil.pt"
    marker = tmp_path / "it-ran"
    torch.save({"format": "cellseg-deploy/checkpoint/1", "payload": _RunsCode(marker)}, evil)
    line = _one_line(cli("predict", evil, dataset / "test_release", "--out", tmp_path / "o" / "s.zip"))
    assert f"{os.system.__module__}.system" in line  # posix.system on Linux
    assert "carries code" in line and "could run that code" in line
    assert "weights_only" not in line and "corrupt" not in line
    assert not marker.exists()


def _link_to_secret(tmp_path: Path, name: str) -> Path:
    secret = tmp_path / "private.txt"
    secret.write_text(SECRET + "\n")
    link = tmp_path / name
    link.symlink_to(secret)
    return link


@pytest.mark.parametrize("name", ["model.pt", "model.onnx"])
def test_model_that_is_a_link_to_a_text_file_is_refused_without_its_contents(
    cli: Callable[..., Result], dataset: Path, tmp_path: Path, name: str
) -> None:
    link = _link_to_secret(tmp_path, name)
    line = _one_line(cli("eval", link, "--data", dataset, "--no-progress"))
    for leak in (SECRET[:4], "TOPS", "operand 84"):
        assert leak not in line, line


def test_image_that_is_a_link_to_a_text_file_is_skipped_without_its_contents(
    cli: Callable[..., Result], random_tiny_checkpoint: Path, tmp_path: Path
) -> None:
    images = write_images(tmp_path / "imgs", {"a.tif": (64, 64)})
    secret = tmp_path / "private.txt"
    secret.write_text(SECRET)
    (images / "b.tif").symlink_to(secret)
    r = cli("predict", random_tiny_checkpoint, images, "--out", tmp_path / "o" / "s.zip", "--no-progress")
    assert r.code == 1
    assert "b.tif" in r.out and "not a TIFF file" in r.out
    assert SECRET[:4] not in r.out + r.err


def test_multi_page_class_mask_is_refused(cli: Callable[..., Result], dataset: Path, tmp_path: Path) -> None:
    root = shutil.copytree(dataset, tmp_path / "ds")
    mask = sorted((root / "train").glob("*/class*.tif"))[0]
    ids = tifffile.imread(mask)
    tifffile.imwrite(mask, np.stack([ids, np.zeros_like(ids)]), photometric="minisblack")
    r = cli("data", "check", root)
    assert r.code == 1
    assert any(f"{mask}: TIFF holds 2 pages, expected one" in line for line in r.err_lines), r.err
    line = _one_line(cli("data", "to-coco", root, "--out", tmp_path / "gt.json"))
    assert "2 pages" in line and str(mask) in line


@pytest.mark.parametrize(
    ("args", "command"),
    [
        (["predict", "model.pt"], "cellseg-deploy predict"),
        (["eval", "--nope"], "cellseg-deploy eval"),
        (["data", "to-coco", ".", "--split", "nope", "--out", "x.json"], "cellseg-deploy data to-coco"),
        (["no-such-command"], "cellseg-deploy"),
    ],
)
def test_usage_errors_are_one_line_with_the_help_hint(
    cli: Callable[..., Result], args: list[str], command: str
) -> None:
    line = _one_line(cli(*args))
    assert line.startswith("error: ") and line.endswith(f"(see '{command} --help')"), line


def test_an_empty_split_is_the_same_error_in_to_coco_and_eval(
    cli: Callable[..., Result], random_tiny_checkpoint: Path, tmp_path: Path
) -> None:
    from cellseg_deploy.data.synth import SynthConfig, make_synthetic_dataset

    root = tmp_path / "one"
    make_synthetic_dataset(
        root, SynthConfig(n_train=1, n_test=1, min_size=48, max_size=64, seed=2), progress=False
    )
    coco = _one_line(cli("data", "to-coco", root, "--split", "val", "--out", tmp_path / "val.json"))
    ev = _one_line(cli("eval", random_tiny_checkpoint, "--data", root, "--split", "val", "--no-progress"))
    assert coco == ev and "split 'val'" in coco and "has no images" in coco and "--split all" in coco
    assert not (tmp_path / "val.json").exists()


def test_overlay_of_a_257_x_1_image_is_not_1_pixel_wide(
    cli: Callable[..., Result], random_tiny_checkpoint: Path, tmp_path: Path
) -> None:
    import cv2

    from cellseg_deploy.evaluation.overlays import MIN_OVERLAY_SHORT_SIDE

    images = tmp_path / "imgs"
    images.mkdir()
    from cellseg_deploy.data.io import write_image_tif

    write_image_tif(images / "tall.tif", np.zeros((257, 1, 3), np.uint8))  # black: the image region shows
    r = cli(
        "predict",
        random_tiny_checkpoint,
        images,
        "--out",
        tmp_path / "o" / "s.zip",
        "--overlays",
        tmp_path / "ov",
    )
    assert r.code == 0, r.err
    png = cv2.imread(str(tmp_path / "ov" / "tall.png"))
    first_row = png[0]
    image_width = int(np.count_nonzero((first_row < 250).any(axis=1)))
    assert image_width >= MIN_OVERLAY_SHORT_SIDE, f"the image is drawn {image_width} px wide"


def test_bench_workload_header_errors_do_not_quote_the_file(tmp_path: Path) -> None:
    from cellseg_deploy.bench.workload import folder_workload
    from cellseg_deploy.errors import DataError

    (tmp_path / "private.txt").write_text(SECRET)
    (tmp_path / "a.tif").symlink_to(tmp_path / "private.txt")
    with pytest.raises(DataError) as info:
        folder_workload(tmp_path)
    assert "not a TIFF file" in str(info.value) and SECRET[:4] not in str(info.value)
