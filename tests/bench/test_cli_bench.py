"""``cellseg-deploy bench`` end to end: table, JSON with the environment, Markdown, PNG plots; one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cellseg_deploy.bench.sample import STAGES
from cellseg_deploy.cli.main import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STAT_KEYS = ("min_ms", "mean_ms", "p50_ms", "p90_ms", "p99_ms", "max_ms", "throughput_ips")


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(args)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.slow
def test_bench_torch_and_onnx_writes_every_report(
    bench_model: tuple[Path, Path | None], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint, data_root = bench_model
    out = tmp_path / "out"
    images = (
        ["--data", str(data_root), "--limit", "2"]
        if data_root
        else ["--imgsz", "160", "--cells", "20", "--synthetic-images", "1"]
    )
    rc, stdout, stderr = _run(
        [
            "bench",
            "--engine",
            "torch,onnx",
            "--model",
            str(checkpoint),
            *images,
            "--warmup",
            "0",
            "--iters",
            "2",
            "--threads",
            "1",
            "--sweep",
            "cells,size",
            "--sweep-cells",
            "5,15",
            "--sweep-sizes",
            "96,160",
            "--out",
            str(out),
            "--cache",
            str(tmp_path / "cache"),
            "--json",
            str(tmp_path / "r.json"),
        ],
        capsys,
    )
    assert rc == 0, stderr
    # The printed table names both engines and the stage breakdown.
    assert (
        "mean ms" in stdout
        and "run/alone" in stdout
        and "network ms" in stdout
        and "sweep over cells" in stdout
    )
    assert any(line.startswith("torch ") for line in stdout.splitlines())
    assert any(line.startswith("onnx ") for line in stdout.splitlines())
    assert "onnx: exported" in stderr  # the ONNX file came from the checkpoint, and the output says so

    result = json.loads((out / "bench.json").read_text())
    assert json.loads((tmp_path / "r.json").read_text())["engines"].keys() == result["engines"].keys()
    env = result["environment"]
    assert env["cpu"]["model"] and env["cpu"]["logical_cores"] >= 1 and env["os"]
    assert env["threads"]["requested"] == 1
    assert env["versions"]["torch"] and env["versions"]["torchvision"] and env["versions"]["onnxruntime"]
    assert result["process_peak_rss_mb"] > 0
    assert set(result["definitions"]) >= {"total", *STAGES}
    for name in ("torch", "onnx"):
        e = result["engines"][name]
        lat = e["latency"]
        n_images = len(result["workload"]["images"])
        assert lat["n"] == 2 * n_images and len(e["samples_ms"]) == 2 * n_images
        assert all(lat[k] > 0 for k in STAT_KEYS) and lat["std_ms"] >= 0
        assert e["detections_per_image"]["mean"] > 0, (
            "the model must detect something for paste/rle to be timed"
        )
        for stage in ("decode", "preprocess", "network", "paste", "rle"):
            assert e["stages"][stage]["mean_ms"] > 0, stage
        assert sum(e["stage_mean_ms"].values()) == pytest.approx(lat["mean_ms"], rel=1e-6)
        assert e["memory"]["peak_rss_mb"] > 0 and e["memory"]["peak_over_baseline_mb"] > 0
        assert e["memory"]["baseline_rss_mb"] > 0
        # the same engine alone in the probe process, over as many timed calls as the run measured
        assert e["alone"]["n"] == lat["n"] == e["memory"]["alone_latency"]["n"]
        assert e["alone"]["run_over_alone"] == pytest.approx(lat["p50_ms"] / e["alone"]["p50_ms"])
        assert e["info"]["runner"] == name  # reported by the engine's own process (--isolation process)
        assert e["run_process_peak_rss_mb"] > 0
        assert e["speedup_vs_torch"]["mean"] > 0
    assert result["engines"]["torch"]["speedup_vs_torch"]["mean"] == pytest.approx(1.0)
    assert result["engines"]["torch"]["model"]["source"] == "checkpoint"
    assert result["engines"]["onnx"]["model"]["source"] == "exported"
    for kind, values in (("cells", [5, 15]), ("size", [96, 160])):
        sweep = result["sweeps"][kind]
        assert [p["value"] for p in sweep["points"]] == values
        assert all(
            p["engines"][n]["latency"]["mean_ms"] > 0 for p in sweep["points"] for n in ("torch", "onnx")
        )

    md = (out / "bench.md").read_text()
    assert "| torch |" in md and "| onnx |" in md and "## Environment" in md and "## Sweep over size" in md
    for png in ("latency_distribution", "stage_breakdown", "latency_vs_cells", "latency_vs_size"):
        path = out / f"{png}.png"
        assert path.read_bytes()[:8] == PNG_MAGIC, png
        assert f"({png}.png)" in md
    assert sorted(Path(p).name for p in result["outputs"]["plots"]) == sorted(
        f"{n}.png" for n in ("latency_distribution", "stage_breakdown", "latency_vs_cells", "latency_vs_size")
    )


@pytest.mark.slow
def test_untrained_models_give_the_asked_detections_on_every_engine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "bench",
        "--engine",
        "torch,onnx",
        "--untrained",
        "tiny",
        "--imgsz",
        "128",
        "--cells",
        "6",
        "--warmup",
        "0",
        "--iters",
        "1",
        "--threads",
        "1",
        "--no-memory",
        "--isolation",
        "shared",  # the profile runs in its own process whatever the isolation
        "--profile",
        "--out",
        str(tmp_path / "o"),
        "--cache",
        str(tmp_path / "cache"),
    ]
    rc, stdout, stderr = _run(args, capsys)
    assert rc == 0, stderr
    result = json.loads((tmp_path / "o" / "bench.json").read_text())
    for name in ("torch", "onnx"):
        assert result["engines"][name]["detections_per_image"] == {"mean": 6.0, "min": 6.0, "max": 6.0}
    assert "detections_per_img = cells" in result["models_note"]
    # --profile: onnx profiled alone by model part (one warm-up, memory_rounds calls); torch has no profiler
    profile = result["engines"]["onnx"]["profile"]
    assert profile["calls"] == 2 and profile["layer_ms_per_call"] > 0
    assert {"backbone", "mask_head"} <= set(profile["parts"]) and profile["layers"]
    assert "no per-layer profiler" in result["engines"]["torch"]["profile"]["skipped"]
    assert "per-layer profile" in stdout and "precision: onnx (fp32): fp32" in stdout
    assert (tmp_path / "o" / "layer_profile.png").read_bytes()[:8] == PNG_MAGIC
    assert "## Per-layer profile" in (tmp_path / "o" / "bench.md").read_text()


def test_cells_sweep_controls_detections(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "bench",
        "--engine",
        "torch",
        "--untrained",
        "tiny",
        "--imgsz",
        "96",
        "--cells",
        "4",
        "--warmup",
        "0",
        "--iters",
        "1",
        "--threads",
        "1",
        "--no-memory",
        "--isolation",
        "shared",  # the default (process) is covered above; this test is about the sweep
        "--sweep",
        "cells",
        "--sweep-cells",
        "2,9",
        "--out",
        str(tmp_path / "o"),
        "--cache",
        str(tmp_path / "cache"),
    ]
    rc, _, stderr = _run(args, capsys)
    assert rc == 0, stderr
    result = json.loads((tmp_path / "o" / "bench.json").read_text())
    got = [p["engines"]["torch"]["detections_per_image"]["mean"] for p in result["sweeps"]["cells"]["points"]]
    assert got == [2.0, 9.0]
    assert (tmp_path / "o" / "latency_vs_cells.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--engine", "torch,nope"], "unknown engine 'nope'"),
        (["--engine", "torch", "--iters", "0"], "iterations must be at least 1"),
        (["--engine", "torch", "--iters", "3", "--seconds", "2"], "exactly one"),
        (["--engine", "torch", "--sweep", "colour"], "unknown sweep 'colour'"),
    ],
)
def test_bad_flags_are_one_line_errors(
    extra: list[str],
    message: str,
    random_tiny_checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    rc, _, err = _run(
        ["bench", "--model", str(random_tiny_checkpoint), "--out", str(tmp_path), *extra], capsys
    )
    assert rc == 2
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_model_file_that_does_not_match_the_engine(
    random_tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _, err = _run(
        [
            "bench",
            "--engine",
            "onnx",
            "--model-for",
            f"onnx={random_tiny_checkpoint}",
            "--out",
            str(tmp_path / "out"),
        ],
        capsys,
    )
    assert rc == 2 and "runner 'onnx'" in err and len(err.strip().splitlines()) == 1, err
    fake = tmp_path / "model.onnx"
    fake.write_bytes(b"x")
    rc, _, err = _run(
        ["bench", "--engine", "torch", "--model", str(fake), "--out", str(tmp_path / "out")], capsys
    )
    assert rc == 2 and "--model takes a checkpoint" in err and len(err.strip().splitlines()) == 1, err
    rc, _, err = _run(["bench", "--engine", "torch", "--out", str(tmp_path / "out")], capsys)
    assert rc == 2 and "no model given" in err, err


def test_outputs_are_checked_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "afile").write_text("x")
    argv = ["bench", "--engine", "torch", "--untrained", "tiny", "--cache", str(tmp_path / "cache")]
    rc, _, err = _run([*argv, "--out", str(tmp_path / "afile" / "out")], capsys)
    assert rc == 2 and "is a file, not a folder" in err and len(err.strip().splitlines()) == 1, err
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "bench.json").write_text("{}")
    rc, _, err = _run([*argv, "--out", str(tmp_path / "done")], capsys)
    assert rc == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "cache").exists()  # refused before any model was built


def test_proposals_retune_the_model_every_engine_reads(
    random_tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cellseg_deploy.modeling import load_checkpoint

    common = ["--engine", "torch", "--imgsz", "128", "--cells", "6", "--warmup", "0", "--iters", "1"]
    common += ["--threads", "1", "--no-memory", "--isolation", "shared", "--proposals", "40"]
    cache = tmp_path / "cache"
    rc, _, stderr = _run(
        [
            "bench",
            *common,
            "--model",
            str(random_tiny_checkpoint),
            "--out",
            str(tmp_path / "a"),
            "--cache",
            str(cache),
        ],
        capsys,
    )
    assert rc == 0, stderr
    result = json.loads((tmp_path / "a" / "bench.json").read_text())
    measured = Path(result["engines"]["torch"]["model"]["path"])
    assert measured.parent == cache / "retuned" and "-prop40" in measured.name
    assert load_checkpoint(measured).model_config.rpn_post_nms_top_n_test == 40
    assert "40 RPN proposals per image" in result["models_note"]
    # the untrained model is built with the setting (a file of its own: the 1000-proposal one stays)
    rc, _, stderr = _run(
        ["bench", *common, "--untrained", "tiny", "--out", str(tmp_path / "b"), "--cache", str(cache)], capsys
    )
    assert rc == 0, stderr
    (built,) = (cache / "untrained").glob("*-prop40-*.pt")
    assert load_checkpoint(built).model_config.rpn_pre_nms_top_n_test == 40
    # exported files keep the count they were exported with: --proposals without a checkpoint is refused
    rc, _, stderr = _run(
        ["bench", "--engine", "onnx", "--model-for", "onnx=m.onnx", "--proposals", "40"], capsys
    )
    assert rc == 2 and "pass --model CKPT or --untrained ARCH" in stderr
