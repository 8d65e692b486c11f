"""``scorecard``: one table per model whose figures are those of ``eval``, ``parity`` and ``bench``.

Real models (the trained tiny checkpoint, its ONNX export made here), real COCOeval, real ONNX Runtime.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cellseg_deploy.bench.scorecard import HEADERS, ScorecardRequest, model_size_bytes, run_scorecard


@pytest.fixture(scope="module")
def card(trained_tiny, tmp_path_factory: pytest.TempPathFactory) -> dict:
    checkpoint, data_root = trained_tiny
    out = tmp_path_factory.mktemp("scorecard")
    return run_scorecard(
        ScorecardRequest(
            checkpoint=Path(checkpoint),
            data=Path(data_root),
            engines=("onnx", "trt:fp16"),  # torch is added first: the reference
            out_dir=out,
            iters=1,
            warmup=0,
            memory=False,
            threads=1,
        )
    )


@pytest.mark.slow
def test_one_row_per_engine_reference_first_and_skips_said(card: dict) -> None:
    assert [r["engine"] for r in card["rows"]] == ["torch", "onnx", "trt:fp16"]
    assert "TensorRT" in card["skipped"]["trt:fp16"]
    md = Path(card["outputs"]["markdown"]).read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table[0] == "| " + " | ".join(HEADERS) + " |"
    assert [line.split(" | ")[0][2:] for line in table[1:]] == ["torch", "onnx", "trt:fp16"]
    assert "skipped trt:fp16" in md
    assert json.loads(Path(card["outputs"]["json"]).read_text())["rows"][1]["engine"] == "onnx"
    assert Path(card["outputs"]["chart"]).stat().st_size > 5000


@pytest.mark.slow
def test_accuracy_is_what_eval_gives(card: dict, trained_tiny) -> None:
    from cellseg_deploy.evaluation.predict import evaluate_model

    _checkpoint, data_root = trained_tiny
    rows = {r["engine"]: r for r in card["rows"]}
    for engine in ("torch", "onnx"):
        path = rows[engine]["model"]["path"]
        m = evaluate_model(path, engine, data_root, "val", max_dets=100, progress=False).metrics["segm"]
        assert rows[engine]["accuracy"]["AP50"] == pytest.approx(m["AP50"], abs=1e-9)
        assert rows[engine]["accuracy"]["AP"] == pytest.approx(m["AP"], abs=1e-9)


@pytest.mark.slow
def test_parity_is_what_parity_gives(card: dict, trained_tiny) -> None:
    from cellseg_deploy.evaluation.parity import run_parity

    checkpoint, data_root = trained_tiny
    row = next(r for r in card["rows"] if r["engine"] == "onnx")
    report = run_parity(checkpoint, row["model"]["path"], "onnx", data_root, progress=False)
    assert row["parity"]["verdict"] == ("PASS" if report.passed else "FAIL")
    for key in ("matched", "missed", "extra", "agreement", "max_box_diff", "mean_iou"):
        assert row["parity"][key] == pytest.approx(report.overall[key]), key
    assert row["parity"]["instances"] >= 20  # a verdict that rests on evidence
    assert next(r for r in card["rows"] if r["engine"] == "torch")["parity"]["verdict"] == "reference"


@pytest.mark.slow
def test_speed_model_size_and_threads(card: dict) -> None:
    rows = {r["engine"]: r for r in card["rows"]}
    assert rows["torch"]["speed"]["speedup_p50"] == pytest.approx(1.0)
    assert rows["onnx"]["speed"]["p50_ms"] > 0
    assert rows["onnx"]["model"]["size_bytes"] == Path(rows["onnx"]["model"]["path"]).stat().st_size
    assert card["bench"]["threads"] == "1"
    bench = json.loads(Path(card["bench"]["json"]).read_text())
    assert list(bench["engines"]) == ["torch", "onnx"]
    assert card["request"]["device"] == "cpu" and bench["settings"]["device"] == "cpu"


def test_model_size_counts_the_openvino_weights_and_folders(tmp_path: Path) -> None:
    (tmp_path / "m.xml").write_bytes(b"x" * 10)
    (tmp_path / "m.bin").write_bytes(b"x" * 100)
    assert model_size_bytes(tmp_path / "m.xml") == 110
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.onnx").write_bytes(b"x" * 7)
    assert model_size_bytes(tmp_path) == 117


def test_cli_refuses_a_missing_checkpoint_in_one_line(tmp_path: Path, capsys) -> None:
    from cellseg_deploy.cli.main import main

    code = main(
        ["scorecard", str(tmp_path / "nope.pt"), "--data", str(tmp_path), "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "nope.pt" in err[0]


def test_device_is_normalised_and_a_bad_one_refused_in_one_line(tmp_path: Path, capsys) -> None:
    from cellseg_deploy.cli.main import main
    from cellseg_deploy.errors import ConfigError

    def request(device: str) -> ScorecardRequest:
        return ScorecardRequest(checkpoint=tmp_path / "c.pt", data=tmp_path, engines=("onnx",), device=device)

    assert request("cuda").device == "cuda:0" and request("CPU").device == "cpu"
    with pytest.raises(ConfigError, match="gpu"):
        request("gpu")
    code = main(["scorecard", str(tmp_path / "c.pt"), "--data", str(tmp_path), "--device", "gpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "'gpu'" in err[0]


def test_cli_device_reaches_the_runners(random_tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    """``--device cuda:0`` is the device the reference runner is created on: without a GPU, it says so."""
    import torch

    from cellseg_deploy.cli.main import main
    from cellseg_deploy.data.synth import SynthConfig, make_synthetic_dataset

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the CPU-only refusal cannot be seen here")
    data = tmp_path / "data"
    make_synthetic_dataset(data, SynthConfig(n_train=2, n_test=1, min_size=64, max_size=96), progress=False)
    args = ["scorecard", str(random_tiny_checkpoint), "--data", str(data), "--engine", "torch"]
    code = main([*args, "--split", "all", "--out", str(tmp_path / "o"), "--device", "cuda:0"])
    err = capsys.readouterr().err
    assert code == 2 and "device 'cuda:0' asked for" in err, err
