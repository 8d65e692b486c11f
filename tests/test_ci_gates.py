"""The CI gates of the mission, end to end through the command line.

A tiny model trained for a bounded number of steps on synthetic data (the ``trained_tiny`` fixture) is exported
with ``cellseg-deploy export`` and checked with ``cellseg-deploy parity``, exactly as a user or a CI job would:

- ONNX (single graph, fp32): parity passes with the fp32 profile and segm AP50 against the ground truth differs
  from PyTorch's by at most :data:`ONNX_AP50_GATE`.
- Staged graphs run by ONNX Runtime, fp32 and fp16: parity passes with the matching profile and segm AP50 differs
  by at most :data:`STAGED_AP50_GATE`.

Breaking an export (another checkpoint, scaled mask logits) makes the parity command exit 1: see
``tests/parity/test_parity_onnx.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cellseg_deploy.cli.main import main

ONNX_AP50_GATE = 0.002
STAGED_AP50_GATE = 0.01

pytestmark = pytest.mark.slow


def _parity(checkpoint: Path, candidate: Path, engine: str, data: Path, profile: str, out: Path) -> dict:  # type: ignore[type-arg]
    code = main(
        [
            "parity",
            str(checkpoint),
            "--candidate",
            str(candidate),
            "--engine",
            engine,
            "--data",
            str(data),
            "--profile",
            profile,
            "--no-progress",
            "--json",
            str(out),
        ]
    )
    report = json.loads(out.read_text())
    assert code == 0, f"parity gate failed for {engine} {profile}: {report.get('failures')}"
    return report  # type: ignore[no-any-return]


def test_onnx_export_passes_the_parity_and_ap50_gates(trained_tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    checkpoint, data = trained_tiny
    onnx_path = tmp_path / "model.onnx"
    assert main(["export", str(checkpoint), "--format", "onnx", "--out", str(onnx_path)]) == 0
    report = _parity(checkpoint, onnx_path, "onnx", data, "fp32", tmp_path / "parity.json")
    ap = report["ap50_gt"]
    assert ap["reference"] is not None and ap["reference"] > 0.2, "the gate needs a model that finds cells"
    assert abs(ap["diff"]) <= ONNX_AP50_GATE


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_staged_export_passes_the_parity_and_ap50_gates(trained_tiny, tmp_path: Path, precision: str) -> None:  # type: ignore[no-untyped-def]
    checkpoint, data = trained_tiny
    stages = tmp_path / "stages"
    assert main(["export", str(checkpoint), "--format", "staged", "--out", str(stages), "--fp16"]) == 0
    report = _parity(checkpoint, stages, "staged-onnx", data, precision, tmp_path / "parity.json")
    assert abs(report["ap50_gt"]["diff"]) <= STAGED_AP50_GATE
