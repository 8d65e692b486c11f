"""Atomic writes and output checks (issue 16): leftovers of killed writes are cleaned by the next write to the
same place, a live writer's temporary file is left alone, and finished work survives a failing last write."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cellseg_deploy.io_utils import (
    OutputError,
    atomic_path,
    atomic_write_bytes,
    check_output,
    remove_stale_temps,
)


def test_the_next_write_removes_leftovers_of_killed_writes(tmp_path: Path) -> None:
    dest = tmp_path / "model.onnx"
    leftovers = [tmp_path / ".model.onnx.k1ll3d.tmp", tmp_path / ".model.onnx.0a1b2c.tmp"]
    for p in leftovers:
        p.write_bytes(b"half a model")
    other = tmp_path / ".other.onnx.k1ll3d.tmp"  # another destination's: not ours to remove
    other.write_bytes(b"x")
    atomic_write_bytes(dest, b"new")
    assert dest.read_bytes() == b"new"
    assert not any(p.exists() for p in leftovers)
    assert other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.onnx.k1ll3d.tmp", "model.onnx"]


def test_a_killed_writer_s_file_is_removed_but_a_live_one_s_is_not(tmp_path: Path) -> None:
    """Two real processes: one is killed while writing, one is still writing (holding its lock)."""
    dest = tmp_path / "last.pt"
    script = (
        "import sys, time\n"
        "from cellseg_deploy.io_utils import atomic_path\n"
        "with atomic_path(sys.argv[1]) as tmp:\n"
        "    tmp.write_bytes(b'partial')\n"
        "    print(tmp, flush=True)\n"
        "    time.sleep(60)\n"
    )

    def start() -> tuple[subprocess.Popen[str], Path]:
        proc = subprocess.Popen([sys.executable, "-c", script, str(dest)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        return proc, Path(proc.stdout.readline().strip())

    live, live_tmp = start()
    killed, killed_tmp = start()  # its own start leaves the live writer's file alone ...
    killed.kill()
    killed.wait()
    try:
        assert killed_tmp.exists() and live_tmp.exists()
        removed = remove_stale_temps(dest)
        assert removed == [killed_tmp]
        assert live_tmp.exists(), "a live writer's temporary file must survive"
    finally:
        live.kill()
        live.wait()


def test_checkpoint_save_cleans_up_after_a_killed_save(tmp_path: Path, random_tiny_checkpoint: Path) -> None:
    """``train --resume`` writes last.pt through save_checkpoint -> atomic_path: the leftover goes."""
    from cellseg_deploy.modeling import build_model, load_checkpoint, save_checkpoint

    leftover = tmp_path / ".last.pt.xyz123.tmp"
    leftover.write_bytes(b"half a checkpoint")
    ckpt = load_checkpoint(random_tiny_checkpoint)
    save_checkpoint(tmp_path / "last.pt", build_model(ckpt.model_config), ckpt.model_config)
    assert not leftover.exists() and (tmp_path / "last.pt").is_file()


def test_a_finished_file_that_cannot_be_moved_into_place_is_kept(tmp_path: Path) -> None:
    dest = tmp_path / "sub.zip"
    with pytest.raises(OutputError) as info, atomic_path(dest) as tmp:
        tmp.write_bytes(b"finished work")
        dest.mkdir()  # something took the destination meanwhile
        (dest / "x").write_text("x")
    message = str(info.value)
    kept = Path(message.rsplit("kept as ", 1)[1])
    assert kept.read_bytes() == b"finished work" and kept.parent == tmp_path
    assert "\n" not in message


def test_a_failed_write_deletes_its_partial_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError), atomic_path(tmp_path / "a.json") as tmp:
        tmp.write_bytes(b"part")
        raise ValueError("writer failed")
    assert list(tmp_path.iterdir()) == []


def test_json_result_is_rescued_when_the_last_write_fails(tmp_path: Path) -> None:
    from cellseg_deploy.cli.common import write_json_result

    dest = tmp_path / "out" / "eval.json"
    check_output(dest, what="--json")  # fine at the start of the run ...
    (tmp_path / "out").write_text("... but a file took the folder's place by the end")
    with pytest.raises(OutputError) as info:
        write_json_result(dest, {"AP50": 0.5})
    kept = Path(str(info.value).rsplit("kept in ", 1)[1])
    assert kept.name == "eval.json" and '"AP50": 0.5' in kept.read_text()
    kept.unlink()
    kept.parent.rmdir()


def test_predict_keeps_its_results_when_the_zip_cannot_be_written(
    tmp_path: Path, random_tiny_checkpoint: Path
) -> None:
    import zipfile

    import numpy as np

    from cellseg_deploy.backends import create_runner
    from cellseg_deploy.data.io import write_image_tif
    from cellseg_deploy.evaluation.predict import predict_folder

    images = tmp_path / "imgs"
    images.mkdir()
    write_image_tif(images / "a.tif", np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8))
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the output folder should be")
    with create_runner("torch", random_tiny_checkpoint) as runner, pytest.raises(OutputError) as info:
        predict_folder(runner, images, None, blocked / "sub.zip", progress=False)
    message = str(info.value)
    assert message.startswith(f"cannot write {blocked / 'sub.zip'}") and "kept in" in message
    kept = Path(message.rsplit("kept in ", 1)[1])
    with zipfile.ZipFile(kept) as zf:
        assert zf.namelist() == ["test-results.json"]


@pytest.mark.parametrize(
    ("make", "folder", "expect"),
    [
        (lambda p: (p / "f").write_text("x") and p / "f" / "out.json", False, "is a file, not a folder"),
        (
            lambda p: (p / "f").write_text("x") and p / "f" / "a" / "b" / "out",
            True,
            "is a file, not a folder",
        ),
        (lambda p: Path("/proc/cellseg/out.json"), False, "cannot create files in /proc"),
        (lambda p: (p / "d").mkdir() or p / "d", False, "is a folder; give a file path"),
        (lambda p: (p / "f").write_text("x") and p / "f", True, "is a file, not a folder; give a folder"),
        (lambda p: (p / "e.json").write_text("x") and p / "e.json", False, "already"),
    ],
)
def test_check_output_refuses_in_one_line(tmp_path: Path, make, folder: bool, expect: str) -> None:
    path = make(tmp_path)
    with pytest.raises(OutputError, match=expect) as info:
        check_output(path, what="--out", folder=folder)
    assert "\n" not in str(info.value)


def test_check_output_accepts_new_paths_and_creates_nothing(tmp_path: Path) -> None:
    assert check_output(tmp_path / "new" / "deeper" / "out.zip", what="--out") is None
    assert check_output(tmp_path / "run", what="--out", folder=True) is None
    (tmp_path / "empty").mkdir()
    assert check_output(tmp_path / "empty", what="--overlays", folder=True) is None  # empty: nothing to lose
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
    (tmp_path / "x.json").write_text("{}")
    assert (
        check_output(tmp_path / "x.json", what="--json", overwrite=True)
        == f"replacing {tmp_path / 'x.json'} (--overwrite)"
    )


def test_check_output_takes_well_under_a_second(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    for i in range(50):
        check_output(tmp_path / f"d{i}" / "out.zip", what="--out")
    assert time.perf_counter() - t0 < 1.0
    assert os.listdir(tmp_path) == []
