"""The CI gates of the mission, end to end through the command line.

A tiny model trained for a bounded number of steps on synthetic data (the ``trained_tiny`` fixture) is exported
with ``cellseg-deploy export`` and checked with ``cellseg-deploy parity``, exactly as a user or a CI job would:

- ONNX (single graph, fp32): parity passes with the fp32 profile, the agreement of the matching is at least
  the profile's, and segm AP50 against the ground truth differs from PyTorch's by at most :data:`ONNX_AP50_GATE`.
- Staged graphs run by ONNX Runtime, fp32 and fp16: parity passes with the matching profile and segm AP50 differs
  by at most :data:`STAGED_AP50_GATE`.

Every gate runs on all images of the fixture's set (``--split all``, about 490 ground-truth cells), not on its 2
validation images (about 60): an AP50 gate is only as good as the instances behind it (one flipped instance moves
AP50 by about 1/n), so the tests assert that parity judged it (``n >= 2 / tolerance``) before trusting it. The
fp32 limit (0.002) would need 1000 cells to be judged by parity; there the agreement and per-pair checks carry the
verdict and the AP50 difference is asserted as a value.
- A broken ONNX export, its mask logits multiplied by 2 before the mask head's Sigmoid: the binary masks,
  thresholded at 0.5, barely change (this candidate used to pass the fp32 profile), so the gate must fail it on
  the mask probability check (``p99_mask_prob_diff``: the mask head's probabilities before pasting), exit code 1.

More broken exports (another checkpoint, mask probabilities scaled by 0.7, mask logits scaled by 2 or 0.5)
and what their reports say: ``tests/parity/test_parity_onnx.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cellseg_deploy.cli.main import main
from cellseg_deploy.evaluation.parity import PROFILES, min_gt_for_ap_gate
from tests.parity.parity_helpers import scale_mask_logits

ONNX_AP50_GATE = 0.002
STAGED_AP50_GATE = 0.01

pytestmark = pytest.mark.slow


def _run_parity(
    checkpoint: Path, candidate: Path, engine: str, data: Path, profile: str, out: Path
) -> tuple[int, dict]:  # type: ignore[type-arg]
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
            "--precision",
            profile,
            "--split",
            "all",
            "--no-progress",
            "--json",
            str(out),
        ]
    )
    return code, json.loads(out.read_text())


def _parity(checkpoint: Path, candidate: Path, engine: str, data: Path, profile: str, out: Path) -> dict:  # type: ignore[type-arg]
    code, report = _run_parity(checkpoint, candidate, engine, data, profile, out)
    assert code == 0, f"parity gate failed for {engine} {profile}: {report.get('failures')}"
    return report


def test_onnx_export_passes_the_parity_and_ap50_gates(trained_tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    checkpoint, data = trained_tiny
    onnx_path = tmp_path / "model.onnx"
    assert main(["export", str(checkpoint), "--format", "onnx", "--out", str(onnx_path)]) == 0
    report = _parity(checkpoint, onnx_path, "onnx", data, "fp32", tmp_path / "parity.json")
    ap = report["ap50_gt"]
    assert ap["reference"] is not None and ap["reference"] > 0.2, "the gate needs a model that finds cells"
    assert abs(ap["diff"]) <= ONNX_AP50_GATE
    checks = {c["key"]: c for c in report["checks"]}
    assert checks["agreement"]["judged"] and checks["agreement"]["n"] >= 200, checks["agreement"]
    assert checks["agreement"]["value"] >= PROFILES["fp32"].min_agreement
    assert checks["ap50_gt_diff"]["n"] == ap["n_gt"] >= 400


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_staged_export_passes_the_parity_and_ap50_gates(trained_tiny, tmp_path: Path, precision: str) -> None:  # type: ignore[no-untyped-def]
    checkpoint, data = trained_tiny
    stages = tmp_path / "stages"
    assert main(["export", str(checkpoint), "--format", "staged", "--out", str(stages), "--fp16"]) == 0
    report = _parity(checkpoint, stages, "staged-onnx", data, precision, tmp_path / "parity.json")
    assert abs(report["ap50_gt"]["diff"]) <= STAGED_AP50_GATE
    if precision == "fp16":  # 0.01 needs 200 ground-truth cells: judged by parity itself
        gate = next(c for c in report["checks"] if c["key"] == "ap50_gt_diff")
        assert gate["judged"] and gate["n"] >= min_gt_for_ap_gate(STAGED_AP50_GATE), gate


def test_onnx_export_with_scaled_mask_logits_fails_the_parity_gate(  # type: ignore[no-untyped-def]
    trained_tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint, data = trained_tiny
    onnx_path = tmp_path / "model.onnx"
    assert main(["export", str(checkpoint), "--format", "onnx", "--out", str(onnx_path)]) == 0
    scaled = scale_mask_logits(onnx_path, tmp_path / "model-mask-logits-x2.onnx", 2.0)
    code, report = _run_parity(checkpoint, scaled, "onnx", data, "fp32", tmp_path / "parity.json")
    assert code == 1 and report["passed"] is False
    failed = [f.split(" ")[0] for f in report["failures"]]
    assert "p99_mask_prob_diff" in failed, report["failures"]
    assert report["overall"]["p99_mask_prob_diff"] > 10 * PROFILES["fp32"].max_mask_prob_diff_p99
    # Boxes and scores come from other heads and are untouched: the report points at the masks.
    assert not {"max_box_diff", "p99_box_diff", "max_score_diff"} & set(failed), report["failures"]
    captured = capsys.readouterr()
    assert "p99_mask_prob_diff" in captured.err.strip().splitlines()[-1]  # the one-line error names it
    assert "FAILED" in captured.out
