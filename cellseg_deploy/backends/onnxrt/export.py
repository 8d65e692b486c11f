"""Export a checkpoint to one ONNX graph: uint8 image in, raw detections (28 x 28 mask probabilities) out.

The exported module is :class:`~cellseg_deploy.modeling.raw.RawMaskRCNN`, so the graph holds pre-processing
(scaling, normalisation, resizing), the backbone, RPN, box head with NMS, and the mask head, and stops before
mask pasting (done on the host by :mod:`cellseg_deploy.postprocess`, identically for every backend).

Graph contract:

- input ``image``: uint8 ``[height, width, 3]`` RGB at the original size (both sides dynamic by default).
- outputs (:data:`~cellseg_deploy.modeling.raw.OUTPUT_NAMES`), ``N`` dynamic, ``N >= 0``:
  ``boxes`` float32 ``[N, 4]`` ``x1, y1, x2, y2`` in original-image pixels; ``labels`` int64 ``[N]`` in 1..C;
  ``scores`` float32 ``[N]`` (descending); ``mask_probs`` float32 ``[N, M, M]`` (``M`` = 28) relative to
  each box.

How it is made and checked (each step can fail loudly; nothing is written unless all pass):

1. ``torch.onnx.export(..., dynamo=False)`` (the TorchScript tracer; the dynamo exporter fails on
   torchvision's ``batched_nms``). The trace image must give detections, otherwise the mask branch is traced
   on an empty tensor; by default it is a synthetic cell image, checked with PyTorch first.
2. ``onnx.checker.check_model``.
3. Self-check with ONNX Runtime (CPU) against PyTorch on the trace image and on two images of other sizes
   (and so other ``N``), one of them large: proves neither the trace size nor the trace ``N`` is baked into
   the graph, and that the graph resizes exactly as eager PyTorch does (see :func:`_resize_like_eager`).
4. Optional ``onnxslim`` simplification, kept only when it gives the same outputs as the plain graph on both
   check images (otherwise the plain graph is written and the reason recorded).
5. Provenance (:mod:`cellseg_deploy.backends.metadata`) in ``metadata_props``; atomic write.

The exporter is deterministic: exporting one checkpoint twice gives the same ``graph_sha256`` (the file minus
its metadata); the files are byte-identical when ``SOURCE_DATE_EPOCH`` fixes the export time.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
import types
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cellseg_deploy.errors import CheckFailed, ModelFileError, UserError

if TYPE_CHECKING:
    import onnx
    import torch
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    from cellseg_deploy.modeling.raw import RawMaskRCNN

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
MIN_OPSET = 16
"""The lowest opset accepted (RoiAlign gained ``coordinate_transformation_mode`` in 16; 16 to 20 export and pass
the self-check)."""
MAX_OPSET = 20
"""The TorchScript-based exporter's highest opset (``torch.onnx._constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET``)."""
EXPORTER = "torch.onnx.export(dynamo=False)"
INPUT_NAME = "image"
MAX_PROTOBUF_BYTES = 2**31 - 1
"""Protobuf's limit on one serialised message; larger models would need ONNX external data."""

