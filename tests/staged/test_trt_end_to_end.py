"""``cellseg-deploy export --format trt`` and ``bench --engine trt,trt:fp16`` end to end on the CPU, through
the TensorRT and CUDA doubles (``tests/trt_double``), on TensorRT 10.x and 11.x APIs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cellseg_deploy.cli.main import main
from tests.trt_double import VERSIONS

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("version", [VERSIONS[0], VERSIONS[2]])
def test_cli_export_trt_then_runner_matches_staged_onnx(
    trt_double, random_tiny_checkpoint: Path, stage_dir: Path, tmp_path: Path, version: str, capsys
) -> None:
    import shutil

    from cellseg_deploy.backends import create_runner
    from cellseg_deploy.data.synth import fluorescence_cell_image

    double = trt_double(version)
    out = tmp_path / "trt"
    if version == VERSIONS[2]:  # from the checkpoint: stage graphs first, then engines
        args = [str(random_tiny_checkpoint), "--stage-dir", str(out / "stages")]
        assert main(["export", *args, "--format", "trt", "--out", str(out / "fp16")]) == 0
    else:  # from a stage folder
        shutil.copytree(stage_dir, out / "stages")
        assert main(["export", str(out / "stages"), "--format", "trt", "--out", str(out / "fp16")]) == 0
    assert (
        main(["export", str(out / "stages"), "--format", "trt", "--no-fp16", "--out", str(out / "fp32")]) == 0
    )
    assert "built fp32 engines" in capsys.readouterr().out
    manifest = json.loads((out / "fp16" / "engines.json").read_text())
    assert manifest["environment"]["trt_version"] == version and manifest["typing"] == "strong"
    image = fluorescence_cell_image(300, 400, seed=1, n_cells=50)
    with create_runner("staged-onnx", out / "stages") as ref_runner:
        ref = ref_runner.infer(image)
    for precision, graphs in (("fp32", True), ("fp16", False)):
        with create_runner(
            "trt", out / precision, device="cuda", precision=precision, options={"cuda_graphs": graphs}
        ) as runner:
            got = runner.infer(image)
            again = runner.infer(image)
            info = runner.info()
        assert info["executor"] == "tensorrt" and info["tensorrt"] == version
        assert info["host_syncs_per_image"] > 0
        np.testing.assert_array_equal(again.boxes, got.boxes)
        if precision == "fp32":  # the same graphs on ONNX Runtime behind both
            assert len(got) == len(ref)
            np.testing.assert_allclose(got.boxes, ref.boxes, atol=1e-3)
    assert not double.cuda.races


def test_trt_runner_refuses_engines_of_another_version_then_rebuilds(
    trt_double, stage_dir: Path, tmp_path: Path
) -> None:
    import shutil

    from cellseg_deploy.backends import create_runner
    from cellseg_deploy.backends.tensorrt.build import build_engines
    from cellseg_deploy.errors import ModelFileError

    stages = tmp_path / "stages"
    shutil.copytree(stage_dir, stages)
    trt_double(VERSIONS[1])
    build_engines(stages, fp16=True)
    trt_double(VERSIONS[2])
    with pytest.raises(ModelFileError, match="TensorRT versions differ") as info:
        create_runner("trt", stages, device="cuda", precision="fp16").load()
    assert "\n" not in str(info.value)
    with create_runner(
        "trt", stages, device="cuda:0", precision="fp16", options={"rebuild": "true"}
    ) as runner:
        assert runner.info()["tensorrt"] == VERSIONS[2]


def test_cli_bench_trt_and_trt_fp16(trt_double, random_tiny_checkpoint: Path, tmp_path: Path) -> None:
    trt_double()
    out = tmp_path / "bench"
    code = main(
        [
            "bench",
            "--model", str(random_tiny_checkpoint),
            "--imgsz", "160",
            "--cells", "10",
            "--engine", "trt,trt:fp16",
            "--device", "cuda",
            "--option", "trt.rebuild=true",
            "--warmup", "0",
            "--iters", "2",
            "--no-memory",
            "--isolation", "shared",  # the TensorRT double lives in this process only
            "--out", str(out),
            "--cache", str(tmp_path / "cache"),
        ]
    )  # fmt: skip
    assert code == 0
    result = json.loads((out / "bench.json").read_text())
    for label in ("trt", "trt:fp16"):
        engine = result["engines"][label]
        assert engine["latency"]["n"] == 2 and engine["detections_per_image"]["min"] > 0
        assert engine["info"]["executor"] == "tensorrt" and "host_syncs_per_image" in engine["info"]
    assert (out / "bench.md").is_file()
