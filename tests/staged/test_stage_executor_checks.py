"""Plain decisions of the stage executors and host steps, on the CPU: providers asked for and checked (the
staged-onnx executor refuses ONNX Runtime's silent CPU fallback), TF32 off for fp32 stages, dtype and
alignment rules, CUDA-graph keys, device-memory plans, RoI chunks, cached anchors, counted syncs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cellseg_deploy.backends.staged.executors import OrtExecutor, ort_providers
from cellseg_deploy.backends.staged.runner import AnchorCache, SyncCounter, op_synchronises, roi_chunks
from cellseg_deploy.backends.staged.stages import load_stage_folder
from cellseg_deploy.backends.tensorrt.executor import (
    graph_key,
    is_aligned,
    plan_device_memory,
    trt_torch_dtype,
)
from cellseg_deploy.errors import BackendUnavailable, ModelFileError


def test_staged_onnx_on_cuda_asks_for_fp32_and_refuses_a_cpu_fallback(stage_dir: Path, monkeypatch) -> None:
    """Issue 21, points 3 and 4: the CUDA provider is asked for use_tf32=0, and sessions that report only
    the CPU provider (what ONNX Runtime gives when the CUDA libraries or the GPU are missing) are refused."""
    import onnxruntime as ort

    asked: list = []
    real = ort.InferenceSession

    def session(path, sess_options=None, providers=None, **kwargs):
        asked.append(providers)
        return real(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "InferenceSession", session)
    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    graphs = load_stage_folder(stage_dir).graphs("fp32")
    with pytest.raises(BackendUnavailable, match="CUDAExecutionProvider") as info:
        OrtExecutor(graphs, device="cuda")
    assert "\n" not in str(info.value) and "CPUExecutionProvider" in str(info.value)
    name, options = asked[0][0]
    assert name == "CUDAExecutionProvider" and options["use_tf32"] == "0" and options["device_id"] == "0"


def test_tf32_is_an_explicit_opt_in_for_the_cuda_provider() -> None:
    cuda1 = torch.device("cuda", 1)
    available = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert ort_providers(cuda1, available)[0] == (
        "CUDAExecutionProvider",
        {"device_id": "1", "use_tf32": "0"},
    )
    assert ort_providers(cuda1, available, tf32=True)[0][1]["use_tf32"] == "1"
    assert ort_providers(torch.device("cpu"), available) == ["CPUExecutionProvider"]
    with pytest.raises(BackendUnavailable, match="onnxruntime-gpu"):
        ort_providers(cuda1, ["CPUExecutionProvider"])


def test_staged_torch_turns_tf32_off_for_fp32_stages_on_a_gpu() -> None:
    """Issue 21, point 3: the switch is set where the executor is made (before the modules move to the
    GPU, which fails on this CPU-only machine after it)."""
    from cellseg_deploy.backends.devices import restore_tf32, set_tf32, tf32_state
    from cellseg_deploy.backends.staged.executors import TorchExecutor

    previous = set_tf32(True)
    try:
        with pytest.raises((RuntimeError, AssertionError)):
            TorchExecutor({"box_head": torch.nn.Linear(2, 2)}, {"box_head": ["y"]}, device="cuda")
        assert not tf32_state().enabled
    finally:
        restore_tf32(previous)


def test_dtypes_alignment_graph_keys_and_memory_plans(trt_double) -> None:
    trt = trt_double().trt
    assert trt_torch_dtype(trt, trt.float32) is torch.float32
    assert trt_torch_dtype(trt, trt.int64) is torch.int64
    with pytest.raises(ModelFileError, match="not supported"):
        trt_torch_dtype(trt, object())
    assert is_aligned(0x1000) and is_aligned(512) and not is_aligned(0x1004) and not is_aligned(128)
    assert (
        graph_key({"b": (2, 3), "a": (1,)})
        == graph_key({"a": [1], "b": [2, 3]})
        == (("a", (1,)), ("b", (2, 3)))
    )
    plan = plan_device_memory({"backbone_rpn": 1000, "box_head": 300, "mask_head": 5000})
    assert plan.shared_bytes == 5120  # the largest, rounded up to 256
    assert plan.unshared_bytes({"backbone_rpn": 1, "mask_head": 8}) == 1000 + 8 * 5000
    assert plan_device_memory({}).shared_bytes == 256


@pytest.mark.parametrize("version", ["10.0.1.6", "11.1.0.5"])
def test_device_memory_api_per_version(trt_double, stage_dir: Path, tmp_path: Path, version: str) -> None:
    """10.0 has only ``device_memory_size`` and the ``device_memory`` property; 11 only the v2 names."""
    import shutil

    from cellseg_deploy.backends.tensorrt.build import build_engines, load_engine_set
    from cellseg_deploy.backends.tensorrt.executor import TrtExecutor, engine_memory_bytes

    shutil.copytree(stage_dir, tmp_path / "s")
    trt = trt_double(version).trt
    assert hasattr(trt.ICudaEngine, "device_memory_size") == version.startswith("10.")
    assert hasattr(trt.IExecutionContext, "set_device_memory") == version.startswith("11.")
    build_engines(tmp_path / "s", fp16=True)
    executor = TrtExecutor(load_engine_set(tmp_path / "s" / "engines" / "fp16").engine_paths())
    out = executor.run("box_head", {"box_features": torch.randn(2, 64, 7, 7)})
    assert out["class_logits"].shape == (2, 5)
    assert engine_memory_bytes(executor.stages["box_head"].engine) > 0


def test_roi_chunks() -> None:
    assert roi_chunks(250, 100, 0) == [(0, 100, 100), (100, 100, 100), (200, 50, 50)]
    assert roi_chunks(250, 100, 64) == [(0, 100, 100), (100, 100, 100), (200, 50, 64)]
    assert roi_chunks(30, 1000, 64) == [(0, 30, 64)]
    assert roi_chunks(0, 10, 4) == []


def test_anchor_cache_gives_torchvision_anchors_once_per_padded_size() -> None:
    from torchvision.models.detection.image_list import ImageList

    from cellseg_deploy.backends.staged.runner import build_host_model
    from cellseg_deploy.modeling import ModelConfig

    generator = build_host_model(ModelConfig(arch="tiny")).rpn.anchor_generator
    cache = AnchorCache(generator, max_entries=1)
    for h, w in [(256, 320), (256, 320), (320, 256)]:
        images = ImageList(torch.zeros(2, 3, h, w), [(h, w - 10), (h - 20, w)])
        feats = [torch.zeros(2, 8, h // 2**k, w // 2**k) for k in range(2, 2 + len(generator.sizes))]
        got = cache(images, feats)
        ref = generator(images, feats)
        assert len(got) == 2 and all(torch.equal(g, r) for g, r in zip(got, ref, strict=True))
    assert cache.misses == 2 and len(cache.entries) == 1


def test_sync_counter_counts_the_calls_that_wait_for_a_gpu() -> None:
    x = torch.rand(10)
    with SyncCounter() as counter:
        mask = x > 0.5
        x[mask]
        torch.where(mask)
        torch.where(mask, x, 0.0)  # three arguments: no data-dependent shape
        float(x.sum())
        x.topk(3)
        counter.paused = True
        x.nonzero()
        counter.paused = False
    assert counter.count == 3
    assert dict(counter.by_op) == {"__getitem__": 1, "where": 1, "__float__": 1}
    assert op_synchronises("repeat_interleave", (x, torch.tensor([1])), {})
    assert not op_synchronises("repeat_interleave", (x, torch.tensor([1])), {"output_size": 10})


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_pool_rois_equals_torchvision_with_one_sync_per_pooling(threads: int) -> None:
    from collections import OrderedDict

    from cellseg_deploy.backends.staged.runner import RoiWorkers, build_host_model, pool_rois
    from cellseg_deploy.modeling import ModelConfig

    host = build_host_model(ModelConfig(arch="tiny"))
    gen = torch.Generator().manual_seed(0)
    features = OrderedDict(
        (name, torch.randn(2, 8, 256 // 2**k, 320 // 2**k, generator=gen))
        for k, name in enumerate(["0", "1", "2", "3", "pool"], start=2)
    )
    sizes = [(256, 300), (240, 320)]
    boxes = []
    for n in (40, 0):  # an image without boxes too
        xy = torch.rand(n, 2, generator=gen) * 200
        wh = torch.rand(n, 2, generator=gen) * torch.tensor([4.0, 150.0]) + 2  # small and large: every level
        boxes.append(torch.cat([xy, xy + wh], dim=1))
    workers = RoiWorkers(threads)
    workers.min_rois = 4  # split even these few RoIs into parts, one per thread
    for pooler in (host.roi_heads.box_roi_pool, host.roi_heads.mask_roi_pool):
        ref = pooler(features, boxes, sizes)
        with SyncCounter() as counter:
            got = pool_rois(pooler, features, boxes, sizes, workers)
        assert torch.equal(got, ref)
        assert counter.count == 1, counter.by_op
    workers.close()


def test_roi_workers_parts_cover_the_range_in_order() -> None:
    from cellseg_deploy.backends.staged.runner import RoiWorkers

    workers = RoiWorkers(3)
    assert workers.parts(5, 5) == []
    assert workers.parts(0, 10) == [(0, 10)]  # fewer than two parts' worth of RoIs: one part
    parts = workers.parts(100, 1100)
    assert parts == [(100, 433), (433, 766), (766, 1100)]
    assert RoiWorkers(0).count == 1
    assert RoiWorkers(1).parts(0, 1000) == [(0, 1000)]


def test_pool_rois_runs_one_part_per_thread_and_matches_one_level_pooling(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The box pooling of cell images: every RoI on the finest level, 1000 of them, split across 2 threads
    (each on its own thread, the calling one included), same values as torchvision's pooler."""
    import threading
    from collections import OrderedDict

    import torchvision.ops

    from cellseg_deploy.backends.staged.runner import RoiWorkers, build_host_model, pool_rois
    from cellseg_deploy.modeling import ModelConfig

    host = build_host_model(ModelConfig(arch="tiny"))
    pooler = host.roi_heads.box_roi_pool
    gen = torch.Generator().manual_seed(1)
    features = OrderedDict(
        (name, torch.randn(1, 16, 256 // 2**k, 256 // 2**k, generator=gen))
        for k, name in enumerate(["0", "1", "2", "pool"], start=2)
    )
    xy = torch.rand(1000, 2, generator=gen) * 220
    boxes = [torch.cat([xy, xy + torch.rand(1000, 2, generator=gen) * 20 + 2], dim=1)]  # all small: level 0
    ref = pooler(features, boxes, [(256, 256)])
    seen: list[tuple[int, int]] = []
    original = torchvision.ops.roi_align

    def recording(feature: torch.Tensor, rois: torch.Tensor, **kwargs: object) -> torch.Tensor:
        seen.append((threading.get_ident(), int(rois.shape[0])))
        return original(feature, rois, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torchvision.ops, "roi_align", recording)
    workers = RoiWorkers(2)
    got = pool_rois(pooler, features, boxes, [(256, 256)], workers)
    workers.close()
    assert torch.equal(got, ref)
    assert sorted(n for _, n in seen) == [500, 500]
    assert len({ident for ident, _ in seen}) == 2
