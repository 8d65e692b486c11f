"""OpenVINO IR helpers shared by the runner and the int8 export: provenance and quantisation records kept in
``rt_info``, and the graph repairs both need before compiling.

- :func:`read_provenance`: the ONNX file's metadata that the IR carries over (source checkpoint, SHA-256).
- :func:`read_quantisation`: the ``rt_info[cellseg_int8]`` record written by :mod:`~cellseg_deploy.backends.openvino.int8`.
- :func:`repair_empty_branches`: makes "no detection" give ``N = 0`` rows (OpenVINO alone returns one garbage row).
- :func:`keep_roi_coordinates_fp32`: keeps RoIAlign's box coordinates fp32 under the bf16 hint.
- :func:`feed_resize_size_from_host`: the resize size becomes an input the runner computes in float64 (the
  CPU plugin runs the graph's float64 size arithmetic in float32, one pixel short for some image sizes).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

RT_INFO_KEY = "cellseg_int8"
"""The ``rt_info`` entry that marks an IR as quantised by this module (JSON string)."""


def read_quantisation(model: Any) -> dict[str, Any] | None:
    """The ``rt_info[cellseg_int8]`` record of an OpenVINO model, or ``None`` when it is not ours/int8."""
    if not model.has_rt_info([RT_INFO_KEY]):
        return None
    try:
        value = json.loads(str(model.get_rt_info([RT_INFO_KEY]).astype(str)))
    except (ValueError, TypeError):
        return None
    return value if isinstance(value, dict) else None


def read_provenance(model: Any) -> dict[str, Any]:
    """The provenance stored in the ONNX file's ``metadata_props``, which OpenVINO keeps under
    ``rt_info["framework"]`` (also in an IR saved from the ONNX model); ``{}`` when there is none."""
    from cellseg_deploy.backends.metadata import decode_props

    if not model.has_rt_info(["framework"]):
        return {}
    value = model.get_rt_info(["framework"]).astype(dict)
    return decode_props({str(k): v.astype(str) if hasattr(v, "astype") else str(v) for k, v in value.items()})


def repair_empty_branches(model: Any) -> int:
    """Give back the empty tensors OpenVINO's ONNX reader turns into scalars; returns how many were fixed.

    torchvision's ``batched_nms`` exports as an ``If``: when no box is left it returns a constant empty int64
    ``[0]`` tensor. OpenVINO (2026.4) reads that zero-size constant as a *scalar*, so on an image with no
    detection the graph returns one detection made of whatever memory the gathers read (a zero-area box,
    any label, a leftover score) instead of none. Here every ``If`` branch result that is a rank-0 constant
    while the other branch returns rank >= 1 is replaced by an empty constant of that rank (``[0, 1, ...]``),
    in place, before compilation. Graphs without such branches are left untouched.
    """
    import openvino.opset13 as ops

    fixed = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "If":
            continue
        then_body, else_body = op.get_then_body(), op.get_else_body()
        for bodies in ((then_body, else_body), (else_body, then_body)):
            for result, other in zip(bodies[0].get_results(), bodies[1].get_results(), strict=True):
                source = result.input_value(0).get_node()
                rank = other.get_output_partial_shape(0).rank
                if (
                    source.get_type_name() == "Constant"
                    and source.get_output_partial_shape(0).rank.get_length() == 0
                    and rank.is_static
                    and rank.get_length() >= 1
                ):
                    shape = (0,) + (1,) * (rank.get_length() - 1)
                    empty = ops.constant(np.zeros(shape, dtype=source.get_data().dtype))
                    result.input(0).replace_source_output(empty.output(0))
                    fixed += 1
            bodies[0].validate_nodes_and_infer_types()
    if fixed:
        model.validate_nodes_and_infer_types()
    return fixed


def keep_roi_coordinates_fp32(model: Any) -> int:
    """Keep the box coordinates that RoIAlign samples at in fp32 under a bf16 hint; returns how many RoIAlign
    inputs were kept.

    OpenVINO's CPU plugin runs every float node in bf16 under ``INFERENCE_PRECISION_HINT=bf16`` except the
    *tail* of the graph: the nodes found walking back from an output until a convolution, fully connected
    layer or matrix product (``Graph::EnforceInferencePrecision``). The final boxes are in that tail; the copy
    of them that ``MultiScaleRoIAlign`` concatenates with the batch index and splits per pyramid level is not
    (it reaches the outputs only through the mask head's convolutions). So RoIAlign sampled at coordinates
    rounded to bf16's 8 significant bits: 1 px steps from 128 px, 2 px from 256, 4 px from 512, so masks and
    segm AP got worse the farther a cell lies from the image origin (the figures are in docs/cpu-fast-path.md).

    Declaring each RoIAlign's ``rois`` input a model output puts that path in the tail, so it stays fp32 (a
    ``[R, 4]`` tensor: no measurable cost). The extra outputs are not read. Modifies ``model`` in place.
    """
    rois = [op.input_value(1) for op in model.get_ordered_ops() if op.get_type_name() == "ROIAlign"]
    if rois:
        model.add_outputs(rois)
    return len(rois)


RESIZE_SIZE_INPUT = "resized_size"
"""The input :func:`feed_resize_size_from_host` adds: int64 ``[2]``, the resized image's height and width."""


def feed_resize_size_from_host(model: Any) -> bool:
    """Make the resize size an input (:data:`RESIZE_SIZE_INPUT`) instead of a value the graph computes.

    The single-graph export computes the size of the resized image as eager torchvision does, in float64
    (``floor(side * min(min_size / short, max_size / long))``, see the ONNX export's resize). OpenVINO's CPU
    plugin has no float64 kernels and runs that arithmetic in float32, where ``165 * (256 / 165)`` is
    ``255.99998``: the image is resized to 255 px instead of 256 and every box, score and mask of such an image
    moves (the images whose side ``* scale`` is a whole number in exact arithmetic). ONNX Runtime runs float64 and
    is not affected. The runner computes the size with :func:`eager_resized_size` and feeds it; the graph's own
    size computation is left without consumers and dropped at compile time.

    Returns whether the size computation was found (``Floor`` in float64 feeding one ``Convert`` to int64).
    """
    import openvino as ov
    import openvino.opset13 as ops

    for op in model.get_ordered_ops():
        if op.get_type_name() != "Floor" or op.get_output_element_type(0) != ov.Type.f64:
            continue
        targets = list(op.output(0).get_target_inputs())
        convert = targets[0].get_node() if len(targets) == 1 else None
        if (
            convert is None
            or convert.get_type_name() != "Convert"
            or convert.get_output_element_type(0) != ov.Type.i64
        ):
            continue
        size = ops.parameter([2], ov.Type.i64, name=RESIZE_SIZE_INPUT)
        size.output(0).get_tensor().set_names({RESIZE_SIZE_INPUT})
        for consumer in list(convert.output(0).get_target_inputs()):
            consumer.replace_source_output(size.output(0))
        model.add_parameters([size])
        model.validate_nodes_and_infer_types()
        return True
    return False


def eager_resized_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """The size eager torchvision resizes an ``height x width`` image to (``GeneralizedRCNNTransform``, no
    ``fixed_size``): Python floats (float64) throughout, as ``interpolate(scale_factor=...,
    recompute_scale_factor=True)`` computes it."""
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return math.floor(height * scale), math.floor(width * scale)
