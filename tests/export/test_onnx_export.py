"""The ONNX export: graph contract, provenance, reproducibility, the cases known to break exports, failures."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from export_helpers import fixed_export_time, grey_image

from cellseg_deploy.backends import Runner, create_runner
from cellseg_deploy.backends.metadata import graph_sha256, read_onnx_metadata
from cellseg_deploy.backends.onnxrt.export import ExportResult, compare_raw_outputs, export_onnx
from cellseg_deploy.errors import CheckpointError, UserError
from cellseg_deploy.io_utils import sha256_file
from cellseg_deploy.postprocess import postprocess
from cellseg_deploy.structures import Detections

pytestmark = pytest.mark.slow


def _has_gpu() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_graph_contract_and_provenance(dense_export: ExportResult, dense_checkpoint: Path) -> None:
    model = onnx.load(str(dense_export.path))
    onnx.checker.check_model(model)
    (image,) = model.graph.input
    assert image.name == "image" and image.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert _dims(image) == ["height", "width", 3]
    outputs = {o.name: _dims(o) for o in model.graph.output}
    assert outputs == {"boxes": ["N", 4], "labels": ["N"], "scores": ["N"], "mask_probs": ["N", 28, 28]}
    assert model.opset_import[0].version == 17

    meta = read_onnx_metadata(dense_export.path)
    assert meta == dense_export.metadata
    assert meta["arch"] == "tiny" and meta["class_names"] == ["class1", "class2", "class3", "class4"]
    assert meta["model_config"]["detections_per_img"] == 200
    assert meta["source_sha256"] == sha256_file(dense_checkpoint)
    assert meta["opset"] == 17 and meta["exporter"].startswith("torch.onnx.export")
    assert meta["exported_at"] == "2026-01-01T00:00:00+00:00"
    assert {"torch", "torchvision", "onnx", "onnxruntime", "numpy"} <= set(meta["versions"])
    assert meta["graph_sha256"] == graph_sha256(model)
    assert dense_export.sha256 == sha256_file(dense_export.path)
    assert dense_export.size_bytes == dense_export.path.stat().st_size

    # The self-check ran on the trace image and two other sizes, with different detection counts.
    checks = dense_export.checks
    assert checks["trace_image"]["detections"] > 0
    sizes = {tuple(c["size"]) for c in checks["images"]}
    assert len(sizes) == 3 and all(c["ok"] for c in checks["images"])


def test_exporting_twice_gives_the_same_file(
    dense_export: ExportResult,
    dense_checkpoint: Path,
    cell_images: dict[str, np.ndarray],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The second export goes through the CLI, which also checks what ``export`` prints and writes."""
    from cellseg_deploy.cli.main import main

    out, report = tmp_path / "models" / "again.onnx", tmp_path / "export.json"
    with fixed_export_time():
        code = main(
            ["export", str(dense_checkpoint), "--format", "onnx", "--out", str(out), "--json", str(report)]
        )
    assert code == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and " MB) in " in printed and "check image" in printed
    result = json.loads(report.read_text())
    # Byte-identical with a fixed export time (SOURCE_DATE_EPOCH); the graph hash excludes the time anyway.
    assert result["sha256"] == sha256_file(out) == dense_export.sha256
    assert result["metadata"]["graph_sha256"] == dense_export.metadata["graph_sha256"]
    image = cell_images["non-square 180x620"]
    with create_runner("onnx", dense_export.path) as a, create_runner("onnx", out) as b:
        da, db = a.infer(image), b.infer(image)
    assert len(da) > 0
    for name in ("boxes", "labels", "scores", "mask_probs"):
        np.testing.assert_array_equal(getattr(da, name), getattr(db, name))


@pytest.fixture(scope="module")
def runners(dense_export: ExportResult, dense_checkpoint: Path) -> Iterator[tuple[Runner, Runner]]:
    """(PyTorch, ONNX Runtime) runners of the dense checkpoint, loaded once for the module."""
    with (
        create_runner("torch", dense_checkpoint) as torch_runner,
        create_runner("onnx", dense_export.path) as ort,
    ):
        yield torch_runner, ort


def _both(runners: tuple[Runner, Runner], image: np.ndarray) -> tuple[Detections, Detections, dict[str, Any]]:
    torch_runner, ort = runners
    ref, got = torch_runner.infer(image), ort.infer(image)
    cmp = compare_raw_outputs(
        [ref.boxes, ref.labels, ref.scores, ref.mask_probs],
        [got.boxes, got.labels, got.scores, got.mask_probs],
    )
    return ref, got, cmp