# Self-check tolerances (ONNX Runtime fp32 vs PyTorch fp32 on the same image). Both sides compute in fp32, so
# their differences are rounding noise far below these bounds (each export records its largest differences in
# ExportResult.checks); the bounds catch a broken graph, not numerical noise.
_CHECK_BOX_TOL_PX = 0.5
_CHECK_SCORE_TOL = 1e-3
_CHECK_MASK_TOL = 1e-2
_CHECK_MIN_MATCHED = 0.98


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_onnx` wrote.

    Attributes:
        path: the ONNX file.
        size_bytes: its size.
        seconds: wall time of the whole export (trace, checks, optional simplification, write).
        sha256: hex SHA-256 of the file's bytes.
        metadata: the provenance stored inside the file (decoded, see :mod:`cellseg_deploy.backends.metadata`).
        checks: what the self-check measured: detections on each check image for PyTorch and ONNX Runtime,
            largest box/score/mask differences, simplification outcome, time per step.
    """

    path: Path
    size_bytes: int
    seconds: float
    sha256: str
    metadata: dict[str, Any]
    checks: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return {
            "format": "onnx",
            "path": str(self.path),
            "size_bytes": self.size_bytes,
            "seconds": round(self.seconds, 3),
            "sha256": self.sha256,
            "metadata": self.metadata,
            "checks": self.checks,
        }


def export_onnx(
    checkpoint: Path,
    out: Path,
    *,
    opset: int = DEFAULT_OPSET,
    simplify: bool = False,
    trace_image: np.ndarray | None = None,
    dynamic: bool = True,
) -> ExportResult:
    """Export ``checkpoint`` to the ONNX file ``out`` (see the module docstring for the graph contract).

    Args:
        checkpoint: a cellseg-deploy checkpoint (``.pt``).
        out: the ONNX file to write (parent folders are created; an existing file is replaced atomically).
        opset: ONNX opset version, :data:`MIN_OPSET` to :data:`MAX_OPSET` (17 is the tested default).
        simplify: run ``onnxslim`` and keep its graph if it gives the same outputs.
        trace_image: RGB uint8 ``[H, W, 3]`` image to trace with; it must give at least one detection.
            ``None``: a synthetic cell image (the synthetic data set's renderer first, then
            :func:`~cellseg_deploy.data.synth.fluorescence_cell_image` variants).
        dynamic: dynamic ``height``/``width`` on the input. ``False`` fixes the input to the trace image's
            size (the number of detections stays dynamic).

    Returns:
        :class:`ExportResult`.

    Raises:
        CheckpointError: ``checkpoint`` is missing, corrupt or not a cellseg-deploy checkpoint.
        UserError: a bad option or trace image (e.g. no detections on it).
        CheckFailed: the exported graph disagrees with PyTorch on the check images.
        BackendUnavailable: ``simplify`` asked for, but ``onnxslim`` is not installed.
    """
    t_start = time.perf_counter()
    import torch

    from cellseg_deploy.backends import metadata as md
    from cellseg_deploy.io_utils import atomic_write_bytes, sha256_file
    from cellseg_deploy.modeling.checkpoint import load_checkpoint
    from cellseg_deploy.modeling.raw import RawMaskRCNN

    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UserError(
            f"opset must lie in {MIN_OPSET}..{MAX_OPSET} (the TorchScript exporter's range for this model), got {opset}"
        )
    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise UserError(f"output {out} must end in .onnx")
    if simplify:
        _require_onnxslim()
    ckpt = load_checkpoint(checkpoint)  # CheckpointError before anything is written
    ckpt_sha = sha256_file(checkpoint)
    raw = RawMaskRCNN(ckpt.build_model()).eval()
    mask_size = _mask_size(raw)
    checks: dict[str, Any] = {}

    # 1. Trace image (must give detections) and check images of other sizes.
    with torch.inference_mode():
        image, n_trace, source = _pick_trace_image(raw, trace_image)
    checks["trace_image"] = {
        "source": source,
        "size": [int(image.shape[0]), int(image.shape[1])],
        "detections": n_trace,
    }
    check_images = [image] if not dynamic else [image, *_more_check_images(image)]

    # 2. Trace and export.
    t0 = time.perf_counter()
    proto = _trace_to_onnx(raw, image, opset=opset, dynamic=dynamic, mask_size=mask_size)
    checks["export_s"] = round(time.perf_counter() - t0, 3)
    _check_model(proto)

    # 3. ONNX Runtime vs PyTorch on the check images.
    t0 = time.perf_counter()
    with torch.inference_mode():
        references = [_torch_outputs(raw, im) for im in check_images]
    plain_outputs = _ort_outputs(proto, check_images)
    checks["images"] = []
    for im, ref, got in zip(check_images, references, plain_outputs, strict=True):
        cmp = compare_raw_outputs(ref, got)
        cmp["size"] = [int(im.shape[0]), int(im.shape[1])]
        checks["images"].append(cmp)
        if not cmp["ok"]:
            raise CheckFailed(
                f"the exported graph disagrees with PyTorch on a {im.shape[0]}x{im.shape[1]} image: {cmp['reason']}; "
                "nothing was written"
            )
    checks["verify_s"] = round(time.perf_counter() - t0, 3)
    if dynamic and len({c["ort_detections"] for c in checks["images"]}) == 1:
        log.info(
            "note: every check image gave %d detections, so a baked-in N would go unnoticed",
            checks["images"][0]["ort_detections"],
        )

    # 4. Optional simplification, kept only when it changes nothing.
    if simplify:
        t0 = time.perf_counter()
        proto, checks["simplify"] = _simplify(proto, check_images, plain_outputs)
        checks["simplify"]["seconds"] = round(time.perf_counter() - t0, 3)

    # 5. Provenance and atomic write.
    graph_hash = md.graph_sha256(proto)
    meta = md.provenance(
        ckpt,
        ckpt_sha,
        exporter=EXPORTER,
        opset=opset,
        mask_size=mask_size,
        extra={
            "graph_sha256": graph_hash,
            "simplified": bool(simplify and checks["simplify"]["kept"]),
            "dynamic_input": dynamic,
            "inputs": {
                INPUT_NAME: "uint8 [height, width, 3] RGB, original size"
                + ("" if dynamic else f" (fixed {image.shape[0]}x{image.shape[1]})")
            },
            "outputs": {
                "boxes": "float32 [N, 4] x1 y1 x2 y2, original-image pixels",
                "labels": "int64 [N], 1..C (class_names[label - 1])",
                "scores": "float32 [N], descending",
                "mask_probs": f"float32 [N, {mask_size}, {mask_size}] probabilities relative to each box (not pasted)",
            },
        },
    )
    md.set_onnx_metadata(proto, meta)
    data = proto.SerializeToString(deterministic=True)
    if len(data) > MAX_PROTOBUF_BYTES:
        raise ModelFileError(
            f"the exported model is {len(data) / 2**30:.1f} GiB, over protobuf's 2 GiB limit for one file"
        )
    atomic_write_bytes(out, data)
    seconds = time.perf_counter() - t_start
    log.debug("exported %s (%.1f MB) in %.1f s", out, len(data) / 1e6, seconds)
    return ExportResult(
        path=out,
        size_bytes=len(data),
        seconds=seconds,
        sha256=sha256_file(out),
        metadata=meta,
        checks=checks,
    )


# ----------------------------------------------------------------------------------------------------------
# Tracing
# ----------------------------------------------------------------------------------------------------------
def _mask_size(raw: RawMaskRCNN) -> int:
    """``M`` of the mask head's ``M x M`` output: twice the mask RoIAlign size (one transposed conv)."""
    pool = raw.model.roi_heads.mask_roi_pool
    size = pool.output_size if pool is not None else (14, 14)
    return 2 * int(size[0] if isinstance(size, tuple | list) else size)


@contextlib.contextmanager
def _quiet_tracer() -> Iterator[None]:
    """Silence the tracer's warnings (Python values baked as constants, e.g. in torchvision's shape
    arithmetic) for this block only; the self-check against PyTorch is what proves the graph right."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings(
            "ignore", message=r".*legacy TorchScript-based ONNX export", category=DeprecationWarning
        )
        for category in (UserWarning, DeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category, module=r"(torch|torchvision)(\.|$)")
        yield


def _trace_to_onnx(
    raw: RawMaskRCNN, image: np.ndarray, *, opset: int, dynamic: bool, mask_size: int
) -> onnx.ModelProto:
    import onnx
    import torch

    from cellseg_deploy.backends.onnxrt.roi_merge import gather_level_merge
    from cellseg_deploy.modeling.raw import OUTPUT_NAMES

    dynamic_axes: dict[str, dict[int, str]] = {name: {0: "N"} for name in OUTPUT_NAMES}
    if dynamic:
        dynamic_axes[INPUT_NAME] = {0: "height", 1: "width"}
    raw.eval()
    transform = raw.model.transform
    # Only this export copy of the model is patched; the eager reference keeps torchvision's resize.
    transform.resize = types.MethodType(_resize_like_eager, transform)
    try:
        # gather_level_merge: one Gather instead of torchvision's per-level ScatterElements in the traced
        # MultiScaleRoIAlign (bit-identical outputs, less ONNX Runtime CPU time; see roi_merge.py).
        with (
            _quiet_tracer(),
            torch.no_grad(),
            gather_level_merge(),
            tempfile.TemporaryDirectory(prefix="cellseg-export-") as tmp,
        ):
            traced = Path(tmp) / "model.onnx"
            torch.onnx.export(
                raw,
                (torch.from_numpy(np.ascontiguousarray(image)),),
                traced,
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
            proto = onnx.load(str(traced))
    finally:
        del transform.resize  # back to the class's method
        # torch.onnx.export restores the wrapper's mode afterwards, recursively: keep the detector in eval.
        raw.eval()
    # The tracer leaves the mask dims symbolic ("Gather..._dim_1"); they are fixed by the architecture.
    for output in proto.graph.output:
        if output.name == "mask_probs":
            dims = output.type.tensor_type.shape.dim
            for d in list(dims)[1:]:
                d.Clear()
                d.dim_value = mask_size
    proto.doc_string = "cellseg-deploy Mask R-CNN: uint8 image [H, W, 3] -> boxes, labels, scores, mask_probs"
    return proto


def _resize_like_eager(
    self: GeneralizedRCNNTransform, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """``GeneralizedRCNNTransform.resize`` for tracing, with the output size computed as eager PyTorch does.

    Eager torchvision computes the scale in Python floats (float64) and ``interpolate`` takes
    ``floor(side * scale)`` in float64; its traced path computes both in float32, which for some sizes gives
    one pixel less (2500 x 1900 -> 336 x 255 instead of 336 x 256), so every box and score of the exported
    graph would differ from PyTorch's on such images. Here the size is computed in float64 inside the graph
    (``Shape -> Cast(double) -> Div/ReduceMin/Mul/Floor``) and passed to ``interpolate`` as a size, which is
    exactly eager's arithmetic (checked equal to eager's size for 2,145 image sizes from 1 to 3,000 px). Inference only (``target`` is None, no ``fixed_size``); anything else defers to
    torchvision.
    """
    import torch
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    if self.training or target is not None or self.fixed_size is not None:
        return GeneralizedRCNNTransform.resize(self, image, target)
    # Every operand is a float64 tensor of rank >= 1: the exporter casts 0-d (scalar) operands to float32.
    shape = torch._shape_as_tensor(image)[-2:].to(torch.float64)
    limits = torch.tensor([float(self.min_size[-1]), float(self.max_size)], dtype=torch.float64)
    extremes = torch.stack([shape.min(), shape.max()])
    scale = (limits / extremes).min(dim=0, keepdim=True)[0]
    size = torch.floor(shape * scale).to(torch.int64)
    resized = torch.nn.functional.interpolate(
        image[None],
        size=(size[0], size[1]),  # type: ignore[arg-type]  # traced: tensors keep the size dynamic
        mode="bilinear",
        align_corners=False,
    )[0]
    return resized, target


def _check_model(proto: onnx.ModelProto) -> None:
    import onnx

    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise CheckFailed(
            f"onnx.checker rejects the exported graph: {str(exc).splitlines()[0][:200]}"
        ) from exc


def _torch_outputs(raw: RawMaskRCNN, image: np.ndarray) -> list[np.ndarray]:
    import torch

    return [t.detach().cpu().numpy() for t in raw(torch.from_numpy(np.ascontiguousarray(image)))]


def _ort_outputs(proto: onnx.ModelProto, images: list[np.ndarray]) -> list[list[np.ndarray]]:
    """ONNX Runtime (CPU, default optimisations) outputs of ``proto`` on each image."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [list(session.run(None, {INPUT_NAME: np.ascontiguousarray(im)})) for im in images]


def compare_raw_outputs(ref: list[np.ndarray], cand: list[np.ndarray]) -> dict[str, Any]:
    """Compare two sets of raw outputs ``(boxes, labels, scores, mask_probs)`` of one image.

    Detections are paired by the project's matcher (:func:`cellseg_deploy.matching.match_boxes`: same class,
    optimal assignment on the largest box-coordinate difference), so near-equal scores listed in another order
    do not count as differences. Used by the export self-check, where both sides are fp32 on the CPU: a pair is
    a match when its boxes agree within ``_CHECK_BOX_TOL_PX``.

    Returns:
        ``{"ok", "reason", "torch_detections", "ort_detections", "matched", "max_box_diff",
        "max_score_diff", "max_mask_diff"}`` (differences over the matched pairs; 0 when none).
    """
    from cellseg_deploy.matching import match_boxes

    rb, rl, rs, rm = ref
    cb, cl, cs, cm = cand
    n_ref, n_cand = len(rb), len(cb)
    ref_partner, _, _ = match_boxes(rb, rl, cb, cl, _CHECK_BOX_TOL_PX)
    pairs = [(r, int(c)) for r, c in enumerate(ref_partner) if c >= 0]
    result: dict[str, Any] = {
        "torch_detections": n_ref,
        "ort_detections": n_cand,
        "matched": len(pairs),
        "max_box_diff": 0.0,
        "max_score_diff": 0.0,
        "max_mask_diff": 0.0,
    }
    if pairs:
        r_idx = np.array([p[0] for p in pairs])
        c_idx = np.array([p[1] for p in pairs])
        result["max_box_diff"] = float(np.abs(rb[r_idx] - cb[c_idx]).max())
        result["max_score_diff"] = float(np.abs(rs[r_idx] - cs[c_idx]).max())
        result["max_mask_diff"] = float(
            np.abs(rm[r_idx].reshape(len(pairs), -1) - cm[c_idx].reshape(len(pairs), -1)).max()
        )
    need = _CHECK_MIN_MATCHED * max(n_ref, n_cand)
    reasons = []
    if len(pairs) < need:
        reasons.append(
            f"{n_ref} detections in PyTorch, {n_cand} in ONNX Runtime, only {len(pairs)} agree within {_CHECK_BOX_TOL_PX} px"
        )
    if result["max_score_diff"] > _CHECK_SCORE_TOL:
        reasons.append(f"score differs by up to {result['max_score_diff']:.2e} (> {_CHECK_SCORE_TOL})")
    if result["max_mask_diff"] > _CHECK_MASK_TOL:
        reasons.append(
            f"mask probability differs by up to {result['max_mask_diff']:.2e} (> {_CHECK_MASK_TOL})"
        )
    result["ok"] = not reasons
    result["reason"] = "; ".join(reasons)
    return result


# ----------------------------------------------------------------------------------------------------------
# Trace and check images
# ----------------------------------------------------------------------------------------------------------
def _trace_candidates() -> Iterator[tuple[str, np.ndarray]]:
    """The default trace images, in the order tried: the synthetic data set's own renderer first (what demo
    and test models are trained on), then fluorescence-like images for models that see nothing in it."""
    from cellseg_deploy.data.synth import fluorescence_cell_image, render_image

    # Non-square, neither side equal to a typical min_size, so a baked-in size or an H/W swap shows up.
    yield "synthetic stained cells 320x416", render_image(np.random.default_rng(0), 320, 416, 60).image
    yield "synthetic cells 320x416", fluorescence_cell_image(320, 416, seed=0, n_cells=60)
    yield (
        "synthetic cells (inverted) 320x416",
        fluorescence_cell_image(320, 416, seed=1, n_cells=60, invert=True),
    )
    yield "synthetic cells (large) 320x416", fluorescence_cell_image(320, 416, seed=2, n_cells=30) // 2 * 2


def _pick_trace_image(raw: RawMaskRCNN, given: np.ndarray | None) -> tuple[np.ndarray, int, str]:
    """The trace image, the number of detections PyTorch gives on it, and where it came from."""
    from cellseg_deploy.backends.base import check_image

    if given is not None:
        check_image(given)
        n = len(_torch_outputs(raw, given)[0])
        if n == 0:
            raise UserError(
                f"the model detects nothing on the given {given.shape[0]}x{given.shape[1]} trace image; tracing "
                "needs at least one detection (else the mask branch is traced on an empty tensor): pass an image with cells"
            )
        return given, n, "given"
    tried = []
    for name, image in _trace_candidates():
        n = len(_torch_outputs(raw, image)[0])
        if n > 0:
            return image, n, name
        tried.append(name)
    raise UserError(
        f"the model detects nothing on the synthetic trace images ({', '.join(tried)}); tracing needs at least one "
        "detection: pass a validation image with --trace-image PATH"
    )


def _more_check_images(image: np.ndarray) -> list[np.ndarray]:
    """Check images besides the trace image: another size and aspect (and so, very likely, another number of
    detections), and a large portrait one (1900 x 1425: a strong downscale, where a resize computed in
    float32 would be a pixel off)."""
    from cellseg_deploy.data.synth import fluorescence_cell_image

    h, w = image.shape[:2]
    h2, w2 = max(h * 3 // 4 + 5, 8), max(w * 5 // 4 + 3, 8)
    return [
        fluorescence_cell_image(h2, w2, seed=7, n_cells=max(8, (h2 * w2) // 4000)),
        fluorescence_cell_image(1900, 1425, seed=8, n_cells=300),
    ]


# ----------------------------------------------------------------------------------------------------------
# Simplification
# ----------------------------------------------------------------------------------------------------------
def _require_onnxslim() -> None:
    from cellseg_deploy.errors import BackendUnavailable

    try:
        import onnxslim  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailable("--simplify needs onnxslim: pip install 'cellseg-deploy[simplify]'") from exc


def _simplify(
    proto: onnx.ModelProto, images: list[np.ndarray], plain_outputs: list[list[np.ndarray]]
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """``onnxslim`` the graph; keep it only when both graphs agree on every check image."""
    import onnxslim

    nodes_before = len(proto.graph.node)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            slim = onnxslim.slim(proto)
    except Exception as exc:
        log.warning("onnxslim failed (%s); writing the plain graph", type(exc).__name__)
        return proto, {"kept": False, "reason": f"onnxslim failed: {type(exc).__name__}: {str(exc)[:160]}"}
    if slim is None:
        return proto, {"kept": False, "reason": "onnxslim returned nothing"}
    _check_model(slim)
    for plain, slim_out in zip(plain_outputs, _ort_outputs(slim, images), strict=True):
        cmp = compare_raw_outputs(plain, slim_out)
        if not cmp["ok"] or cmp["torch_detections"] != cmp["ort_detections"]:
            reason = cmp["reason"] or "different number of detections"
            log.warning(
                "the simplified graph differs from the plain one (%s); writing the plain graph", reason
            )
            return proto, {
                "kept": False,
                "reason": f"simplified graph differs: {reason}",
                "nodes_before": nodes_before,
            }
    return slim, {"kept": True, "nodes_before": nodes_before, "nodes_after": len(slim.graph.node)}
