"""Every command checks, before any work, that each output it will write can be written (issue 16).

An output under a file, in ``/proc`` or in a read-only folder stops the command in one line with exit 2, in
seconds (before a model is loaded or data is read), and nothing is written. An existing output is refused
unless ``--overwrite`` is given; then one line says it is replaced.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.cli.conftest import Result, write_images

FAST_S = 5.0  # "before any inference": the check must answer well within this


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cellseg_deploy.data.synth import SynthConfig, make_synthetic_dataset

    root = tmp_path_factory.mktemp("cli-ds") / "ds"
    make_synthetic_dataset(
        root,
        SynthConfig(n_train=3, n_test=2, min_size=64, max_size=96, min_cells=3, max_cells=6, seed=1),
        progress=False,
    )
    return root


def _cases(ckpt: Path, data: Path, bad: Path) -> dict[str, list[str | Path]]:
    """One command line per output option; ``bad`` is the unwritable place under test."""
    images = data / "test_release"
    return {
        "predict --out": ["predict", ckpt, images, "--out", bad / "sub.zip", "--no-progress"],
        "predict --overlays": [
            "predict",
            ckpt,
            images,
            "--out",
            bad.parent / "ok" / "sub.zip",
            "--overlays",
            bad / "ov",
        ],
        "predict --json": [
            "predict",
            ckpt,
            images,
            "--out",
            bad.parent / "ok2" / "s.zip",
            "--json",
            bad / "p.json",
        ],
        "eval --json": ["eval", ckpt, "--data", data, "--json", bad / "e.json", "--no-progress"],
        "export --out": ["export", ckpt, "--out", bad / "m.onnx"],
        "export --json": ["export", ckpt, "--out", bad.parent / "ok3" / "m.onnx", "--json", bad / "x.json"],
        "train --out": ["train", "--data", data, "--out", bad / "run", "--no-progress"],
        "data to-coco --out": ["data", "to-coco", data, "--out", bad / "gt.json"],
        "data check --json": ["data", "check", data, "--json", bad / "c.json"],
        "data synth OUT": ["data", "synth", bad / "synth", "--train", "1", "--test", "1"],
        "demo --out": ["demo", "--out", bad / "demo"],
    }


def _assert_refused(r: Result, *must: str) -> None:
    assert r.code == 2, r
    assert len(r.err_lines) == 1, r.err  # one line, no traceback
    assert "Traceback" not in r.err
    assert r.seconds < FAST_S, f"took {r.seconds:.1f} s: the check must come before any work"
    for part in must:
        assert part in r.err, (part, r.err)


@pytest.mark.parametrize("case", list(_cases(Path("c"), Path("d"), Path("b"))))
def test_output_under_a_file_stops_before_any_work(
    cli: Callable[..., Result], random_tiny_checkpoint: Path, dataset: Path, tmp_path: Path, case: str
) -> None:
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    r = cli(*_cases(random_tiny_checkpoint, dataset, a_file)[case])
    _assert_refused(r, "is a file, not a folder", str(a_file))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"], "nothing may be written"


@pytest.mark.parametrize(
    "case", ["predict --out", "export --out", "train --out", "eval --json", "data to-coco --out"]
)
def test_output_in_proc_stops_before_any_work(
    cli: Callable[..., Result], random_tiny_checkpoint: Path, dataset: Path, case: str
) -> None:
    r = cli(*_cases(random_tiny_checkpoint, dataset, Path("/proc/cellseg-deploy-test"))[case])
    _assert_refused(r, "cannot be written", "/proc")


def test_predict_into_a_read_only_folder_is_one_line_exit_2_in_seconds(
    random_tiny_checkpoint: Path, dataset: Path
) -> None:
    """A real read-only folder (mode 0555). Root may write anywhere, so as root the command runs as the
    unprivileged user ``nobody`` (``setpriv``), in a world-readable scratch folder."""
    as_root = os.geteuid() == 0
    if as_root and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: a read-only folder cannot be made")
    scratch = Path(tempfile.mkdtemp(prefix="cellseg-ro-"))
    try:
        os.chmod(scratch, 0o755)
        ckpt = scratch / "m.pt"
        shutil.copy(random_tiny_checkpoint, ckpt)
        images = shutil.copytree(dataset / "test_release", scratch / "images")
        for p in [ckpt, images, *images.iterdir()]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        ro = scratch / "ro"
        ro.mkdir()
        os.chmod(ro, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
        cmd = [sys.executable, "-m", "cellseg_deploy.cli.main", "predict", str(ckpt), str(images)]
        cmd += ["--out", str(ro / "sub.zip"), "--no-progress"]
        if as_root:
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
        env = {**os.environ, "HOME": str(scratch)}
        import time

        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=scratch)
        seconds = time.perf_counter() - t0
        err = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2, proc.stderr
        assert len(err) == 1 and "Permission denied" in err[0] and str(ro) in err[0], proc.stderr
        assert seconds < FAST_S + 3, f"{seconds:.1f} s (a fresh interpreter included)"
        assert list(ro.iterdir()) == []
    finally:
        os.chmod(scratch / "ro", 0o755)
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.mark.parametrize(
    "case",
    [
        "predict --out",
        "data to-coco --out",
        "data check --json",
        "eval --json",
        "export --out",
        "predict --json",
    ],
)
def test_existing_output_is_refused_without_overwrite(
    cli: Callable[..., Result], random_tiny_checkpoint: Path, dataset: Path, tmp_path: Path, case: str
) -> None:
    args = _cases(random_tiny_checkpoint, dataset, tmp_path)[case]
    target = Path(args[args.index("--json") + 1] if "--json" in args else args[args.index("--out") + 1])
    target.write_bytes(b"earlier work")
    r = cli(*args)
    _assert_refused(r, "already", "--overwrite", str(target))
    assert target.read_bytes() == b"earlier work"


def test_overwrite_replaces_with_a_line_that_says_so(
    cli: Callable[..., Result], dataset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "gt.json"
    out.write_text("earlier work")
    r = cli("data", "to-coco", dataset, "--out", out, "--overwrite")
    assert r.code == 0, r
    assert f"replacing {out} (--overwrite)" in r.err
    assert out.read_text().startswith("{")


def test_predict_checks_the_results_json_beside_the_zip(
    cli: Callable[..., Result], random_tiny_checkpoint: Path, dataset: Path, tmp_path: Path
) -> None:
    """``predict`` also writes test-results.json beside --out: a second prediction into the same folder
    under another zip name would replace the first one's; it is refused like any existing output."""
    (tmp_path / "test-results.json").write_text("[]")
    r = cli("predict", random_tiny_checkpoint, dataset / "test_release", "--out", tmp_path / "b.zip")
    _assert_refused(r, "test-results.json", "--overwrite")
    assert not (tmp_path / "b.zip").exists()