@pytest.mark.parametrize(
    "name", ["tiny 33x35", "large 2500x1900", "non-square 180x620", "dense 512x512, 700 cells"]
)
def test_hard_images_match_pytorch(
    runners: tuple[Runner, Runner], cell_images: dict[str, np.ndarray], name: str
) -> None:
    image = cell_images[name]
    ref, got, cmp = _both(runners, image)
    assert len(ref) > 0, "precondition: the image must give detections"
    assert cmp["ok"], cmp["reason"]
    assert len(got) == len(ref) and cmp["matched"] == len(ref)
    assert cmp["max_box_diff"] < 0.05 and cmp["max_score_diff"] < 1e-4
    if name.startswith("dense"):
        assert len(got) == 200  # hundreds of detections, up to the model's cap
    # The shared post-processing gives the same masks from both.
    from cellseg_deploy.evaluation.parity import compare_instances

    p = compare_instances(postprocess(ref), postprocess(got), score_thresh=0.0)
    assert p.missed == 0 and p.extra == 0 and p.summary()["min_iou"] > 0.95


def test_image_without_detections(runners: tuple[Runner, Runner]) -> None:
    ref, got, cmp = _both(runners, grey_image())
    assert len(ref) == 0 and len(got) == 0 and cmp["ok"]
    assert got.boxes.shape == (0, 4) and got.mask_probs.shape == (0, 28, 28)
    assert got.boxes.dtype == np.float32 and got.labels.dtype == np.int64
    inst = runners[1].predict(grey_image())
    assert len(inst) == 0 and inst.rles == []


def test_grayscale_tiff_read_as_three_channels(runners: tuple[Runner, Runner], tmp_path: Path) -> None:
    import tifffile

    from cellseg_deploy.data.io import read_image
    from cellseg_deploy.data.synth import fluorescence_cell_image

    gray = fluorescence_cell_image(200, 260, seed=9, n_cells=25)[..., 1]
    path = tmp_path / "gray.tif"
    tifffile.imwrite(path, gray)
    image = read_image(path)
    assert image.shape == (200, 260, 3) and image.dtype == np.uint8
    ref, _got, cmp = _both(runners, image)
    assert len(ref) > 0 and cmp["ok"], cmp["reason"]


def test_trace_image_without_detections_is_refused(dense_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    with pytest.raises(UserError, match="detects nothing"):
        export_onnx(dense_checkpoint, out, trace_image=grey_image())
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_missing_or_corrupt_checkpoint_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cellseg_deploy.cli.main import main

    out = tmp_path / "out" / "m.onnx"
    with pytest.raises(CheckpointError, match="does not exist"):
        export_onnx(tmp_path / "nope.pt", out)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80\x02 not a checkpoint")
    for source, expected in ((tmp_path / "nope.pt", "does not exist"), (bad, "corrupt")):
        capsys.readouterr()
        assert main(["export", str(source), "--format", "onnx", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: checkpoint") and expected in err
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_export_cli_rejects_options_of_other_formats(dense_checkpoint: Path, tmp_path: Path) -> None:
    from cellseg_deploy.cli.main import main

    out = tmp_path / "m.onnx"
    assert main(["export", str(dense_checkpoint), "--format", "onnx", "--out", str(out), "--fp16"]) == 2
    assert (
        main(
            [
                "export",
                str(dense_checkpoint),
                "--format",
                "staged",
                "--out",
                str(tmp_path / "s"),
                "--simplify",
            ]
        )
        == 2
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(_has_gpu(), reason="checks the error on machines without a GPU")
def test_export_trt_without_a_gpu_is_one_line_and_writes_nothing(
    dense_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cellseg_deploy.cli.main import main

    assert main(["export", str(dense_checkpoint), "--format", "trt", "--out", str(tmp_path / "engines")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "TensorRT" in err
    assert list(tmp_path.iterdir()) == []


def test_simplified_graph_is_kept_only_when_equal(
    dense_checkpoint: Path, dense_export: ExportResult, cell_images: dict[str, np.ndarray], tmp_path: Path
) -> None:
    result = export_onnx(dense_checkpoint, tmp_path / "slim.onnx", simplify=True)
    s = result.checks["simplify"]
    assert s["kept"], s
    assert s["nodes_after"] < s["nodes_before"]
    assert result.metadata["simplified"] is True
    assert result.metadata["graph_sha256"] != dense_export.metadata["graph_sha256"]
    image = cell_images["non-square 180x620"]
    with create_runner("onnx", dense_export.path) as plain, create_runner("onnx", result.path) as slim:
        a, b = plain.infer(image), slim.infer(image)
    cmp = compare_raw_outputs(
        [a.boxes, a.labels, a.scores, a.mask_probs], [b.boxes, b.labels, b.scores, b.mask_probs]
    )
    assert len(a) > 0 and cmp["ok"] and cmp["matched"] == len(a) == len(b)
