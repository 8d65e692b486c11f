"""``bench`` compares only models it checked: a ``--model-for`` file must record that it was exported from
``--model`` (the provenance every export writes), else one line and exit 2, unless ``--allow-mismatch``
(then the table marks it); engines whose detections per image differ from the reference's are flagged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cellseg_deploy.bench.models import recorded_source, resolve_engine_models
from cellseg_deploy.cli.main import main
from cellseg_deploy.errors import UserError
from cellseg_deploy.io_utils import sha256_file


@pytest.fixture(scope="module")
def two_exports(
    random_tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path, Path]:
    """``(checkpoint A, A's ONNX export, the ONNX export of another checkpoint B)``."""
    import torch

    from cellseg_deploy.backends.onnxrt.export import export_onnx
    from cellseg_deploy.modeling import ModelConfig, build_model, save_checkpoint

    folder = tmp_path_factory.mktemp("provenance")
    torch.manual_seed(7)
    config = ModelConfig(arch="tiny", min_size=256, max_size=512)
    other = save_checkpoint(folder / "other.pt", build_model(config), config)
    own_onnx, other_onnx = folder / "own.onnx", folder / "other.onnx"
    export_onnx(random_tiny_checkpoint, own_onnx)
    export_onnx(other, other_onnx)
    return random_tiny_checkpoint, own_onnx, other_onnx


def test_recorded_source_reads_the_export_provenance(
    two_exports: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    ckpt, own, other = two_exports
    assert recorded_source(own) == sha256_file(ckpt)
    assert recorded_source(other) not in (None, sha256_file(ckpt))
    assert recorded_source(ckpt) == sha256_file(ckpt)
    (tmp_path / "manifest.json").write_text(json.dumps({"checkpoint": {"sha256": "ab" * 32}}))
    assert recorded_source(tmp_path) == "ab" * 32
    (tmp_path / "engines.json").write_text(json.dumps({"checkpoint_sha256": "cd" * 32}))
    assert recorded_source(tmp_path / "engines.json") == "cd" * 32


def test_a_file_from_another_checkpoint_is_refused_or_marked(two_exports: tuple[Path, Path, Path]) -> None:
    ckpt, own, other = two_exports
    models = resolve_engine_models(["torch", "onnx"], checkpoint=ckpt, model_for={"onnx": own})
    assert models["onnx"].provenance == "verified" and models["torch"].provenance == ""
    with pytest.raises(UserError, match=r"was exported from another checkpoint .* --allow-mismatch"):
        resolve_engine_models(["torch", "onnx"], checkpoint=ckpt, model_for={"onnx": other})
    allowed = resolve_engine_models(
        ["torch", "onnx"], checkpoint=ckpt, model_for={"onnx": other}, allow_mismatch=True
    )
    assert allowed["onnx"].provenance == "mismatch"
    # Without --model there is nothing to compare with: the file is taken as given.
    assert resolve_engine_models(["onnx"], model_for={"onnx": other})["onnx"].provenance == ""


def test_bench_cli_refuses_then_marks_the_mismatch(
    two_exports: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, _, other = two_exports
    argv = ["bench", "--engine", "torch,onnx", "--model", str(ckpt), "--model-for", f"onnx={other}"]
    argv += [
        "--imgsz",
        "128",
        "--cells",
        "8",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--no-memory",
        "--isolation",
        "shared",
    ]
    argv += ["--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "was exported from another checkpoint" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "out").exists()

    assert main([*argv, "--allow-mismatch", "--json", str(tmp_path / "r.json")]) == 0
    stdout = capsys.readouterr().out
    assert "onnx [other model]" in stdout
    assert "NOT exported from --model (--allow-mismatch)" in stdout
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["engines"]["onnx"]["model"]["provenance"] == "mismatch"
    assert any("not shown to be exported from --model" in w for w in result["warnings"])


def test_detections_that_differ_from_the_reference_are_flagged() -> None:
    from cellseg_deploy.bench.report import MAIN_HEADERS, main_rows
    from cellseg_deploy.bench.runner_bench import detections_differ

    def engine(dets: float) -> dict[str, object]:
        lat = dict.fromkeys(("n", "mean_ms", "std_ms", "p50_ms", "p90_ms", "p99_ms", "min_ms", "max_ms"), 1.0)
        return {"latency": {**lat, "throughput_ips": 1.0}, "detections_per_image": {"mean": dets}, "info": {}}

    result = {"engines": {"torch": engine(65.0), "onnx": engine(42.0), "openvino": engine(65.2)}}
    assert detections_differ(result) == {"onnx": (42.0, 65.0)}
    rows = {r[0]: r for r in main_rows(result)}
    dets = MAIN_HEADERS.index("dets/img")
    assert rows["onnx"][dets] == "42.0 *" and rows["openvino"][dets] == "65.2"
