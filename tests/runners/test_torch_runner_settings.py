"""What the torch runner asks of torch: an indexed device, and TF32 off for fp32 unless asked (issue 21)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cellseg_deploy.backends import create_runner
from cellseg_deploy.backends.devices import restore_tf32, set_tf32
from cellseg_deploy.errors import UserError


def test_device_is_indexed_before_loading(random_tiny_checkpoint: Path) -> None:
    runner: Any = create_runner("torch", random_tiny_checkpoint, device="cuda")
    assert runner.torch_device == torch.device("cuda", 0)
    assert runner.device == "cuda:0"
    assert create_runner("torch", random_tiny_checkpoint, device="cuda:1").torch_device.index == 1  # type: ignore[attr-defined]
    with pytest.raises(UserError, match="device"):
        create_runner("torch", random_tiny_checkpoint, device="gpu")


def _tf32_seen_in_forward(checkpoint: Path, options: dict[str, Any]) -> list[tuple[bool, bool]]:
    """(cuBLAS, cuDNN) TF32 switches as the model's first convolution sees them, with TF32 on outside."""
    seen: list[tuple[bool, bool]] = []
    image = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    previous = set_tf32(True)  # as a process that turned it on (cuDNN TF32 is torch's own default)
    try:
        with create_runner("torch", checkpoint, options=options) as runner:
            conv = runner.model.backbone.body.conv1  # type: ignore[attr-defined]
            conv.register_forward_hook(
                lambda *_: seen.append(
                    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
                )
            )
            runner.infer(image)
            after = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    finally:
        restore_tf32(previous)
    assert after == (True, True), "the runner leaked its TF32 setting out of the forward pass"
    return seen


def test_fp32_forward_runs_without_tf32(random_tiny_checkpoint: Path) -> None:
    assert _tf32_seen_in_forward(random_tiny_checkpoint, {}) == [(False, False)]


def test_tf32_is_an_explicit_option(random_tiny_checkpoint: Path) -> None:
    assert _tf32_seen_in_forward(random_tiny_checkpoint, {"tf32": "true"}) == [(True, True)]
    with pytest.raises(UserError, match="tf32"):
        create_runner("torch", random_tiny_checkpoint, options={"tf32": "sometimes"})
