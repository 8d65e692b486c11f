"""Helpers shared by the parity tests (a module with a unique name, importable from this folder)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ParityModel:
    """The model the parity tests check: checkpoint, its synthetic data set, and the score threshold at which
    its instances must agree (0.5 for the trained model; random weights never score that high)."""

    checkpoint: Path
    data_root: Path
    score_thresh: float
    trained: bool


MASK_LOGITS_NODE = "/roi_heads/mask_predictor/mask_fcn_logits/Conv"
"""The exported graph's node that computes the mask logits (every class, ``[N, C, M, M]``)."""


def scale_mask_logits(src: Path, dst: Path, factor: float) -> Path:
    """Copy the ONNX graph ``src`` to ``dst`` with the mask logits multiplied by ``factor`` before the mask
    head's Sigmoid: a broken export whose boxes, labels and scores are right and whose binary masks barely
    change (each pixel's probability moves but mostly stays on its side of 0.5)."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    producer = {out: node for node in model.graph.node for out in node.output}
    sigmoids = [
        node
        for node in model.graph.node
        if node.op_type == "Sigmoid"
        and getattr(producer.get(node.input[0]), "name", None) == MASK_LOGITS_NODE
    ]
    assert len(sigmoids) == 1, f"expected one Sigmoid after {MASK_LOGITS_NODE}, found {len(sigmoids)}"
    sigmoid = sigmoids[0]
    model.graph.initializer.append(numpy_helper.from_array(np.array(factor, np.float32), "mask_logit_scale"))
    mul = helper.make_node(
        "Mul", [sigmoid.input[0], "mask_logit_scale"], ["mask_logits_scaled"], name="mask_logit_scale"
    )
    sigmoid.input[0] = "mask_logits_scaled"
    nodes = list(model.graph.node)
    model.graph.node.insert(nodes.index(sigmoid), mul)  # keep the graph topologically sorted
    onnx.checker.check_model(model)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return dst