def test_overlay_folder_with_files_counts_as_existing(
    cli: Callable[..., Result], random_tiny_checkpoint: Path, tmp_path: Path
) -> None:
    images = write_images(tmp_path / "imgs", {"a.tif": (64, 64)})
    overlays = tmp_path / "ov"
    overlays.mkdir()
    (overlays / "a.png").write_bytes(b"earlier")
    r = cli(
        "predict", random_tiny_checkpoint, images, "--out", tmp_path / "o" / "s.zip", "--overlays", overlays
    )
    _assert_refused(r, "--overlays", "already")
    assert (overlays / "a.png").read_bytes() == b"earlier"


def test_export_removes_what_a_killed_export_left(
    cli: Callable[..., Result], random_tiny_checkpoint: Path, tmp_path: Path
) -> None:
    leftover = tmp_path / ".model.onnx.k1ll3d.tmp"
    leftover.write_bytes(b"half a graph")
    r = cli("export", random_tiny_checkpoint, "--out", tmp_path / "model.onnx")
    assert r.code == 0, r.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


@pytest.mark.parametrize("command", [["demo", "--out"], ["data", "synth"]])
def test_a_folder_holding_earlier_work_is_refused(
    cli: Callable[..., Result], tmp_path: Path, command: list[str]
) -> None:
    """``demo`` replaced its training run on every rerun; now an OUT that holds files needs --overwrite.
    ``data synth`` keeps its own refusal of a folder that holds another dataset."""
    (tmp_path / "report.md").write_text("earlier work")
    (tmp_path / "test_image_name_to_ids.json").write_text("[]")
    r = cli(*command, tmp_path, "--train", "2", "--test", "1")
    assert r.code == 2 and len(r.err_lines) == 1 and r.seconds < FAST_S, r
    assert (tmp_path / "report.md").read_text() == "earlier work"
