"""End to end: ONNX Runtime (CPU) against PyTorch on the trained tiny model and its synthetic validation set;
and broken candidates that parity must catch, through the CLI, with a report that says what differed (another
checkpoint; mask probabilities scaled by 0.7; mask logits scaled by 2 or 0.5, which only the mask probability
check sees reliably)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from parity_helpers import ParityModel

from cellseg_deploy.cli.main import main
from cellseg_deploy.evaluation.parity import run_parity

pytestmark = pytest.mark.slow


def test_onnx_runtime_matches_pytorch_fp32(parity_model: ParityModel, parity_onnx: Path) -> None:
    m = parity_model
    report = run_parity(
        m.checkpoint, parity_onnx, "onnx", m.data_root, images=6, profile="fp32", score_thresh=m.score_thresh,
        progress=False,
    )  # fmt: skip
    o = report.overall
    assert o["n_ref"] >= 20, (
        f"precondition: the model must find cells scoring >= {m.score_thresh} ({o['n_ref']})"
    )
    assert report.passed, report.table()
    # At least 99% of the reference's instances scoring >= 0.5 are matched with mask IoU >= 0.95.
    assert report.profile.strong_iou == 0.95 and o["strong_match_frac"] >= 0.99
    # segm AP50 against the ground truth: the two backends agree within 0.002.
    gt = report.ap50_gt
    assert gt["reference"] is not None and gt["candidate"] is not None
    assert abs(gt["candidate"] - gt["reference"]) <= 0.002
    assert o["agreement"] is not None and o["agreement"] >= 0.99
    # The mask head's probabilities agree too (rounding noise, ~1e-5), on every matched pair.
    assert o["mask_prob_pairs"] == o["matched"] and o["mask_probs_skipped"] is None
    assert o["p99_mask_prob_diff"] is not None and o["p99_mask_prob_diff"] < 1e-3
    assert report.candidate["providers"] == ["CPUExecutionProvider"] and report.reference["runner"] == "torch"
    assert "PASSED" in report.table()


def _cli_parity(m: ParityModel, candidate: Path, out: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    args = ["parity", str(m.checkpoint), "--candidate", str(candidate), "--data", str(m.data_root)]
    args += [
        "--limit",
        "3",
        "--score-thresh",
        str(m.score_thresh),
        "--no-progress",
        "--json",
        str(out),
        *extra,
    ]
    return main(args), json.loads(out.read_text())


def test_candidate_from_another_checkpoint_fails(
    parity_model: ParityModel, other_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report = _cli_parity(parity_model, other_onnx, tmp_path / "report.json")
    assert code == 1 and report["passed"] is False
    assert any(f.startswith("missed_frac") for f in report["failures"]), report["failures"]
    assert report["overall"]["missed"] > 0
    captured = capsys.readouterr()
    assert "FAILED" in captured.out and "missed_frac" in captured.out  # the printed table says it too
    assert captured.err.strip().splitlines()[-1].startswith("FAILED: parity (fp32) failed: missed_frac")


def test_scaled_mask_probabilities_fail_on_masks_only(
    parity_model: ParityModel, scaled_mask_onnx: Path, tmp_path: Path
) -> None:
    code, report = _cli_parity(parity_model, scaled_mask_onnx, tmp_path / "report.json")
    assert code == 1 and report["passed"] is False
    failed = {f.split(" ")[0] for f in report["failures"]}
    # The masks shrank: the mask checks fail ...
    assert "strong_match_frac" in failed, report["failures"]
    assert "p99_mask_prob_diff" in failed and 0.1 < report["overall"]["max_mask_prob_diff"] <= 0.3 + 1e-6
    if (
        parity_model.trained
    ):  # (random weights' masks sit at p ~ 0.5: scaled, they vanish and nothing matches)
        assert "mean_iou" in failed, report["failures"]
    # ... while boxes and scores, which the edit did not touch, still agree: the report pins the cause.
    assert not failed & {"max_box_diff", "p99_box_diff", "max_score_diff"}, report["failures"]
    assert report["overall"]["max_box_diff"] is None or report["overall"]["max_box_diff"] < 0.05


@pytest.mark.parametrize("factor", [2.0, 0.5])
def test_scaled_mask_logits_fail_on_mask_probabilities(
    parity_model: ParityModel,
    scaled_logits_onnx: Callable[[float], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    factor: float,
) -> None:
    """Mask logits scaled by 2 (or 0.5) before the Sigmoid: the binary masks, thresholded at 0.5, barely
    change (x2 passed the fp32 profile before the mask probability check), the probabilities do."""
    code, report = _cli_parity(parity_model, scaled_logits_onnx(factor), tmp_path / "report.json")
    assert code == 1 and report["passed"] is False
    failed = {f.split(" ")[0] for f in report["failures"]}
    assert "p99_mask_prob_diff" in failed, report["failures"]
    # max |sigmoid(2x) - sigmoid(x)| = 0.150, reached on every confident mask's edge
    assert report["overall"]["p99_mask_prob_diff"] == pytest.approx(0.150, abs=0.01)
    assert not failed & {"max_box_diff", "p99_box_diff", "max_score_diff"}, report["failures"]
    assert "p99_mask_prob_diff" in capsys.readouterr().err.strip().splitlines()[-1]


def test_tolerance_overrides_from_the_cli(
    parity_model: ParityModel, scaled_mask_onnx: Path, tmp_path: Path
) -> None:
    limits = ["min_mask_iou_mean=0", "min_mask_iou_p1=0", "min_strong_match_frac=0", "min_agreement=0",
              "max_ap50_gt_diff=1", "max_missed_frac=1", "max_extra_frac=1", "max_mask_prob_diff_p99=1"]  # fmt: skip
    loose = [arg for limit in limits for arg in ("--tol", limit)]
    code, report = _cli_parity(parity_model, scaled_mask_onnx, tmp_path / "r.json", *loose)
    assert code == 0 and report["passed"] and report["profile"]["name"] == "fp32+custom"
    assert report["profile"]["min_mask_iou_mean"] == 0
    bad = ["parity", str(parity_model.checkpoint), "--candidate", str(scaled_mask_onnx)]
    assert main([*bad, "--data", str(parity_model.data_root), "--tol", "max_bogus=1"]) == 2


def _overlaps_and_empty_masks(checkpoint: Path, data_root: Path, score_thresh: float) -> tuple[int, int]:
    """Same-class pairs of the reference's instances (``>= score_thresh``) whose masks overlap, and empty
    masks among them, over the whole training folder."""
    from cellseg_deploy.backends import create_runner
    from cellseg_deploy.data.rle import rle_area, rle_iou
    from cellseg_deploy.evaluation.predict import run_dataset
    from cellseg_deploy.postprocess import PostprocessConfig

    with create_runner("torch", checkpoint) as runner:
        _, preds = run_dataset(
            runner, data_root, "all", post=PostprocessConfig(score_thresh=score_thresh), progress=False
        )
    overlaps = empty = 0
    for inst in preds.values():
        empty += sum(rle_area(r) == 0 for r in inst.rles)
        for label in set(inst.labels.tolist()):
            rles = [r for r, lab in zip(inst.rles, inst.labels, strict=True) if lab == label]
            iou = rle_iou(rles, rles)
            overlaps += int(((iou > 0) & ~np.eye(len(rles), dtype=bool)).sum()) // 2
    return overlaps, empty


@pytest.fixture(scope="module")
def overlaps_and_empty(parity_model: ParityModel) -> tuple[int, int]:
    """:func:`_overlaps_and_empty_masks` of the parity model at 0.05, computed once for the cases below."""
    return _overlaps_and_empty_masks(parity_model.checkpoint, parity_model.data_root, 0.05)


@pytest.mark.parametrize("score_thresh", [0.05, 0.5])
@pytest.mark.parametrize("candidate", ["itself", "onnx"])
def test_identical_candidates_agree_exactly(
    parity_model: ParityModel,
    parity_onnx: Path,
    overlaps_and_empty: tuple[int, int],
    tmp_path: Path,
    candidate: str,
    score_thresh: float,
) -> None:
    """The checkpoint against itself and against its fp32 export, on every training image, at a low and the
    default threshold: the agreement is exactly 1.0 although the reference holds overlapping same-class
    detections and empty masks (where COCOeval of one set against itself stays below 1)."""
    m = parity_model
    overlaps, empty = overlaps_and_empty
    assert overlaps > 0 and empty > 0, f"precondition: overlaps {overlaps}, empty masks {empty} at 0.05"
    model, engine = (m.checkpoint, "torch") if candidate == "itself" else (parity_onnx, "onnx")
    argv = [
        "parity",
        str(m.checkpoint),
        "--candidate",
        str(model),
        "--engine",
        engine,
        "--data",
        str(m.data_root),
    ]
    argv += [
        "--split",
        "all",
        "--score-thresh",
        str(score_thresh),
        "--no-progress",
        "--json",
        str(tmp_path / "r.json"),
    ]
    code = main(argv)
    report = json.loads((tmp_path / "r.json").read_text())
    checks = {c["key"]: c for c in report["checks"]}
    assert code == 0, report["failures"]
    assert checks["agreement"]["value"] == 1.0 and checks["agreement"]["judged"], checks["agreement"]
    assert checks["agreement"]["n"] >= 20 and report["overall"]["missed"] == report["overall"]["extra"] == 0
    if candidate == "itself":
        assert report["overall"]["max_box_diff"] == 0.0 and report["overall"]["max_score_diff"] == 0.0


def test_nothing_above_the_threshold_fails_in_one_line(
    parity_model: ParityModel, parity_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    m = parity_model
    argv = ["parity", str(m.checkpoint), "--candidate", str(parity_onnx), "--data", str(m.data_root)]
    argv += ["--limit", "2", "--score-thresh", "1.0", "--no-progress", "--json", str(tmp_path / "r.json")]
    assert main(argv) == 1
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] is False and report["overall"]["n_ref"] == report["overall"]["n_cand"] == 0
    assert report["failures"] == [report["failures"][0]] and report["failures"][0].startswith(
        "nothing was compared"
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(
        "FAILED: parity (fp32) failed: nothing was compared: no instance of either side"
    )


def test_a_checkpoint_agrees_with_itself_on_the_real_sample(
    parity_model: ParityModel, hw3_sample: Path, tmp_path: Path
) -> None:
    """The users' own data (125+ touching nuclei) with a model never trained on it: many overlapping low-score
    detections. The checkpoint against itself passes with agreement exactly 1.0."""
    argv = ["parity", str(parity_model.checkpoint), "--candidate", str(parity_model.checkpoint), "--engine"]
    argv += ["torch", "--data", str(hw3_sample), "--split", "all", "--score-thresh", "0.05", "--no-progress"]
    assert main([*argv, "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    agreement = next(c for c in report["checks"] if c["key"] == "agreement")
    assert agreement["value"] == 1.0 and agreement["n"] >= 20
