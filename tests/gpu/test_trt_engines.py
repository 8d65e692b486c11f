"""TensorRT engines of the stage graphs on an NVIDIA GPU: build, parity with PyTorch (fp32 and fp16), reload,
CUDA graphs, refusal of engines from another TensorRT version, and the ONNX Runtime CUDA executor.

Run on a GPU machine with TensorRT installed (``pip install 'cellseg-deploy[trt]'``)::

    pytest -m gpu tests/gpu

Elsewhere every test here is skipped by ``tests/conftest.py`` with the reason.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cellseg_deploy.errors import ModelFileError
from cellseg_deploy.structures import Instances

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

PARITY_SCORE = 0.1  # untrained weights score every class about 0.2


@pytest.fixture(scope="module")
def trt_stage_dir(random_tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stage graphs (fp32 + fp16) with a batch-2 profile, and fp32 and fp16 engines in the default places."""
    pytest.importorskip("tensorrt", reason="TensorRT is not installed: pip install 'cellseg-deploy[trt]'")
    from cellseg_deploy.backends.staged.export import export_staged
    from cellseg_deploy.backends.staged.stages import StageProfile
    from cellseg_deploy.backends.tensorrt.build import build_engines
    from cellseg_deploy.modeling import load_checkpoint

    config = load_checkpoint(random_tiny_checkpoint).model_config
    out = tmp_path_factory.mktemp("trt") / "stages"
    export_staged(random_tiny_checkpoint, out, profile=StageProfile.for_model(config, max_batch=2))
    build_engines(out, fp16=False, workspace_gib=2)
    build_engines(out, fp16=True, workspace_gib=2)
    return out


@pytest.fixture(scope="module")
def gpu_images() -> dict[int, np.ndarray]:
    from cellseg_deploy.data.synth import fluorescence_cell_image

    return {
        1: fluorescence_cell_image(300, 400, seed=1, n_cells=50),
        2: fluorescence_cell_image(256, 256, seed=2, n_cells=80),
        3: fluorescence_cell_image(500, 200, seed=3, n_cells=30, invert=True),
    }


@pytest.fixture(scope="module")
def torch_cuda_predictions(
    random_tiny_checkpoint: Path, gpu_images: dict[int, np.ndarray]
) -> dict[int, Instances]:
    from cellseg_deploy.backends import create_runner

    with create_runner("torch", random_tiny_checkpoint, device="cuda") as runner:
        return {i: runner.predict(im) for i, im in gpu_images.items()}


def predictions(
    engine: str, path: Path, precision: str, images: dict[int, np.ndarray], **options
) -> dict[int, Instances]:
    from cellseg_deploy.backends import create_runner

    with create_runner(engine, path, device="cuda", precision=precision, options=options) as runner:
        return {i: runner.predict(im) for i, im in images.items()}


def test_engines_and_manifest(trt_stage_dir: Path) -> None:
    import tensorrt as trt
    import torch

    from cellseg_deploy.backends.tensorrt.build import load_engine_set

    for precision in ("fp32", "fp16"):
        engines = load_engine_set(trt_stage_dir / "engines" / precision)
        engines.verify_files()
        env = engines.manifest["environment"]
        assert env["trt_version"] == trt.__version__
        assert env["gpu_name"] == torch.cuda.get_device_name(0)
        assert tuple(env["compute_capability"]) == torch.cuda.get_device_capability(0)
        assert engines.manifest["precision"] == precision
        assert engines.stage_dir == trt_stage_dir.resolve()
        assert engines.profile.batch == (1, 1, 2)
    assert (trt_stage_dir / "engines" / "timing.cache").stat().st_size > 0


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_parity_with_pytorch(
    trt_stage_dir: Path,
    gpu_images: dict[int, np.ndarray],
    torch_cuda_predictions: dict[int, Instances],
    precision: str,
) -> None:
    from cellseg_deploy.evaluation.parity import compare_runs, get_profile

    cand = predictions("trt", trt_stage_dir, precision, gpu_images)
    report = compare_runs(
        torch_cuda_predictions, cand, profile=get_profile(precision), score_thresh=PARITY_SCORE
    )
    assert report.overall["n_ref"] >= 100
    assert report.passed, report.failures


def test_cuda_graphs_give_the_same_detections(trt_stage_dir: Path, gpu_images: dict[int, np.ndarray]) -> None:
    from cellseg_deploy.backends import create_runner

    with create_runner("trt", trt_stage_dir, device="cuda", precision="fp16") as plain:
        ref = [plain.infer(im) for im in gpu_images.values()]
    with create_runner(
        "trt", trt_stage_dir, device="cuda", precision="fp16", options={"cuda_graphs": True}
    ) as g:
        got = [g.infer(im) for im in gpu_images.values()]
        again = [g.infer(im) for im in gpu_images.values()]  # replayed graphs
    for r, a, b in zip(ref, got, again, strict=True):
        assert len(r) == len(a) == len(b)
        np.testing.assert_allclose(a.boxes, r.boxes, atol=1e-2)
        np.testing.assert_allclose(b.boxes, a.boxes, atol=0)


