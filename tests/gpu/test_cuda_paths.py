"""The CUDA paths besides TensorRT (issue 21), each asserting what ran where: ONNX Runtime's CUDA provider,
the ``torch`` runner in fp32 (TF32 off) and fp16, ``staged-torch`` fp16, CUDA-event timing on the runner's
GPU, and a 2-process NCCL training. None needs TensorRT or its fixtures.

On a GPU machine::

    pytest -m gpu tests/gpu/test_cuda_paths.py

Elsewhere ``tests/conftest.py`` skips every test here with the reason; the NCCL test also needs 2 GPUs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    from cellseg_deploy.data.synth import fluorescence_cell_image

    return fluorescence_cell_image(300, 400, seed=1, n_cells=50)


@pytest.fixture(scope="module")
def onnx_file(random_tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cellseg_deploy.backends.onnxrt.export import export_onnx

    return export_onnx(random_tiny_checkpoint, tmp_path_factory.mktemp("onnx") / "tiny.onnx").path


def _raw(det: Any) -> list[np.ndarray]:
    return [det.boxes, det.labels, det.scores, det.mask_probs]


def test_onnx_runner_runs_on_the_cuda_provider_in_fp32(onnx_file: Path, image: np.ndarray) -> None:
    from cellseg_deploy.backends import create_runner
    from cellseg_deploy.backends.onnxrt.export import compare_raw_outputs

    with create_runner("onnx", onnx_file, device="cuda") as gpu, create_runner("onnx", onnx_file) as cpu:
        info = gpu.info()
        assert info["providers"][0] == "CUDAExecutionProvider"
        assert info["provider_options"]["use_tf32"] == "0" and info["tf32"] is False
        assert info["provider_options"]["device_id"] == "0"
        assert info["cuda_libraries"].startswith("preloaded")
        a, b = cpu.infer(image), gpu.infer(image)
    assert len(a) > 0
    cmp = compare_raw_outputs(_raw(a), _raw(b))
    assert cmp["ok"], cmp["reason"]


def test_onnx_runner_with_tf32_asked_for(onnx_file: Path) -> None:
    from cellseg_deploy.backends import create_runner

    with create_runner("onnx", onnx_file, device="cuda", options={"tf32": "true"}) as gpu:
        assert gpu.info()["provider_options"]["use_tf32"] == "1"


def _first_conv_inputs(runner: Any, image: np.ndarray) -> tuple[Any, list[tuple[Any, ...]]]:
    """Run ``image``; what the trunk's first conv saw (device, dtype, TF32 switches) and the decoded boxes."""
    import torch

    seen: list[tuple[Any, ...]] = []
    boxes: list[Any] = []
    conv = runner.model.backbone.body.conv1
    h1 = conv.register_forward_hook(
        lambda _m, args, out: seen.append(
            (
                args[0].device,
                out.dtype,
                torch.backends.cuda.matmul.allow_tf32,
                torch.backends.cudnn.allow_tf32,
                torch.cuda.current_device(),
            )
        )
    )
    h2 = runner.model.roi_heads.register_forward_hook(lambda _m, _a, out: boxes.append(out[0][0]["boxes"]))
    try:
        det = runner.infer(image)
    finally:
        h1.remove()
        h2.remove()
    assert boxes[0].dtype == torch.float32 and boxes[0].device.type == "cuda"  # decoded in fp32
    return det, seen


def test_torch_runner_fp32_on_cuda_computes_without_tf32(
    random_tiny_checkpoint: Path, image: np.ndarray
) -> None:
    import torch

    from cellseg_deploy.backends import create_runner

    with create_runner("torch", random_tiny_checkpoint, device="cuda") as runner:
        assert runner.device == "cuda:0"
        assert {p.device for p in runner.model.parameters()} == {torch.device("cuda", 0)}
        det, seen = _first_conv_inputs(runner, image)
        info = runner.info()
    assert seen == [(torch.device("cuda", 0), torch.float32, False, False, 0)]
    assert info["tf32"] is False and info["tf32_cudnn"] is False and info["tf32_matmul"] is False
    assert len(det) > 0


