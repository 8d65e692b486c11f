"""Fixtures of the parity tests: the trained tiny model with its synthetic data set, its ONNX export, and
deliberately broken candidates (another checkpoint; mask probabilities or mask logits scaled inside the
graph).

The exports are cached in pytest's session folder, so each is made once per session however many test
modules ask for it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from parity_helpers import ParityModel, scale_mask_logits


def cached_export(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path, name: str) -> Path:
    """The ONNX export of ``checkpoint``, made once per session under pytest's base temporary folder."""
    from cellseg_deploy.backends.onnxrt.export import export_onnx

    out = tmp_path_factory.getbasetemp() / "onnx-cache" / f"{name}.onnx"
    if not out.exists():
        export_onnx(checkpoint, out)
    return out


@pytest.fixture(scope="session")
def parity_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ParityModel:
    """The tiny model trained on a synthetic set (``trained_tiny``). Where that fixture does not exist yet,
    the random tiny checkpoint and a small synthetic set stand in (score threshold 0.2)."""
    try:
        checkpoint, data_root = request.getfixturevalue("trained_tiny")
        return ParityModel(Path(checkpoint), Path(data_root), 0.5, trained=True)
    except pytest.FixtureLookupError:
        from cellseg_deploy.data.synth import SynthConfig, make_synthetic_dataset

        root = tmp_path_factory.mktemp("parity-data")
        make_synthetic_dataset(root, SynthConfig(n_train=10, n_test=1, seed=3), progress=False)
        return ParityModel(request.getfixturevalue("random_tiny_checkpoint"), root, 0.2, trained=False)


@pytest.fixture(scope="session")
def parity_onnx(parity_model: ParityModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The parity model's ONNX export."""
    return cached_export(tmp_path_factory, parity_model.checkpoint, "parity-tiny")


@pytest.fixture(scope="session")
def other_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ONNX export of a *different* checkpoint (random weights, another seed): a wrong candidate."""
    import torch

    from cellseg_deploy.modeling import ModelConfig, build_model, save_checkpoint

    torch.manual_seed(123)
    config = ModelConfig(arch="tiny", min_size=256, max_size=512)
    path = save_checkpoint(tmp_path_factory.mktemp("other") / "other.pt", build_model(config), config)
    return cached_export(tmp_path_factory, path, "other-tiny")


@pytest.fixture(scope="session")
def scaled_mask_onnx(parity_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The parity model's export with its mask probabilities multiplied by 0.7 inside the graph (a broken
    candidate whose boxes, labels and scores are right but whose masks shrink)."""
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
    out = tmp_path_factory.getbasetemp() / "onnx-cache" / "parity-tiny-scaled-masks.onnx"
    onnx.save(model, str(out))
    return out


@pytest.fixture(scope="session")
def scaled_logits_onnx(
    parity_onnx: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[float], Path]:
    """``factor -> path``: the parity model's export with its mask *logits* multiplied by ``factor`` before the
    Sigmoid (made once per factor). Thresholding at 0.5 hides most of it: the binary masks barely move."""

    def make(factor: float) -> Path:
        out = tmp_path_factory.getbasetemp() / "onnx-cache" / f"parity-tiny-mask-logits-x{factor:g}.onnx"
        return out if out.exists() else scale_mask_logits(parity_onnx, out, factor)

    return make
