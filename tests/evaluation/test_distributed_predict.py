"""``torchrun --nproc-per-node 2`` predict and eval (gloo, CPU) against one process: the same submission
bytes, exactly the same AP; and a rank that stops makes the run fail without a submission."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from cellseg_deploy.backends import create_runner
from cellseg_deploy.evaluation import evaluate_model, predict_folder
from cellseg_deploy.evaluation.pipeline import PipelineSettings

pytestmark = pytest.mark.slow


def _torchrun(*args: str | Path, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "cellseg_deploy.cli.main", *map(str, args)],
        capture_output=True, text=True, env=env, timeout=timeout,
    )  # fmt: skip


def _members(path: Path) -> list[tuple[str, int, bytes]]:
    """Name, CRC and bytes of every member (the zip's header timestamps come from the clock)."""
    with zipfile.ZipFile(path) as zf:
        return [(i.filename, i.CRC, zf.read(i.filename)) for i in zf.infolist()]


def test_torchrun_predict_and_eval_match_one_process(trained_tiny: tuple[Path, Path], tmp_path: Path) -> None:
    checkpoint, data_root = trained_tiny
    images = data_root / "test_release"
    with create_runner("torch", checkpoint, threads=1) as runner:
        one = predict_folder(runner, images, None, tmp_path / "one" / "s.zip", progress=False)
    single = evaluate_model(checkpoint, None, data_root, "all", threads=1, progress=False)
    assert one.num_detections > 0 and single.metrics["segm"]["AP50"] > 0.1

    out = tmp_path / "two" / "s.zip"
    out.parent.mkdir()
    proc = _torchrun(
        "predict", checkpoint, images, "--out", out, "--workers", "1", "--json", tmp_path / "p.json"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _members(out) == _members(one.out_zip)
    assert out.with_name("test-results.json").read_bytes() == one.results_json.read_bytes()
    assert proc.stdout.count("predicted ") == 1, proc.stdout  # rank 0 alone reports
    summary = json.loads((tmp_path / "p.json").read_text())
    assert summary["num_predicted"] == one.num_predicted and summary["num_images"] == one.num_images

    proc = _torchrun("eval", checkpoint, "--data", data_root, "--split", "all", "--json", tmp_path / "e.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "e.json").read_text())
    assert two["metrics"] == json.loads(json.dumps(single.to_dict()["metrics"]))  # every AP, exactly
    assert two["info"]["processes"] == 2 and two["info"]["images_scored"] == single.info["images_scored"]


def test_torchrun_rank_that_stops_names_its_image_and_writes_nothing(
    trained_tiny: tuple[Path, Path], tmp_path: Path
) -> None:
    checkpoint, data_root = trained_tiny
    folder = tmp_path / "imgs"
    folder.mkdir()
    sources = sorted((data_root / "test_release").glob("*.tif"))
    for name, src in zip(("a.tif", "c.tif", "d.tif"), sources, strict=False):
        shutil.copy(src, folder / name)
    (folder / "b.tif").write_bytes(b"II*\x00 broken")  # index 1 of the sorted folder: rank 1's first image
    out = tmp_path / "s.zip"
    proc = _torchrun("predict", checkpoint, folder, "--out", out, "--strict", "--no-progress")
    assert proc.returncode != 0
    assert "rank 1: " in proc.stderr and "b.tif" in proc.stderr, proc.stderr[-3000:]
    assert not out.exists() and not out.with_name("test-results.json").exists()
    assert not list(tmp_path.glob(".s.zip*")), "no partial zip left either"

    # without --strict the bad image is skipped and named by rank 0, as in one process; the others are written
    proc = _torchrun("predict", checkpoint, folder, "--out", out, "--no-progress")
    assert proc.returncode != 0
    assert "1 image(s) skipped" in proc.stdout and "b.tif" in proc.stdout, proc.stdout
    assert proc.stdout.count("predicted 3 of 4 images") == 1, proc.stdout
    assert {r["image_id"] for r in json.loads(out.with_name("test-results.json").read_text())} <= {1, 3, 4}


def test_pipelined_eval_has_the_same_ap(trained_tiny: tuple[Path, Path]) -> None:
    checkpoint, data_root = trained_tiny
    one = evaluate_model(checkpoint, None, data_root, "all", threads=1, progress=False)
    piped = evaluate_model(
        checkpoint, None, data_root, "all", threads=1, progress=False, pipeline=PipelineSettings(workers=2)
    )
    assert piped.metrics == one.metrics
