"""``benchmarks/cpu_accuracy.py``: every CPU engine's AP on one trained model, side by side, with parity.

Runs the script's ``run`` on the session's trained tiny model with a small synthetic case (real exports, real
ONNX Runtime and OpenVINO sessions, real COCO evaluation); the verdict logic is checked on hand-made rows.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import cpu_accuracy

pytest.importorskip("openvino", reason="OpenVINO is not installed: pip install 'cellseg-deploy[openvino]'")


def test_sized_checkpoint_moves_only_the_input_size(trained_tiny, tmp_path: Path) -> None:
    import torch

    from cellseg_deploy.modeling import load_checkpoint

    source = load_checkpoint(trained_tiny.checkpoint)
    out = cpu_accuracy.sized_checkpoint(trained_tiny.checkpoint, tmp_path / "m.pt", 512)
    sized = load_checkpoint(out)
    assert (sized.model_config.min_size, sized.model_config.max_size) == (512, 1024)
    assert sized.model_config.arch == source.model_config.arch
    assert sized.model_config.detections_per_img == source.model_config.detections_per_img
    assert sized.state_dict.keys() == source.state_dict.keys()
    assert all(torch.equal(sized.state_dict[k], v) for k, v in source.state_dict.items())
    assert sized.build_model().transform.min_size == (512,)
    stamp = out.stat().st_mtime_ns
    cpu_accuracy.sized_checkpoint(trained_tiny.checkpoint, out, 512)
    assert out.stat().st_mtime_ns == stamp, "an up-to-date sized checkpoint is rewritten"
    cpu_accuracy.sized_checkpoint(trained_tiny.checkpoint, out, 256)
    assert load_checkpoint(out).model_config.min_size == 256


def test_run_scores_every_engine_on_the_same_images(trained_tiny, tmp_path: Path) -> None:
    small = cpu_accuracy.Case("s160", side=160, cells=(10, 20), test_images=2, calib_images=4, max_dets=100)
    engines = ("torch", "onnx", "openvino:int8")
    summary = cpu_accuracy.run(
        trained_tiny.checkpoint,
        trained_tiny.data_root,
        tmp_path / "out",
        tmp_path / "cache",
        (cpu_accuracy.Case("val"), small),
        engines,
        threads=1,
    )
    for name in ("summary.json", "summary.md", "ap50.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["passed"] == summary["passed"]
    assert summary["passed"] == cpu_accuracy.passed(summary["cases"])

    val, synth = summary["cases"]["val"], summary["cases"]["s160"]
    assert (val["split"], synth["split"]) == ("val", "test")
    assert [r["engine"] for r in synth["rows"]] == list(engines)
    # every engine scored the same images and ground truth
    for case in (val, synth):
        assert len({(e["num_images"], json.dumps(e["num_gt"])) for e in case["eval"].values()}) == 1
    assert synth["eval"]["torch"]["num_images"] == 2
    torch_row, onnx_row, int8_row = synth["rows"]
    assert torch_row["segm_AP50_diff"] == 0.0 and torch_row["parity"] is None
    assert onnx_row["segm_AP50"] > 0.2, "the trained model finds cells on the synthetic case"
    assert abs(onnx_row["segm_AP50_diff"]) <= 0.01, "fp32 ONNX Runtime must score as PyTorch does"
    assert int8_row["parity"] in (True, False)
    assert synth["parity"]["openvino:int8"]["profile"]["name"] == "int8"
    # the synthetic case ran the checkpoint sized for its images and calibrated int8 on its training split
    from cellseg_deploy.modeling import load_checkpoint

    assert load_checkpoint(synth["checkpoint"]).model_config.min_size == 160
    runner = synth["eval"]["openvino:int8"]["info"]["runner"]
    assert "s160" in json.dumps(runner), runner
    # the int8 IR quantises the case's own ONNX export; both are reused while the checkpoint is unchanged
    from cellseg_deploy.io_utils import sha256_file

    folder = tmp_path / "cache" / "s160"
    assert runner["quantisation"]["onnx_sha256"] == sha256_file(folder / "model.onnx")
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.glob("model.*")}
    models = cpu_accuracy.export_models(folder / "model.pt", folder, Path(synth["data"]), engines)
    assert models["openvino:int8"] == folder / "model.int8.xml"
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("model.*")} == stamps


def test_proposals_retune_every_engine_and_are_reported(trained_tiny, tmp_path: Path) -> None:
    from cellseg_deploy.modeling import load_checkpoint

    def run() -> dict:
        return cpu_accuracy.run(
            trained_tiny.checkpoint,
            trained_tiny.data_root,
            tmp_path / "out",
            tmp_path / "cache",
            (cpu_accuracy.Case("val"),),
            ("torch",),
            threads=1,
            proposals=50,
        )

    summary = run()
    assert (summary["proposals"], summary["pre_nms_top_n"], summary["retuned"]) == (50, 50, True)
    assert summary["checkpoint"] == str(trained_tiny.checkpoint)  # the source is named, not the copy
    scored = Path(summary["cases"]["val"]["checkpoint"])
    assert load_checkpoint(scored).model_config.rpn_post_nms_top_n_test == 50
    assert (
        "50 after NMS, 50 per level before it (retuned with --proposals"
        in (tmp_path / "out" / "summary.md").read_text()
    )
    stamp = scored.stat().st_mtime_ns
    assert Path(run()["cases"]["val"]["checkpoint"]).stat().st_mtime_ns == stamp  # reused, exports stay valid


def _case(rows: list[tuple[str, float, bool | None]]) -> dict:
    made = []
    for engine, diff, parity in rows:
        made.append({"engine": engine, "within": abs(diff) <= 0.01, "parity": parity})
    return {"rows": made}


def test_verdict_needs_every_fast_path_within_and_parity_passed() -> None:
    good = _case([("torch", 0.0, None), ("onnx", 0.05, None), ("openvino:int8", -0.009, True)])
    assert cpu_accuracy.passed({"a": good}), "only the fast paths are judged"
    far = _case([("torch", 0.0, None), ("openvino:int8", -0.011, True)])
    assert not cpu_accuracy.passed({"a": good, "b": far})
    parity_failed = _case([("torch", 0.0, None), ("openvino:bf16", 0.0, False)])
    assert not cpu_accuracy.passed({"a": parity_failed})
    nothing_judged = {"rows": [{"engine": "openvino:int8", "within": None, "parity": None}]}
    assert not cpu_accuracy.passed({"a": nothing_judged}), "a fast path that judged nothing does not pass"
    ap_not_judged = {"rows": [{"engine": "openvino:int8", "within": None, "parity": True}]}
    assert cpu_accuracy.passed({"a": ap_not_judged})


def test_the_ap50_limit_is_judged_only_with_enough_ground_truth() -> None:
    def result(cells: int) -> dict:
        ev = {"metrics": {"segm": {"AP50": 0.5, "AP": 0.3, "num_detections": 9}}, "info": {"seconds": 1.0}}
        far = {**ev, "metrics": {"segm": {**ev["metrics"]["segm"], "AP50": 0.53}}}
        return {"eval": {"torch": {**ev, "num_gt": {"1": cells}}, "openvino:int8": far}, "parity": {}}

    few = {r["engine"]: r for r in cpu_accuracy.case_rows(result(40), 0.01)}
    assert few["openvino:int8"]["within"] is None and few["openvino:int8"]["n_gt"] == 40
    many = {r["engine"]: r for r in cpu_accuracy.case_rows(result(200), 0.01)}
    assert many["openvino:int8"]["within"] is False
