"""End to end: ONNX Runtime (CPU) against PyTorch on a trained tiny model and a synthetic validation set; and
broken candidates that parity must catch, through the CLI, with a report that says what differed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cellseg_deploy.evaluation.parity import run_parity

pytestmark = pytest.mark.slow


def test_onnx_runtime_matches_pytorch_fp32(parity_model: tuple[Path, Path], parity_onnx: Path) -> None:
    checkpoint, data_root = parity_model
    report = run_parity(checkpoint, parity_onnx, "onnx", data_root, images=6, profile="fp32", progress=False)
    o = report.overall
    assert o["n_ref"] >= 20, (
        f"precondition: the trained model must find cells scoring >= 0.5 (found {o['n_ref']})"
    )
    assert report.passed, report.table()
    # At least 99% of the reference's instances scoring >= 0.5 matched with mask IoU >= 0.95.
    assert report.profile.strong_iou == 0.95 and o["strong_match_frac"] >= 0.99
    # segm AP50 against the ground truth: the two backends agree within 0.002.
    gt = report.ap50_gt
    assert gt["reference"] is not None and gt["candidate"] is not None
    assert abs(gt["candidate"] - gt["reference"]) <= 0.002
    assert o["ap50_vs_ref"] is not None and o["ap50_vs_ref"] >= 0.99
    assert report.candidate["providers"] == ["CPUExecutionProvider"] and report.reference["runner"] == "torch"
    assert "PASSED" in report.table()


def _cli_parity(
    checkpoint: Path, candidate: Path, data_root: Path, out: Path, *extra: str
) -> tuple[int, dict[str, Any]]:
    from cellseg_deploy.cli.main import main

    code = main(
        [
            "parity",
            str(checkpoint),
            "--candidate",
            str(candidate),
            "--data",
            str(data_root),
            "--images",
            "3",
            "--no-progress",
            "--json",
            str(out),
            *extra,
        ]
    )
    return code, json.loads(out.read_text())


def test_candidate_from_another_checkpoint_fails(
    parity_model: tuple[Path, Path], other_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint, data_root = parity_model
    code, report = _cli_parity(checkpoint, other_onnx, data_root, tmp_path / "report.json")
    assert code == 1 and report["passed"] is False
    failed = " ".join(report["failures"])
    assert "missed_frac" in failed  # the trained model's cells are not found by the random model
    assert report["overall"]["missed"] > 0
    captured = capsys.readouterr()
    assert "FAILED" in captured.out and "missed_frac" in captured.out  # the table says it too
    assert captured.err.strip().splitlines()[-1].startswith("FAILED: parity (fp32) failed")


def test_scaled_mask_probabilities_fail_on_masks_only(
    parity_model: tuple[Path, Path], scaled_mask_onnx: Path, tmp_path: Path
) -> None:
    checkpoint, data_root = parity_model
    code, report = _cli_parity(checkpoint, scaled_mask_onnx, data_root, tmp_path / "report.json")
    assert code == 1 and report["passed"] is False
    failed = {f.split(" ")[0] for f in report["failures"]}
    # The masks shrank: mask IoU checks fail ...
    assert {"mean_iou", "strong_match_frac"} <= failed, report["failures"]
    # ... while boxes and scores, which the edit did not touch, still agree (the report pins the cause).
    assert not failed & {"max_box_diff", "p99_box_diff", "max_score_diff"}
    assert report["overall"]["max_box_diff"] < 0.05


def test_tolerance_overrides_from_the_cli(
    parity_model: tuple[Path, Path], scaled_mask_onnx: Path, tmp_path: Path
) -> None:
    checkpoint, data_root = parity_model
    loose = [
        "--tol",
        "min_mask_iou_mean=0",
        "--tol",
        "min_mask_iou_p1=0",
        "--tol",
        "min_strong_match_frac=0",
        "--tol",
        "min_ap50_vs_ref=0",
        "--tol",
        "max_ap50_gt_diff=1",
        "--tol",
        "max_missed_frac=1",
        "--tol",
        "max_extra_frac=1",
    ]
    code, report = _cli_parity(checkpoint, scaled_mask_onnx, data_root, tmp_path / "r.json", *loose)
    assert code == 0 and report["passed"] and report["profile"]["name"] == "fp32+custom"
    from cellseg_deploy.cli.main import main

    assert (
        main(
            [
                "parity",
                str(checkpoint),
                "--candidate",
                str(scaled_mask_onnx),
                "--data",
                str(data_root),
                "--tol",
                "max_bogus=1",
            ]
        )
        == 2
    )