def test_torch_runner_fp16_on_cuda(random_tiny_checkpoint: Path, image: np.ndarray) -> None:
    import torch

    from cellseg_deploy.backends import create_runner

    with (
        create_runner("torch", random_tiny_checkpoint, device="cuda", precision="fp16") as half,
        create_runner("torch", random_tiny_checkpoint, device="cuda") as full,
    ):
        det16, seen = _first_conv_inputs(half, image)
        det32 = full.infer(image)
    assert seen[0][:2] == (torch.device("cuda", 0), torch.float16)  # autocast ran the convolutions in fp16
    assert len(det16) > 0 and np.isfinite(det16.boxes).all() and np.isfinite(det16.mask_probs).all()
    # fp16 changes scores slightly, so the ranking near the cap may differ; most boxes agree closely.
    n = min(len(det16), len(det32), 20)
    diffs = np.abs(det16.boxes[:, None, :] - det32.boxes[None, :n, :]).max(-1).min(0)
    assert np.median(diffs) < 1.0, diffs


def test_staged_torch_fp16_on_cuda(random_tiny_checkpoint: Path, image: np.ndarray, tmp_path: Path) -> None:
    from cellseg_deploy.backends import create_runner
    from cellseg_deploy.backends.staged.export import export_staged

    stages = tmp_path / "stages"
    export_staged(random_tiny_checkpoint, stages)
    with create_runner("staged-torch", stages, device="cuda", precision="fp16") as runner:
        info = runner.info()
        executor: Any = runner.pipeline.executor  # type: ignore[attr-defined]
        assert executor.device.type == "cuda"
        assert {str(p.device) for m in executor.modules.values() for p in m.parameters()} == {"cuda:0"}
        det = runner.infer(image)
    assert set(info["dtypes"].values()) == {"float16"}, info
    assert len(det) > 0 and np.isfinite(det.boxes).all()


def test_cuda_event_timer_times_the_runners_gpu(random_tiny_checkpoint: Path, image: np.ndarray) -> None:
    import torch

    from cellseg_deploy.backends import create_runner
    from cellseg_deploy.bench.timing import CudaEventTimer

    last = torch.cuda.device_count() - 1
    with create_runner("torch", random_tiny_checkpoint, device=f"cuda:{last}") as runner:
        runner.infer(image)  # warm-up
        timer = CudaEventTimer(runner.device)
        assert timer.device == torch.device("cuda", last)
        timer.start()
        runner.infer(image)
        timer.stop()
        seconds = timer.elapsed_s()
    assert 0.0 < seconds < 10.0


@pytest.fixture(scope="module")
def two_gpus() -> None:
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs for a 2-process NCCL run, this machine has {torch.cuda.device_count()}")


def test_two_process_nccl_training(two_gpus: None, tmp_path: Path) -> None:
    import torch

    from cellseg_deploy.data.synth import SynthConfig, make_synthetic_dataset

    data = tmp_path / "data"
    make_synthetic_dataset(
        data, SynthConfig(n_train=10, n_test=0, min_size=64, max_size=96, seed=3), progress=False
    )
    out = tmp_path / "ddp"
    overrides = [
        "model.min_size=96",
        "model.max_size=128",
        "data.max_train_images=8",
        "data.max_val_images=2",
        "train.epochs=2",
        "train.max_steps=3",
        "train.time_limit_min=0",
        "schedule.time_aware=false",
        "train.precision=amp",
        "val.every_epochs=1",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "cellseg_deploy.cli.main", "train", "--data", str(data), "--out", str(out),
         "--recipe", "tiny_cpu", "--device", "cuda", "--no-progress", "--json", str(tmp_path / "result.json"),
         *[a for s in overrides for a in ("--set", s)]],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=500,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "rank 0/2: process group nccl on cuda:0" in log and "rank 1/2: process group nccl on cuda:1" in log
    assert "SyncBatchNorm in" in log, "the randomly initialised tiny trunk trains BatchNorm: synced under DDP"
    state = torch.load(out / "last.pt", weights_only=True)["train_state"]
    assert state["world_size"] == 2 and state["step"] == 3
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2
    assert "segm_AP50" in result["metrics"], result
