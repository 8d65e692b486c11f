"""int8 for the CPU: post-training static quantisation of the exported graph into an OpenVINO IR.

The single ONNX graph (:mod:`~cellseg_deploy.backends.onnxrt.export`) is read by OpenVINO and every heavy layer
gets ``FakeQuantize`` nodes on its two inputs, which OpenVINO's CPU plugin turns into int8 kernels (AMX-INT8 /
AVX512-VNNI); everything else runs as before (bf16 where the CPU has it, else fp32):

- **Which layers:** every ``Convolution``, ``ConvolutionBackpropData`` (the mask head's transposed
  convolution: the CPU plugin runs it in int8 on CPUs with AVX-512; on others only for static shapes, so there
  it stays bf16/fp32; its weights ``[C_in, C_out, kH, kW]`` are quantised per output channel, axis 1, the
  axis the plugin applies per-channel scales on) and constant-weight
  ``MatMul`` (backbone, FPN, RPN conv, box head ``fc6``/``fc7``, the four mask-head convolutions and their
  upsampling), except the small layers whose outputs are the answers (RPN ``cls_logits``/``bbox_pred``,
  ``cls_score``, ``bbox_pred``, ``mask_fcn_logits``) and the first convolution (3 input channels: cheap, and
  the one most sensitive to the input's range). Box decoding, NMS, RoIAlign's coordinates and the outputs
  stay fp32 as in the bf16 path.
- **Weights:** symmetric, per output channel, 255 levels (``[-max|w|, max|w|]`` of each channel).
- **Shared activations:** one ``FakeQuantize`` per tensor, shared by all its quantised consumers; the backbone's
  residual additions get their inputs quantised too, so the tensor between two bottleneck blocks is int8 for
  both the next convolution and the shortcut and OpenVINO does not convert it back and forth.
- **Activations:** per tensor, 256 levels over ``[min(0, lo), hi]``, where ``lo``/``hi`` come from
  calibration: the graph runs in fp32 on the calibration images and each quantised layer's input range is
  the mean over the images of each image's minimum and maximum ("averaged min/max": one outlier image
  does not stretch the range for all). Chosen over the plain min/max over all images and the 99.99th
  percentile by segm AP50 on two models (docs/cpu-fast-path.md, "Measurements behind the design").
- **Calibration images:** the training split of a dataset root (``calib_data``; never its validation split,
  which the accuracy checks use), a folder of images, or, when none is given, synthetic cell images from
  :mod:`cellseg_deploy.data.synth` (said once in the log: fine for speed, but calibrate on your own training
  images before you trust the accuracy).

The IR (``.xml`` with its ``.bin``) keeps the ONNX file's provenance and adds ``rt_info[cellseg_int8]``
(JSON: scheme, layers, calibration source and count, the ONNX file's SHA-256); the ``openvino`` runner reads
it at ``--precision int8`` only. Its speed against bf16 and its accuracy against PyTorch fp32 are in
docs/cpu-fast-path.md.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cellseg_deploy.backends.openvino.ir import RT_INFO_KEY
from cellseg_deploy.errors import BackendUnavailable, DataError, UserError

log = logging.getLogger(__name__)


QUANTISED_TYPES: tuple[str, ...] = ("Convolution", "ConvolutionBackpropData", "MatMul")
SKIPPED_NAMES: tuple[str, ...] = (
    "cls_logits",
    "bbox_pred",
    "cls_score",
    "mask_fcn_logits",
    "body/conv1/",
)
"""Layers left unquantised, by a part of their ONNX node name (see the module docstring)."""

DEFAULT_CALIB_IMAGES = 16
SYNTH_CALIB_SIZE = 512
SYNTH_CALIB_CELLS = (40, 300)


@dataclass
class Int8Result:
    """What :func:`quantize_onnx` wrote.

    Attributes:
        path / bin_path: the IR's ``.xml`` and ``.bin``.
        quantised_layers: ONNX node names of the layers given int8 inputs.
        calibration: ``{"source", "images", "ranges"}`` (as recorded in the IR) and ``"seconds"``, the
            calibration's wall time (kept out of the IR, so the same inputs give the same file).
        seconds: wall time of calibration, quantisation and saving.
        sha256: SHA-256 of the ``.xml``.
    """

    path: Path
    bin_path: Path
    quantised_layers: list[str]
    calibration: dict[str, Any]
    seconds: float
    sha256: str
    onnx: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"], d["bin_path"] = str(self.path), str(self.bin_path)
        return d


def _import_openvino() -> Any:
    try:
        import openvino as ov
    except ImportError as exc:
        raise BackendUnavailable(
            "int8 quantisation runs in OpenVINO, which is not installed: pip install 'cellseg-deploy[openvino]'"
        ) from exc
    return ov


# -- calibration images ------------------------------------------------------------------------------------


def calibration_images(
    data: Path | None, count: int = DEFAULT_CALIB_IMAGES, seed: int = 0
) -> tuple[list[np.ndarray], str]:
    """Up to ``count`` RGB uint8 ``[H, W, 3]`` images to calibrate on, and a one-line description of them.

    ``data``: a dataset root (its ``train/`` split as :func:`~cellseg_deploy.data.layout.split_train_val`
    makes it with ``seed``: the training part only), a folder of image files, or ``None`` for synthetic
    ``512 x 512`` cell images (40 to 300 cells, fixed seed).

    Raises:
        DataError: ``data`` holds no image.
        UserError: ``count < 1``.
    """
    from cellseg_deploy.data.io import read_image
    from cellseg_deploy.data.layout import list_images, list_train_ids, split_train_val, train_dir

    if count < 1:
        raise UserError(f"--calib-images must be at least 1, got {count}")
    if data is None:
        from cellseg_deploy.data.synth import render_image

        rng = np.random.default_rng(seed)
        images = [
            render_image(rng, SYNTH_CALIB_SIZE, SYNTH_CALIB_SIZE, int(rng.integers(*SYNTH_CALIB_CELLS))).image
            for _ in range(count)
        ]
        log.warning(
            "calibrating int8 on %d synthetic cell images (no --calib-data): fine for speed; calibrate on your "
            "own training images before trusting the accuracy",
            count,
        )
        return images, f"{count} synthetic {SYNTH_CALIB_SIZE}x{SYNTH_CALIB_SIZE} images (seed {seed})"
    data = Path(data)
    if (data / "train").is_dir():
        train_ids, _ = split_train_val(list_train_ids(data), seed=seed)
        paths = [train_dir(data) / i / "image.tif" for i in train_ids[:count]]
        what = f"images of the training split of {data}"
    else:
        paths = list_images(data)[:count]
        what = f"images in {data}"
    if not paths:
        raise DataError(
            f"{data}: no image to calibrate on; give a dataset root with train/ or a folder of images"
        )
    return [read_image(p) for p in paths], f"{len(paths)} {what}"


# -- the graph ---------------------------------------------------------------------------------------------


def _constant_source(value: Any) -> Any:
    """The ``Constant`` node behind an input (through ``Convert`` nodes), or ``None``."""
    node = value.get_node()
    while node.get_type_name() == "Convert":
        node = node.input_value(0).get_node()
    return node if node.get_type_name() == "Constant" else None


def quantisable_layers(model: Any) -> list[Any]:
    """The OpenVINO ops of ``model`` that get int8 inputs (see the module docstring), in graph order."""
    return [
        op
        for op in model.get_ordered_ops()
        if op.get_type_name() in QUANTISED_TYPES
        and not any(s in op.get_friendly_name() for s in SKIPPED_NAMES)
        and _constant_source(op.input_value(1)) is not None
    ]


def _is_residual_add(op: Any) -> bool:
    """A backbone addition of two activations (``out += identity`` of a ResNet block, named ``.../Add`` in the
    export), not the bias addition OpenVINO splits off a convolution (named ``.../Conv``, one constant input)."""
    name = op.get_friendly_name()
    return (
        op.get_type_name() == "Add"
        and "/backbone/body/" in name
        and name.rsplit("/", 1)[-1].startswith("Add")
        and all(_constant_source(op.input_value(i)) is None for i in (0, 1))
    )


def _port_key(value: Any) -> str:
    """A stable name for one tensor of the graph: ``producer name:output index``."""
    return f"{value.get_node().get_friendly_name()}:{value.get_index()}"


def quantised_inputs(model: Any) -> list[tuple[Any, int]]:
    """``(op, input index)`` of every activation that gets a ``FakeQuantize``: the data input of each
    quantisable layer and both inputs of the backbone's residual additions (so the tensor between two
    bottleneck blocks is quantised once, for the next block's convolution and for its shortcut alike, and
    OpenVINO can keep it int8 instead of converting it per consumer).

    The residual additions were measured both ways (docs/cpu-fast-path.md): quantising them makes the network
    faster (fewer bf16 <-> int8 reorders and stand-alone FakeQuantize nodes) for a small, mixed change in segm
    AP50 against PyTorch fp32."""
    pairs = [(op, 0) for op in quantisable_layers(model)]
    return pairs + [(op, i) for op in model.get_ordered_ops() if _is_residual_add(op) for i in (0, 1)]


def _read(onnx_path: Path) -> Any:
    from cellseg_deploy.backends.openvino.ir import repair_empty_branches

    ov = _import_openvino()
    model = ov.Core().read_model(str(onnx_path))
    repair_empty_branches(model)
    return model


def calibrate(
    model: Any, images: list[np.ndarray], threads: int | None = None
) -> dict[str, tuple[float, float]]:
    """Run (a clone of) ``model`` in fp32 on ``images`` and return the range ``(lo, hi)`` of every tensor that
    :func:`quantised_inputs` quantises, keyed by :func:`_port_key`: the mean over the images of the
    per-image minimum and maximum. The keys hold for ``model`` itself (OpenVINO numbers some node names anew
    each time a file is read, so calibrate and quantise the same read).

    Tensors that saw no values (e.g. the mask head's on images without detections) are left out.
    """
    from tqdm import tqdm

    ov = _import_openvino()
    model = model.clone()
    ports: dict[str, Any] = {}
    for op, index in quantised_inputs(model):
        value = op.input_value(index)
        ports.setdefault(_port_key(value), value)
    n_outputs = len(model.outputs)
    model.add_outputs(list(ports.values()))
    slot = {key: n_outputs + i for i, key in enumerate(ports)}
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": 1}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    request = ov.Core().compile_model(model, "CPU", config).create_infer_request()
    lows: dict[str, list[float]] = {key: [] for key in slot}
    highs: dict[str, list[float]] = {key: [] for key in slot}
    for image in tqdm(images, desc="int8 calibration", unit="img", leave=False):
        request.infer({0: np.ascontiguousarray(image, dtype=np.uint8)})
        for key, index in slot.items():
            values = np.asarray(request.get_output_tensor(index).data).ravel()
            if values.size:
                lows[key].append(float(values.min()))
                highs[key].append(float(values.max()))
    return {key: (float(np.mean(lows[key])), float(np.mean(highs[key]))) for key in slot if lows[key]}


def _weight_axis(op: Any) -> int:
    """The output-channel axis of ``op``'s weight tensor."""
    if op.get_type_name() == "MatMul":
        return 0 if op.get_attributes().get("transpose_b", False) else 1
    if op.get_type_name() == "ConvolutionBackpropData":
        return 1  # [C_in, C_out, kH, kW]
    return 0  # Convolution: [C_out, C_in, kH, kW]


def insert_fake_quantize(model: Any, ranges: dict[str, tuple[float, float]]) -> list[str]:
    """Quantise ``model`` in place with the calibrated ``ranges``: one activation ``FakeQuantize`` per
    calibrated tensor, shared by all its quantised consumers, and per-channel weight ``FakeQuantize`` on every
    quantisable layer whose input was calibrated. Returns the names of those layers."""
    import openvino.opset13 as ops

    def const(value: Any) -> Any:
        return ops.constant(np.asarray(value, np.float32))

    layers = {op.get_friendly_name() for op in quantisable_layers(model)}
    shared: dict[str, Any] = {}
    done = []
    for op, index in quantised_inputs(model):
        value = op.input_value(index)
        key = _port_key(value)
        if key not in ranges:
            continue
        if key not in shared:
            lo, hi = min(ranges[key][0], 0.0), max(ranges[key][1], 1e-6)
            shared[key] = ops.fake_quantize(value, const(lo), const(hi), const(lo), const(hi), 256)
        op.input(index).replace_source_output(shared[key].output(0))
        if index != 0 or op.get_friendly_name() not in layers:
            continue
        weights = _constant_source(op.input_value(1)).get_data().astype(np.float32)
        axis = _weight_axis(op)
        reduce = tuple(i for i in range(weights.ndim) if i != axis)
        limit = np.maximum(np.abs(weights).max(axis=reduce, keepdims=True), 1e-12).astype(np.float32)
        fq_weights = ops.fake_quantize(
            ops.constant(weights), const(-limit), const(limit), const(-limit), const(limit), 255
        )
        op.input(1).replace_source_output(fq_weights.output(0))
        done.append(op.get_friendly_name())
    model.validate_nodes_and_infer_types()
    return done


def _save_ir(model: Any, out: Path) -> Path:
    """Write ``out`` (``.xml``) and its ``.bin`` atomically: both go to a temporary folder beside ``out``,
    then the ``.bin`` and last the ``.xml`` are renamed into place (an ``.xml`` never points at a partial
    ``.bin``)."""
    ov = _import_openvino()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
        os.replace(tmp / "model.bin", out.with_suffix(".bin"))
        os.replace(tmp / "model.xml", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out.with_suffix(".bin")


def quantize_onnx(
    onnx_path: Path,
    out: Path,
    images: list[np.ndarray],
    *,
    source: str = "given images",
    threads: int | None = None,
) -> Int8Result:
    """Calibrate the single-graph export ``onnx_path`` on ``images`` and write the int8 IR ``out`` (``.xml``).

    Raises:
        UserError: ``out`` does not end in ``.xml``, or no image.
    """
    from cellseg_deploy.io_utils import sha256_file

    t0 = time.perf_counter()
    out = Path(out)
    if out.suffix.lower() != ".xml":
        raise UserError(f"output {out} must end in .xml (an OpenVINO IR; its .bin is written beside it)")
    if not images:
        raise UserError("int8 calibration needs at least one image")
    model = _read(Path(onnx_path))
    ranges = calibrate(model, images, threads=threads)
    calib_s = time.perf_counter() - t0
    layers = insert_fake_quantize(model, ranges)
    calibration = {
        "source": source,
        "images": len(images),
        "ranges": "mean of per-image min/max",
    }
    record = {
        "scheme": "FakeQuantize int8: weights symmetric per output channel (255 levels), activations per "
        "tensor over the calibrated range (256 levels)",
        "layers": len(layers),
        "activations": len(ranges),
        "calibration": calibration,
        "onnx_sha256": sha256_file(onnx_path),
    }
    model.set_rt_info(json.dumps(record), RT_INFO_KEY)
    bin_path = _save_ir(model, out)
    return Int8Result(
        path=out,
        bin_path=bin_path,
        quantised_layers=layers,
        calibration={**calibration, "seconds": round(calib_s, 2)},
        seconds=round(time.perf_counter() - t0, 2),
        sha256=sha256_file(out),
    )


def export_openvino_int8(
    checkpoint: Path,
    out: Path,
    *,
    calib_data: Path | None = None,
    calib_images: int = DEFAULT_CALIB_IMAGES,
) -> Int8Result:
    """Checkpoint -> single ONNX graph (checked against PyTorch, kept in a temporary folder) -> int8 IR ``out``.

    ``calib_data``: see :func:`calibration_images`.
    """
    from cellseg_deploy.backends.onnxrt.export import export_onnx

    out = Path(out)
    if out.suffix.lower() != ".xml":
        raise UserError(f"output {out} must end in .xml (an OpenVINO IR; its .bin is written beside it)")
    _import_openvino()
    images, source = calibration_images(calib_data, calib_images)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".int8-", dir=out.parent) as tmp:
        onnx_result = export_onnx(Path(checkpoint), Path(tmp) / "model.onnx")
        result = quantize_onnx(onnx_result.path, out, images, source=source)
    result.onnx = {"sha256": onnx_result.sha256, "checkpoint": str(checkpoint)}
    return result
