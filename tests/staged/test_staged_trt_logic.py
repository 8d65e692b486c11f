"""The TensorRT parts that need no TensorRT: build plans per version, engine manifests, mismatch checks,
manifest resolution, and the one-line "unavailable" message here (no TensorRT, no GPU)."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch

from cellseg_deploy.backends.staged.stages import STAGES, load_stage_folder, stage_file
from cellseg_deploy.backends.tensorrt.build import (
    ENGINES_MANIFEST,
    TrtEnvironment,
    build_engines,
    build_plan,
    cuda_index,
    engine_manifest,
    engine_mismatch,
    load_engine_set,
    network_flags,
    resolve_engine_manifest,
    trt_unavailable_reason,
)
from cellseg_deploy.errors import BackendUnavailable, ConfigError, ModelFileError, UserError
from cellseg_deploy.io_utils import atomic_write_json, sha256_file

H100 = TrtEnvironment("10.9.0.34", "NVIDIA H100 80GB HBM3", (9, 0), "12.8")

TRT_RUNS_HERE = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


# -- build plans -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["10.0.1", "10.9.0.34", "10.16.0", "11.0.0.1", "11.4.0"])
def test_fp16_is_strongly_typed_from_the_fp16_graphs_on_every_version(version: str) -> None:
    plan = build_plan(version, "fp16")
    assert (plan.graph_precision, plan.typing, plan.disable_tf32) == ("fp16", "strong", False)


@pytest.mark.parametrize("version", ["10.9.0", "11.1.0"])
def test_fp32_engines_use_fp32_graphs_without_tf32(version: str) -> None:
    plan = build_plan(version, "fp32")
    assert (plan.graph_precision, plan.typing, plan.disable_tf32) == ("fp32", "strong", True)


def test_network_flags_per_version() -> None:
    """TensorRT 10 needs 1 << STRONGLY_TYPED; in 11 the flag is deprecated (always strongly typed)."""
    assert network_flags(10, 1) == 2
    assert build_plan("10.16.0", "fp16").network_flags(1) == 2
    assert network_flags(11, 1) == 0
    with pytest.raises(BackendUnavailable):
        network_flags(12, 1)


@pytest.mark.parametrize("version", ["8.6.1", "9.3.0", "12.0.0", "garbage"])
def test_unsupported_versions_are_refused(version: str) -> None:
    with pytest.raises(BackendUnavailable, match="not supported"):
        build_plan(version, "fp16")


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(ConfigError, match="precision"):
        build_plan("10.9.0", "int8")


@pytest.mark.parametrize(("device", "index"), [("cuda", 0), ("cuda:0", 0), ("cuda:3", 3), ("CUDA:1", 1)])
def test_cuda_index(device: str, index: int) -> None:
    assert cuda_index(device) == index


@pytest.mark.parametrize("device", ["cpu", "cuda:x", "tpu"])
def test_cuda_index_refuses_other_devices(device: str) -> None:
    with pytest.raises(UserError):
        cuda_index(device)


# -- mismatch checks -------------------------------------------------------------------------------------------
def manifest_for(env: TrtEnvironment, graph_sha: str = "a" * 64) -> dict:
    return {
        "environment": env.to_dict(),
        "stages": {s: {"source_graph_sha256": graph_sha} for s in STAGES},
    }


def test_same_environment_and_graphs_load() -> None:
    assert engine_mismatch(manifest_for(H100), H100, {s: "a" * 64 for s in STAGES}) is None


def test_another_trt_version_is_refused_in_one_line_saying_rebuild() -> None:
    other = TrtEnvironment("10.3.0", H100.gpu_name, H100.compute_capability)
    reason = engine_mismatch(manifest_for(other), H100)
    assert reason is not None and "\n" not in reason
    assert "TensorRT 10.3.0" in reason and "TensorRT 10.9.0.34" in reason
    assert "versions differ" in reason and "rebuild" in reason


def test_another_gpu_architecture_is_refused() -> None:
    a100 = TrtEnvironment(H100.trt_version, "NVIDIA A100-SXM4-80GB", (8, 0))
    reason = engine_mismatch(manifest_for(a100), H100)
    assert reason is not None and "sm_80" in reason and "sm_90" in reason and "architectures differ" in reason


def test_same_architecture_other_gpu_model_loads_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    h200 = TrtEnvironment(H100.trt_version, "NVIDIA H200", (9, 0))
    with caplog.at_level(logging.WARNING):
        assert engine_mismatch(manifest_for(h200), H100) is None
    assert "NVIDIA H200" in caplog.text and "timings may differ" in caplog.text


def test_changed_stage_graphs_make_engines_stale() -> None:
    current = {s: "a" * 64 for s in STAGES} | {"box_head": "b" * 64}
    reason = engine_mismatch(manifest_for(H100), H100, current)
    assert reason is not None and "['box_head']" in reason and "rebuild" in reason


def test_environment_round_trip() -> None:
    assert TrtEnvironment.from_dict(H100.to_dict()) == H100
    assert H100.sm == "sm_90"


# -- engine manifest and resolution (on a fake stage folder and fake engine files) -----------------------------
@pytest.fixture
def fake_stage_folder(tmp_path: Path) -> Path:
    root = tmp_path / "model" / "stages"
    root.mkdir(parents=True)
    stages = {}
    for stage in STAGES:
        graphs = {}
        for precision in ("fp32", "fp16"):
            path = root / stage_file(stage, precision)
            path.write_bytes(f"{stage}-{precision}".encode())
            graphs[precision] = {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size}
        stages[stage] = {"graphs": graphs, "inputs": [], "outputs": []}
    atomic_write_json(
        root / "manifest.json",
        {
            "format": "cellseg-deploy/staged/1",
            "precisions": ["fp32", "fp16"],
            "stages": stages,
            "checkpoint": {"path": "/x/best.pt", "sha256": "c" * 64},
            "model_config": {"arch": "tiny"},
            "geometry": {},
            "profile": {},
            "versions": {"torch": "2.14.1"},
        },
    )
    return root


def test_engine_manifest_records_environment_sources_and_relative_stage_dir(fake_stage_folder: Path) -> None:
    folder = load_stage_folder(fake_stage_folder)
    out_dir = fake_stage_folder / "engines" / "fp16"  # the default place
    out_dir.mkdir(parents=True)
    engines = {}
    for stage in STAGES:
        path = out_dir / f"{stage}.fp16.engine"
        path.write_bytes(b"plan-" + stage.encode())
        engines[stage] = {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size}
    from cellseg_deploy.backends.staged.stages import StageProfile

    plan = build_plan("11.0.0", "fp16")
    manifest = engine_manifest(
        folder=folder,
        out_dir=out_dir,
        plan=plan,
        env=H100,
        profile=StageProfile(),
        engines=engines,
        workspace_gib=2.0,
        build_seconds={"box_head": 1.5},
    )
    assert manifest["precision"] == "fp16" and manifest["typing"] == "strong"
    assert manifest["environment"]["compute_capability"] == [9, 0]
    assert manifest["checkpoint_sha256"] == "c" * 64
    assert manifest["stage_dir"] == "../.."
    for stage in STAGES:  # the FP16 graphs were the source (strongly typed build)
        assert manifest["stages"][stage]["source_graph"] == stage_file(stage, "fp16")
        assert manifest["stages"][stage]["source_graph_sha256"] == folder.graph_sha256(stage, "fp16")
    assert manifest["versions"]["tensorrt"] == H100.trt_version
    json.dumps(manifest)  # JSON-able

    atomic_write_json(out_dir / ENGINES_MANIFEST, manifest)
    loaded = load_engine_set(out_dir)
    assert loaded.stage_dir == fake_stage_folder.resolve()
    assert engine_mismatch(loaded.manifest, H100, {s: folder.graph_sha256(s, "fp16") for s in STAGES}) is None
    loaded.verify_files()
    (out_dir / "mask_head.fp16.engine").write_bytes(b"corrupt")
    with pytest.raises(ModelFileError, match=r"mask_head\.fp16\.engine does not match"):
        loaded.verify_files()
    (out_dir / "mask_head.fp16.engine").unlink()
    with pytest.raises(ModelFileError, match="missing"):
        loaded.verify_files()

    # A runner's model path: the stage folder, the engine folder, or engines.json itself.
    assert resolve_engine_manifest(fake_stage_folder, "fp16") == out_dir / ENGINES_MANIFEST
    assert resolve_engine_manifest(out_dir, "fp16") == out_dir / ENGINES_MANIFEST
    assert resolve_engine_manifest(out_dir / ENGINES_MANIFEST, "fp32") == out_dir / ENGINES_MANIFEST
    assert not resolve_engine_manifest(fake_stage_folder, "fp32").exists()


def test_load_engine_set_rejects_other_files(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match=r"no engines\.json"):
        load_engine_set(tmp_path)
    (tmp_path / ENGINES_MANIFEST).write_text('{"format": "something/else"}')
    with pytest.raises(ModelFileError, match="not an engine manifest"):
        load_engine_set(tmp_path)


# -- unavailable here ------------------------------------------------------------------------------------------
pytestmark_no_trt = pytest.mark.skipif(TRT_RUNS_HERE, reason="TensorRT and a GPU are available here")


@pytestmark_no_trt
def test_unavailable_reason_is_one_line_with_the_install_hint() -> None:
    reason = trt_unavailable_reason()
    assert reason is not None and "\n" not in reason
    assert "pip install 'cellseg-deploy[trt]'" in reason and "NVIDIA" in reason


@pytestmark_no_trt
def test_build_engines_raises_the_same_line_before_reading_anything(tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailable) as info:
        build_engines(tmp_path / "does-not-exist")
    assert str(info.value) == trt_unavailable_reason()


@pytestmark_no_trt
def test_trt_runner_is_unavailable_with_the_same_line(tmp_path: Path) -> None:
    from cellseg_deploy.backends import create_runner, get_runner_class

    assert get_runner_class("trt").unavailable_reason() == trt_unavailable_reason()
    runner = create_runner("trt", tmp_path, device="cuda", precision="fp16")
    with pytest.raises(BackendUnavailable) as info:
        runner.load()
    assert str(info.value) == trt_unavailable_reason()


@pytestmark_no_trt
@pytest.mark.parametrize("source", ["checkpoint", "stage folder"])
def test_cli_export_trt_prints_one_line_and_exits_nonzero(
    source: str, random_tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cellseg_deploy.cli.main import cli, main

    if "export" not in cli.commands:
        pytest.fail("the export command is not registered in cellseg_deploy.cli.main")
    model = random_tiny_checkpoint if source == "checkpoint" else tmp_path / "stages"
    code = main(["export", str(model), "--format", "trt", "--out", str(tmp_path / "engines")])
    err = capsys.readouterr().err
    assert code != 0
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [f"error: {trt_unavailable_reason()}"]
    assert not (tmp_path / "engines").exists()  # nothing exported or built before the check
