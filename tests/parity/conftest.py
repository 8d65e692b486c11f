"""Fixtures of the parity tests: the trained tiny model with its synthetic data set, its ONNX export, and
deliberately broken candidates.

The exports are cached in pytest's session folder, so each is made once per session however many test
modules ask for it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def cached_export(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path, name: str) -> Path:
    """The ONNX export of ``checkpoint``, made once per session under pytest's base temporary folder."""
    from cellseg_deploy.export.onnx_export import export_onnx

    out = tmp_path_factory.getbasetemp() / "onnx-cache" / f"{name}.onnx"
    if not out.exists():
        export_onnx(checkpoint, out)
    return out


@pytest.fixture(scope="session")
def parity_model(request: pytest.FixtureRequest) -> tuple[Path, Path]:
    """``(checkpoint, data_root)`` of the tiny model trained on a synthetic set (``trained_tiny``)."""
    checkpoint, data_root = request.getfixturevalue("trained_tiny")
    return Path(checkpoint), Path(data_root)


@pytest.fixture(scope="session")
def parity_onnx(parity_model: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained model's ONNX export."""
    return cached_export(tmp_path_factory, parity_model[0], "trained-tiny")


@pytest.fixture(scope="session")
def other_onnx(random_tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ONNX export of a *different* checkpoint (random weights): a wrong candidate."""
    return cached_export(tmp_path_factory, random_tiny_checkpoint, "random-tiny")


@pytest.fixture(scope="session")
def scaled_mask_onnx(parity_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained export with its mask probabilities multiplied by 0.7 inside the graph (a broken candidate
    whose boxes, labels and scores are right but whose masks shrink)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(parity_onnx))
    for node in model.graph.node:
        for i, name in enumerate(node.output):
            if name == "mask_probs":
                node.output[i] = "mask_probs_unscaled"
    model.graph.initializer.append(numpy_helper.from_array(np.array(0.7, np.float32), "mask_scale"))
    model.graph.node.append(helper.make_node("Mul", ["mask_probs_unscaled", "mask_scale"], ["mask_probs"]))
    onnx.checker.check_model(model)
    out = tmp_path_factory.getbasetemp() / "onnx-cache" / "trained-tiny-scaled-masks.onnx"
    onnx.save(model, str(out))
    return out