def test_batch_of_two_on_engines(trt_stage_dir: Path, gpu_images: dict[int, np.ndarray]) -> None:
    from cellseg_deploy.backends import create_runner

    images = [gpu_images[1], gpu_images[3]]
    with create_runner(
        "trt", trt_stage_dir, device="cuda", precision="fp32", options={"max_batch": 2}
    ) as runner:
        dets = runner.infer_batch(images)
    assert [d.image_size for d in dets] == [im.shape[:2] for im in images]
    assert all(len(d) > 0 for d in dets)


def test_engines_reload_without_rebuilding(trt_stage_dir: Path, gpu_images: dict[int, np.ndarray]) -> None:
    from cellseg_deploy.backends import create_runner

    engine = trt_stage_dir / "engines" / "fp16" / "backbone_rpn.fp16.engine"
    before = engine.stat().st_mtime_ns
    first = predictions(
        "trt", trt_stage_dir / "engines" / "fp16" / "engines.json", "fp16", {1: gpu_images[1]}
    )
    with create_runner("trt", trt_stage_dir / "engines" / "fp16", device="cuda", precision="fp16") as runner:
        second = runner.predict(gpu_images[1])
    assert engine.stat().st_mtime_ns == before
    np.testing.assert_array_equal(first[1].boxes, second.boxes)


def test_engines_from_another_trt_version_are_refused_or_rebuilt(trt_stage_dir: Path, tmp_path: Path) -> None:
    import tensorrt as trt

    from cellseg_deploy.backends import create_runner

    copy = tmp_path / "stages"
    shutil.copytree(trt_stage_dir, copy)
    manifest_path = copy / "engines" / "fp32" / "engines.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["environment"]["trt_version"] = "10.0.0.0-other"
    manifest_path.write_text(json.dumps(manifest))

    with pytest.raises(ModelFileError, match=r"TensorRT versions differ.*rebuild") as info:
        create_runner("trt", copy, device="cuda", precision="fp32").load()
    assert "\n" not in str(info.value)

    with create_runner("trt", copy, device="cuda", precision="fp32", options={"rebuild": True}) as runner:
        assert runner.info()["tensorrt"] == trt.__version__
    assert json.loads(manifest_path.read_text())["environment"]["trt_version"] == trt.__version__


def test_staged_onnx_on_the_cuda_provider(
    trt_stage_dir: Path, gpu_images: dict[int, np.ndarray], torch_cuda_predictions: dict[int, Instances]
) -> None:
    from cellseg_deploy.backends import create_runner
    from cellseg_deploy.evaluation.parity import compare_runs, get_profile

    with create_runner("staged-onnx", trt_stage_dir, device="cuda", precision="fp16") as runner:
        info = runner.info()
        cand = {i: runner.predict(im) for i, im in gpu_images.items()}
    # every stage really on the CUDA provider (a CPU fallback is refused at load), fp32 work without TF32
    assert set(info["providers"].values()) == {"CUDAExecutionProvider"}, info["providers"]
    assert info["tf32"] is False
    report = compare_runs(
        torch_cuda_predictions, cand, profile=get_profile("fp16"), score_thresh=PARITY_SCORE
    )
    assert report.passed, report.failures


def test_staged_torch_fp32_on_cuda_runs_without_tf32(trt_stage_dir: Path, gpu_images) -> None:
    from cellseg_deploy.backends import create_runner

    with create_runner("staged-torch", trt_stage_dir, device="cuda", precision="fp32") as runner:
        runner.infer(gpu_images[1])
        info = runner.info()
    assert info["tf32_matmul"] is False and info["tf32_cudnn"] is False


def test_trt_host_syncs_are_counted_and_fewer_than_torchs_real_ones(
    trt_stage_dir: Path, gpu_images: dict[int, np.ndarray]
) -> None:
    """The counted host synchronisations (a model of which calls wait for the GPU) against what CUDA's sync
    debug mode reports for the same image."""
    import warnings

    import torch

    from cellseg_deploy.backends import create_runner

    with create_runner("trt", trt_stage_dir, device="cuda", precision="fp16") as runner:
        runner.infer(gpu_images[2])
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                runner.infer(gpu_images[2])
        finally:
            torch.cuda.set_sync_debug_mode("default")
        counted = runner.info()["host_syncs_per_image"]
    real = sum("synchronizing" in str(w.message).lower() for w in caught)
    print(f"host syncs: counted {counted}, torch sync debug mode {real}")
    assert counted > 0 and real <= counted + 5
