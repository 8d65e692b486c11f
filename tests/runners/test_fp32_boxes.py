"""Anchors, proposals and boxes stay float32 under fp16/bf16 autocast, in inference and in training
(issue 21.5). CPU bf16 autocast shows it: bf16 keeps 8 significant bits, so a pixel coordinate between
256 and 512 rounds to a multiple of 2 px."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from cellseg_deploy.modeling import ModelConfig, build_model
from cellseg_deploy.modeling.raw import forward_raw


def _image(size: int = 448, seed: int = 0) -> torch.Tensor:
    from cellseg_deploy.data.synth import fluorescence_cell_image

    return torch.from_numpy(fluorescence_cell_image(size, size, seed=seed, n_cells=40))


@pytest.fixture(scope="module")
def model() -> Any:
    torch.manual_seed(0)
    return build_model(
        ModelConfig(arch="tiny", min_size=448, max_size=448, detections_per_img=50, score_thresh=0.0)
    )


def _off_bf16_grid(boxes: torch.Tensor) -> float:
    """Fraction of coordinates that bf16 cannot hold (0.0 for boxes computed in bf16)."""
    boxes = boxes.detach()
    return float((boxes != boxes.bfloat16().float()).float().mean())


def _record(module: torch.nn.Module, seen: dict[str, Any], key: str, pre: bool = False) -> Any:
    if pre:
        return module.register_forward_pre_hook(lambda _m, args: seen.__setitem__(key, args))
    return module.register_forward_hook(lambda _m, _a, out: seen.__setitem__(key, out))


def test_inference_boxes_stay_fp32_under_bf16_autocast(model: Any) -> None:
    model.eval()
    seen: dict[str, Any] = {}
    hooks = [
        _record(model.rpn.anchor_generator, seen, "anchors"),
        _record(model.rpn, seen, "rpn"),
        _record(model.roi_heads, seen, "roi"),
    ]
    try:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            boxes = forward_raw(model, [_image()])[0][0]
    finally:
        for h in hooks:
            h.remove()
    anchors, proposals = seen["anchors"][0], seen["rpn"][0][0]
    detected = seen["roi"][0][0]["boxes"]
    assert anchors.dtype == proposals.dtype == detected.dtype == boxes.dtype == torch.float32
    assert len(detected) > 0
    assert _off_bf16_grid(anchors) > 0.1  # e.g. 300.0 + 0.5 offsets: torchvision made them bf16
    assert _off_bf16_grid(proposals) > 0.5
    assert _off_bf16_grid(detected) > 0.5


def test_training_proposals_stay_fp32_under_bf16_autocast(model: Any) -> None:
    model.train()
    image = _image(seed=1).permute(2, 0, 1).float() / 255.0
    target = {
        "boxes": torch.tensor([[40.3, 50.7, 90.1, 101.9], [300.2, 310.6, 340.4, 352.8]]),
        "labels": torch.tensor([1, 2]),
        "masks": torch.zeros(2, 448, 448, dtype=torch.uint8),
    }
    target["masks"][0, 51:101, 40:90] = 1
    target["masks"][1, 311:352, 300:340] = 1
    seen: dict[str, Any] = {}
    hook = _record(model.roi_heads, seen, "roi_in", pre=True)
    try:
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = model([image], [target])
    finally:
        hook.remove()
        model.eval()
    proposals = seen["roi_in"][1][0]  # roi_heads(features, proposals, image_shapes, targets)
    assert proposals.dtype == torch.float32
    assert _off_bf16_grid(proposals) > 0.5
    assert all(torch.isfinite(v) for v in losses.values())


def test_fp32_forward_is_torchvisions(model: Any) -> None:
    """Without autocast nothing changes: the fp32 box coder is torchvision's own arithmetic."""
    from torchvision.models.detection._utils import BoxCoder

    model.eval()
    coder = model.rpn.box_coder
    plain = BoxCoder(coder.weights, coder.bbox_xform_clip)
    gen = torch.Generator().manual_seed(0)
    deltas = torch.randn(100, 4, generator=gen)
    refs = torch.rand(100, 4, generator=gen) * 400
    refs[:, 2:] += refs[:, :2] + 1
    assert torch.equal(coder.decode_single(deltas, refs), plain.decode_single(deltas, refs))
    bf16 = coder.decode_single(deltas.bfloat16(), refs.bfloat16())
    assert bf16.dtype == torch.float32
    np.testing.assert_allclose(
        bf16.numpy(),
        plain.decode_single(deltas.bfloat16().float(), refs.bfloat16().float()).numpy(),
        rtol=1e-6,
    )
