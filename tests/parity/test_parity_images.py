"""``parity`` treats each image alone: an image a runner cannot take is skipped and named (exit 1), the
others are compared; outputs are checked before any work. (An unreadable image of a dataset stops earlier,
in one line, when the ground truth is built from it.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cellseg_deploy.cli.main import main


@pytest.fixture()
def static_candidate(random_tiny_checkpoint: Path, tmp_path: Path) -> tuple[Path, Path, int]:
    """A synthetic set of images of several sizes and an ONNX export fixed to the first image's size (the
    others are refused by the runner): ``(data root, static export, images of another size)``."""
    from cellseg_deploy.backends.onnxrt.export import export_onnx
    from cellseg_deploy.data.io import read_image
    from cellseg_deploy.data.layout import list_train_ids
    from cellseg_deploy.data.synth import SynthConfig, make_synthetic_dataset

    root = tmp_path / "data"
    make_synthetic_dataset(
        root, SynthConfig(n_train=4, n_test=1, min_size=96, max_size=160, seed=5), progress=False
    )
    images = [read_image(root / "train" / sid / "image.tif") for sid in sorted(list_train_ids(root))]
    export_onnx(random_tiny_checkpoint, tmp_path / "static.onnx", trace_image=images[0], dynamic=False)
    others = sum(im.shape != images[0].shape for im in images)
    assert 0 < others < len(images)
    return root, tmp_path / "static.onnx", others


def test_an_image_the_candidate_refuses_is_skipped_and_named(
    random_tiny_checkpoint: Path, static_candidate: tuple[Path, Path, int], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    root, candidate, others = static_candidate
    out = tmp_path / "r.json"
    argv = ["parity", str(random_tiny_checkpoint), "--candidate", str(candidate), "--data", str(root)]
    argv += ["--split", "all", "--score-thresh", "0.0", "--no-progress", "--json", str(out)]
    assert main(argv) == 1
    report = json.loads(out.read_text())
    skipped = report["settings"]["skipped_images"]
    assert len(skipped) == others and all("exported for" in s["reason"] for s in skipped), skipped
    assert len(report["images"]) == 4 - others
    assert any(f"{others} of 4 image(s) failed and were skipped" in f for f in report["failures"])
    assert "Traceback" not in capsys.readouterr().err
    # An existing --json is refused before any work, unless --overwrite.
    assert main(argv) == 2
    assert "exists already" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 1
