"""Staged export: the Mask R-CNN's three heavy networks as separate ONNX graphs, in FP32 and FP16.

The whole torchvision graph does not build in TensorRT (the mask-paste ``Loop``, the ``If`` inside
``MultiScaleRoIAlign``, empty-tensor reshapes), and per-class NMS offsets boxes by about 1e5, past FP16's
range. So only the networks with weights become graphs, and everything between them stays in FP32 PyTorch,
computed by torchvision's own modules (:mod:`cellseg_deploy.runners.staged_runner`):

==============  ===============================================  ==================================================
stage           input (float32 at the boundary)                  outputs (float32 at the boundary)
==============  ===============================================  ==================================================
backbone_rpn    ``images [B, 3, H, W]``: normalised, resized,    ``feat_<level> [B, C, H/s, W/s]`` (FPN maps, level
                padded (H, W multiples of 32, inside the         names as torchvision's, e.g. ``0 1 2 pool``),
                profile)                                         ``rpn_logits_<i> [B, A, H/s, W/s]``,
                                                                 ``rpn_deltas_<i> [B, 4A, H/s, W/s]``
box_head        ``box_features [R, C, 7, 7]`` (RoIAlign of the  ``class_logits [R, K]``, ``box_regression [R, 4K]``
                proposals, all images of the batch)
mask_head       ``mask_features [R, C, 14, 14]`` (RoIAlign of    ``mask_logits [R, K, 28, 28]`` (every class; the
                the detections)                                  host takes the sigmoid of the predicted class)
==============  ===============================================  ==================================================

``K`` counts the background class. Batch, height, width and the RoI count ``R`` are dynamic; the
:class:`StageProfile` gives the min/opt/max that TensorRT optimisation profiles are built for.

FP16 graphs (``*.fp16.onnx``): every stage is exported from the module cast with ``.half()`` and traced, so
the graph's weights and arithmetic are FP16, which is what TensorRT 11 needs (its networks are strongly typed:
the precision is the ONNX's). Inputs and outputs stay **float32 at the boundary**, with a ``Cast`` at the
entry and at each exit, so both precisions share one interface and the FP32 host steps (anchors, decoding,
NMS, RoIAlign) read FP32. Before the cast, BatchNorm layers are folded into the preceding convolutions in
FP32 (a running variance can be tiny or above 65504, FP16's maximum), and the export checks that no stage
output is inf or NaN on the largest image of the profile.

The folder also holds ``manifest.json``: stage files with SHA-256, precisions, profile, input/output specs,
the source checkpoint's path and SHA-256, the model config (from which the runner builds the weightless host
modules) and library versions.
"""

from __future__ import annotations

import copy
import itertools
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cellseg_deploy.errors import CheckFailed, ConfigError, ModelFileError
from cellseg_deploy.io_utils import atomic_path, atomic_write_json, sha256_file
from cellseg_deploy.modeling.config import ModelConfig

log = logging.getLogger(__name__)

STAGED_FORMAT = "cellseg-deploy/staged/1"
"""``format`` field of a stage folder's ``manifest.json``."""

MANIFEST_NAME = "manifest.json"
STAGES: tuple[str, ...] = ("backbone_rpn", "box_head", "mask_head")
"""The stage graphs, in execution order."""

STAGE_PRECISIONS: tuple[str, ...] = ("fp32", "fp16")
BOUNDARY_DTYPE = "float32"
"""Element type of every stage input and output, in both precisions."""

STAGE_INPUTS: dict[str, str] = {
    "backbone_rpn": "images",
    "box_head": "box_features",
    "mask_head": "mask_features",
}
"""The single input tensor of each stage."""


def stage_file(stage: str, precision: str) -> str:
    """File name of a stage graph: ``box_head.onnx`` (fp32) or ``box_head.fp16.onnx``."""
    return f"{stage}.onnx" if precision == "fp32" else f"{stage}.{precision}.onnx"


# ----------------------------------------------------------------------------------------------------------
# Profiles
# ----------------------------------------------------------------------------------------------------------
Range = tuple[int, int, int]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class StageProfile:
    """The shapes the stage graphs (and TensorRT engines) are built for: ``(min, opt, max)`` per dynamic axis.

    Attributes:
        batch: images per backbone call.
        height / width: padded network input size in pixels (after resizing), multiples of
            ``size_divisible``.
        box_rois: RoIs per box-head call (all images of a batch together; at most
            ``rpn_post_nms_top_n_test`` per image).
        mask_rois: RoIs per mask-head call (at most ``detections_per_img`` per image).
        size_divisible: the padding multiple of torchvision's transform (32).

    Runners split larger RoI sets into several calls, and image batches into several backbone calls, so
    the maxima bound memory, not what a runner can process. An image whose resized size lies outside
    ``height``/``width`` cannot run on a TensorRT engine (the runner says so).
    """

    batch: Range = (1, 1, 1)
    height: Range = (32, 512, 1024)
    width: Range = (32, 512, 1024)
    box_rois: Range = (1, 1000, 1000)
    mask_rois: Range = (1, 100, 100)
    size_divisible: int = 32

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def for_model(
        cls,
        config: ModelConfig,
        *,
        max_batch: int = 1,
        opt_size: tuple[int, int] | None = None,
        size_divisible: int = 32,
    ) -> StageProfile:
        """The profile that covers every image this model can be given, one to ``max_batch`` at a time.

        torchvision resizes an image so its short side is ``min_size`` unless its long side would exceed
        ``max_size``, then pads to a multiple of ``size_divisible``: so a padded side lies between
        ``size_divisible`` (very elongated images) and ``ceil(max_size / 32) * 32``. The optimum is a square
        ``min_size`` image (``opt_size`` overrides it); RoI maxima are the per-image caps times ``max_batch``.
        """
        if max_batch < 1:
            raise ConfigError(f"profile: max_batch must be at least 1, got {max_batch}")
        top = _round_up(config.max_size, size_divisible)
        opt_h, opt_w = opt_size or (config.min_size, config.min_size)
        opt_h = min(_round_up(opt_h, size_divisible), top)
        opt_w = min(_round_up(opt_w, size_divisible), top)
        box = config.rpn_post_nms_top_n_test
        mask = config.detections_per_img
        return cls(
            batch=(1, 1, max_batch),
            height=(size_divisible, opt_h, top),
            width=(size_divisible, opt_w, top),
            box_rois=(1, box, box * max_batch),
            mask_rois=(1, mask, mask * max_batch),
            size_divisible=size_divisible,
        )

    # -- checks ---------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`ConfigError` unless every range is ``1 <= min <= opt <= max`` and sizes are multiples
        of ``size_divisible``."""
        if self.size_divisible < 1:
            raise ConfigError(f"profile.size_divisible: must be positive, got {self.size_divisible}")
        for name in ("batch", "height", "width", "box_rois", "mask_rois"):
            rng = getattr(self, name)
            if len(rng) != 3 or not all(isinstance(v, int) for v in rng):
                raise ConfigError(f"profile.{name}: expected three integers (min, opt, max), got {rng!r}")
            lo, opt, hi = rng
            if not 1 <= lo <= opt <= hi:
                raise ConfigError(f"profile.{name}: expected 1 <= min <= opt <= max, got {list(rng)}")
        for name in ("height", "width"):
            bad = [v for v in getattr(self, name) if v % self.size_divisible]
            if bad:
                raise ConfigError(
                    f"profile.{name}: sizes must be multiples of {self.size_divisible} (the padded input), got {bad}"
                )

    def image_problem(self, batch: int, height: int, width: int) -> str | None:
        """``None`` when a padded batch ``[batch, 3, height, width]`` fits the profile, else why not (one line)."""
        problems = []
        for name, value in (("batch", batch), ("height", height), ("width", width)):
            lo, _, hi = getattr(self, name)
            if not lo <= value <= hi:
                problems.append(f"{name} {value} outside [{lo}, {hi}]")
        if problems:
            return (
                f"input [{batch}, 3, {height}, {width}] does not fit the engines' profile ({'; '.join(problems)}); "
                "rebuild the stages with a profile that covers it"
            )
        return None

    @property
    def image_min(self) -> tuple[int, int]:
        """Smallest padded ``(H, W)``."""
        return self.height[0], self.width[0]

    @property
    def image_opt(self) -> tuple[int, int]:
        """Optimum padded ``(H, W)``."""
        return self.height[1], self.width[1]

    @property
    def image_max(self) -> tuple[int, int]:
        """Largest padded ``(H, W)``."""
        return self.height[2], self.width[2]

    def max_rois(self, stage: str) -> int:
        """The most RoIs one call of ``box_head`` or ``mask_head`` takes."""
        return {"box_head": self.box_rois, "mask_head": self.mask_rois}[stage][2]

    def input_shapes(self, stage: str, channels: int, roi_size: int) -> tuple[tuple[int, ...], ...]:
        """``(min, opt, max)`` shapes of the stage's input tensor (:data:`STAGE_INPUTS`), for TensorRT profiles.

        ``channels``: FPN channels ``C``; ``roi_size``: the stage's RoIAlign output size (7 or 14; ignored for
        the backbone).
        """
        if stage == "backbone_rpn":
            return tuple((self.batch[i], 3, self.height[i], self.width[i]) for i in range(3))
        if stage in ("box_head", "mask_head"):
            rois = self.box_rois if stage == "box_head" else self.mask_rois
            return tuple((rois[i], channels, roi_size, roi_size) for i in range(3))
        raise ConfigError(f"unknown stage {stage!r}; expected one of {list(STAGES)}")

    # -- serialisation ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (ranges as lists)."""
        return {
            "batch": list(self.batch),
            "height": list(self.height),
            "width": list(self.width),
            "box_rois": list(self.box_rois),
            "mask_rois": list(self.mask_rois),
            "size_divisible": self.size_divisible,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageProfile:
        """Inverse of :meth:`to_dict`; unknown keys or malformed ranges raise :class:`ConfigError`."""
        allowed = {"batch", "height", "width", "box_rois", "mask_rois", "size_divisible"}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ConfigError(f"profile: unknown key(s) {unknown}; allowed keys are {sorted(allowed)}")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key == "size_divisible":
                kwargs[key] = int(value)
            else:
                if not isinstance(value, list | tuple) or len(value) != 3:
                    raise ConfigError(f"profile.{key}: expected [min, opt, max], got {value!r}")
                kwargs[key] = tuple(int(v) for v in value)
        return cls(**kwargs)


# ----------------------------------------------------------------------------------------------------------
# Stage modules
# ----------------------------------------------------------------------------------------------------------
class BackboneRPNStage(nn.Module):
    """``images [B, 3, H, W]`` -> FPN maps, RPN objectness logits and box deltas (see the module docstring)."""

    def __init__(self, backbone: nn.Module, rpn_head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.rpn_head = rpn_head

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        levels = list(self.backbone(images).values())
        logits, deltas = self.rpn_head(levels)
        return (*levels, *logits, *deltas)


class BoxHeadStage(nn.Module):
    """``box_features [R, C, 7, 7]`` -> ``class_logits [R, K]``, ``box_regression [R, 4K]``."""

    def __init__(self, box_head: nn.Module, box_predictor: nn.Module) -> None:
        super().__init__()
        self.box_head = box_head
        self.box_predictor = box_predictor

    def forward(self, box_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        class_logits, box_regression = self.box_predictor(self.box_head(box_features))
        return class_logits, box_regression


class MaskHeadStage(nn.Module):
    """``mask_features [R, C, 14, 14]`` -> ``mask_logits [R, K, 28, 28]``."""

    def __init__(self, mask_head: nn.Module, mask_predictor: nn.Module) -> None:
        super().__init__()
        self.mask_head = mask_head
        self.mask_predictor = mask_predictor

    def forward(self, mask_features: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.mask_predictor(self.mask_head(mask_features)),)


class Float32Boundary(nn.Module):
    """Run ``inner`` in ``dtype`` while taking and returning float32 (a ``Cast`` at each end of the graph)."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner = inner
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.dtype == torch.float32:
            return tuple(self.inner(x))
        return tuple(y.to(torch.float32) for y in self.inner(x.to(self.dtype)))


def _is_batchnorm(module: nn.Module) -> bool:
    from torchvision.ops.misc import FrozenBatchNorm2d

    return isinstance(module, nn.BatchNorm2d | FrozenBatchNorm2d)


def _fold_into_conv(conv: nn.Conv2d, bn: Any) -> None:
    """``bn(conv(x)) == conv'(x)``: scale the conv's output channels and shift its bias, in float64."""
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    new_bias = (bias - bn.running_mean.double()) * scale + bn.bias.double()
    weight = conv.weight.double() * scale.reshape(-1, *([1] * (conv.weight.dim() - 1)))
    conv.weight = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=False)
    conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype), requires_grad=False)


def fold_batchnorm(module: nn.Module) -> int:
    """Fold every BatchNorm that directly follows a ``Conv2d`` into it, in place; returns how many were folded.

    Pairs are recognised where the data flow is certain: adjacent children of a plain ``nn.Sequential``
    (torchvision's ``Conv2dNormActivation``, ``MaskRCNNHeads``, ``FastRCNNConvFCHead``, ResNet downsample
    branches) and ``convN``/``bnN`` children of any module (torchvision's ResNet stem and blocks). The folded
    BatchNorm becomes ``nn.Identity``. ``module`` must be in eval mode (running statistics are used).
    """
    folded = 0
    for parent in list(module.modules()):
        children = parent._modules
        names = list(children)
        sequential = isinstance(parent, nn.Sequential) and type(parent).forward is nn.Sequential.forward
        for first, second in itertools.pairwise(names):
            conv, bn = children[first], children[second]
            bn_any: Any = bn
            if not (isinstance(conv, nn.Conv2d) and bn is not None and _is_batchnorm(bn)):
                continue
            paired = first.startswith("conv") and second == "bn" + first[len("conv") :]
            if not (sequential or paired) or bn_any.num_features != conv.out_channels:
                continue
            _fold_into_conv(conv, bn)
            children[second] = nn.Identity()
            folded += 1
    return folded


def build_stage_modules(model: nn.Module, precision: str) -> dict[str, nn.Module]:
    """The three stage modules of a torchvision ``MaskRCNN`` (copied; ``model`` is left untouched), in eval
    mode, BatchNorm folded, cast to ``precision`` inside a float32 boundary."""
    if precision not in STAGE_PRECISIONS:
        raise ConfigError(f"stage precision {precision!r}; expected one of {list(STAGE_PRECISIONS)}")
    dtype = torch.float16 if precision == "fp16" else torch.float32
    m: Any = copy.deepcopy(model).eval().float()
    stages: dict[str, nn.Module] = {
        "backbone_rpn": BackboneRPNStage(m.backbone, m.rpn.head),
        "box_head": BoxHeadStage(m.roi_heads.box_head, m.roi_heads.box_predictor),
        "mask_head": MaskHeadStage(m.roi_heads.mask_head, m.roi_heads.mask_predictor),
    }
    out: dict[str, nn.Module] = {}
    for name, stage in stages.items():
        fold_batchnorm(stage)
        stage = stage.to(dtype)
        for p in stage.parameters():
            p.requires_grad_(False)
        out[name] = Float32Boundary(stage, dtype).eval()
    return out


# ----------------------------------------------------------------------------------------------------------
# Model geometry (what the manifest records about the stages' tensors)
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageGeometry:
    """Sizes of the stage tensors of one model.

    Attributes:
        levels: FPN level names in output order (``["0", "1", "2", "pool"]``).
        channels: FPN channels ``C``.
        anchors_per_location: ``A`` per level.
        num_classes: ``K`` including background.
        box_roi_size / mask_roi_size: RoIAlign output sizes (7, 14).
        mask_size: mask logits' size (28).
    """

    levels: tuple[str, ...]
    channels: int
    anchors_per_location: tuple[int, ...]
    num_classes: int
    box_roi_size: int
    mask_roi_size: int
    mask_size: int

    @classmethod
    def of(cls, model: nn.Module) -> StageGeometry:
        """Measure a torchvision ``MaskRCNN`` (one tiny forward of the backbone and the mask head)."""
        m: Any = model
        was_training = m.training
        m.eval()
        with torch.no_grad():
            feats = m.backbone(torch.zeros(1, 3, 64, 64))
            rs = m.roi_heads
            mask_roi = _pool_size(rs.mask_roi_pool.output_size)
            channels = int(m.backbone.out_channels)
            mask_logits = rs.mask_predictor(rs.mask_head(torch.zeros(1, channels, mask_roi, mask_roi)))
        m.train(was_training)
        return cls(
            levels=tuple(str(k) for k in feats),
            channels=channels,
            anchors_per_location=tuple(int(a) for a in m.rpn.anchor_generator.num_anchors_per_location()),
            num_classes=int(mask_logits.shape[1]),
            box_roi_size=_pool_size(rs.box_roi_pool.output_size),
            mask_roi_size=mask_roi,
            mask_size=int(mask_logits.shape[-1]),
        )

    def io(self, stage: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """``(inputs, outputs)`` of a stage: ``{"name", "shape"}`` with symbolic dims as strings."""
        c, k = self.channels, self.num_classes
        if stage == "backbone_rpn":
            inputs = [{"name": "images", "shape": ["batch", 3, "height", "width"]}]
            outs = [{"name": f"feat_{lv}", "shape": ["batch", c, f"h_{lv}", f"w_{lv}"]} for lv in self.levels]
            for i, (lv, a) in enumerate(zip(self.levels, self.anchors_per_location, strict=True)):
                outs.append({"name": f"rpn_logits_{i}", "shape": ["batch", a, f"h_{lv}", f"w_{lv}"]})
            for i, (lv, a) in enumerate(zip(self.levels, self.anchors_per_location, strict=True)):
                outs.append({"name": f"rpn_deltas_{i}", "shape": ["batch", 4 * a, f"h_{lv}", f"w_{lv}"]})
        elif stage == "box_head":
            inputs = [{"name": "box_features", "shape": ["rois", c, self.box_roi_size, self.box_roi_size]}]
            outs = [
                {"name": "class_logits", "shape": ["rois", k]},
                {"name": "box_regression", "shape": ["rois", 4 * k]},
            ]
        elif stage == "mask_head":
            inputs = [{"name": "mask_features", "shape": ["rois", c, self.mask_roi_size, self.mask_roi_size]}]
            outs = [{"name": "mask_logits", "shape": ["rois", k, self.mask_size, self.mask_size]}]
        else:
            raise ConfigError(f"unknown stage {stage!r}; expected one of {list(STAGES)}")
        for spec in (*inputs, *outs):
            spec["dtype"] = BOUNDARY_DTYPE
        return inputs, outs

    def roi_size(self, stage: str) -> int:
        """RoIAlign output size feeding ``stage`` (0 for the backbone)."""
        return {"backbone_rpn": 0, "box_head": self.box_roi_size, "mask_head": self.mask_roi_size}[stage]

    def to_dict(self) -> dict[str, Any]:
        return {
            "levels": list(self.levels),
            "channels": self.channels,
            "anchors_per_location": list(self.anchors_per_location),
            "num_classes": self.num_classes,
            "box_roi_size": self.box_roi_size,
            "mask_roi_size": self.mask_roi_size,
            "mask_size": self.mask_size,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageGeometry:
        return cls(
            levels=tuple(str(v) for v in data["levels"]),
            channels=int(data["channels"]),
            anchors_per_location=tuple(int(v) for v in data["anchors_per_location"]),
            num_classes=int(data["num_classes"]),
            box_roi_size=int(data["box_roi_size"]),
            mask_roi_size=int(data["mask_roi_size"]),
            mask_size=int(data["mask_size"]),
        )


def _pool_size(output_size: Any) -> int:
    size = output_size if isinstance(output_size, int) else output_size[0]
    return int(size)


# ----------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------
@dataclass
class StagedExportResult:
    """What :func:`export_staged` wrote.

    Attributes:
        out_dir: the stage folder.
        manifest: path of ``manifest.json``.
        graphs: ``{precision: {stage: path}}``.
        profile: the profile the graphs were declared for.
        finite_check: ``{precision: {"image": [H, W], "finite": bool, "max_abs": {stage: float}}}``.
        seconds: wall time of the whole export.
    """

    out_dir: Path
    manifest: Path
    graphs: dict[str, dict[str, Path]]
    profile: StageProfile
    finite_check: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (for ``--json``)."""
        return {
            "out_dir": str(self.out_dir),
            "manifest": str(self.manifest),
            "graphs": {p: {s: str(path) for s, path in g.items()} for p, g in self.graphs.items()},
            "profile": self.profile.to_dict(),
            "finite_check": self.finite_check,
            "seconds": round(self.seconds, 3),
        }


def _trace_inputs(stage: str, geometry: StageGeometry, profile: StageProfile) -> torch.Tensor:
    """A small example input (the graphs are dynamic; a small trace keeps FP16 tracing on the CPU fast)."""
    if stage == "backbone_rpn":
        h = min(max(128, profile.height[0]), profile.height[2])
        w = min(max(160, profile.width[0]), profile.width[2])
        return torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    size = geometry.roi_size(stage)
    return torch.randn(3, geometry.channels, size, size, generator=torch.Generator().manual_seed(0))


def _export_graph(
    module: nn.Module,
    example: torch.Tensor,
    dest: Path,
    stage: str,
    geometry: StageGeometry,
    opset: int,
    metadata: dict[str, Any],
) -> None:
    """Trace ``module`` to ``dest`` (atomically) with dynamic axes, provenance in ``metadata_props``, checked
    by ``onnx.checker``."""
    import onnx

    from cellseg_deploy.export.metadata import set_onnx_metadata

    inputs, outputs = geometry.io(stage)
    dynamic: dict[str, dict[int, str]] = {}
    for spec in (*inputs, *outputs):
        dynamic[spec["name"]] = {i: d for i, d in enumerate(spec["shape"]) if isinstance(d, str)}
    with atomic_path(dest) as tmp, warnings.catch_warnings(), torch.no_grad():
        # The TorchScript-based exporter is the one that handles these modules (facts.md); its deprecation
        # and tracer warnings are expected here and only here.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            module,
            (example,),
            str(tmp),
            dynamo=False,
            opset_version=opset,
            input_names=[s["name"] for s in inputs],
            output_names=[s["name"] for s in outputs],
            dynamic_axes=dynamic,
            do_constant_folding=True,
        )
        proto = onnx.load(str(tmp))
        set_onnx_metadata(proto, {**metadata, "inputs": inputs, "outputs": outputs})
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))


EXPORTER = "torch.onnx.export(dynamo=False), one graph per stage"


def export_staged(
    checkpoint: Path,
    out_dir: Path,
    *,
    fp16: bool = True,
    opset: int = 17,
    profile: StageProfile | None = None,
    check_finite: bool = True,
) -> StagedExportResult:
    """Export a checkpoint's backbone+RPN head, box head and mask head as ONNX graphs into ``out_dir``.

    Writes ``backbone_rpn.onnx``, ``box_head.onnx``, ``mask_head.onnx`` (FP32), with ``fp16`` also
    ``*.fp16.onnx`` (FP16 inside, float32 at the boundary), and ``manifest.json``; every file atomically.
    See the module docstring for the tensors.

    Args:
        checkpoint: a cellseg-deploy checkpoint (``.pt``).
        out_dir: the stage folder (created; existing stage files are replaced).
        fp16: also export the FP16 graphs.
        opset: ONNX opset.
        profile: the shape ranges to record for engines; default :meth:`StageProfile.for_model`.
        check_finite: run the FP16 stages (the traced PyTorch modules, FP16 activations) on a synthetic image
            of the profile's largest size and fail if any stage output is inf or NaN.

    Raises:
        CheckpointError: unreadable checkpoint.
        CheckFailed: a stage output was inf or NaN on the largest profile image.
    """
    from tqdm import tqdm

    from cellseg_deploy.export.metadata import provenance
    from cellseg_deploy.modeling.checkpoint import load_checkpoint

    start = time.perf_counter()
    checkpoint = Path(checkpoint)
    out_dir = Path(out_dir)
    ckpt = load_checkpoint(checkpoint)
    model = ckpt.build_model()
    profile = profile or StageProfile.for_model(ckpt.model_config)
    geometry = StageGeometry.of(model)
    precisions = ("fp32", "fp16") if fp16 else ("fp32",)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = provenance(
        ckpt, sha256_file(checkpoint), exporter=EXPORTER, opset=opset, mask_size=geometry.mask_size
    )

    graphs: dict[str, dict[str, Path]] = {p: {} for p in precisions}
    jobs = [(p, s) for p in precisions for s in STAGES]
    modules = {p: build_stage_modules(model, p) for p in precisions}
    for precision, stage in tqdm(jobs, desc="export stages", unit="graph", disable=None):
        dest = out_dir / stage_file(stage, precision)
        meta = {**source, "stage": stage, "precision": precision, "boundary_dtype": BOUNDARY_DTYPE}
        _export_graph(
            modules[precision][stage],
            _trace_inputs(stage, geometry, profile),
            dest,
            stage,
            geometry,
            opset,
            meta,
        )
        graphs[precision][stage] = dest
        log.info("wrote %s", dest)

    manifest = stage_manifest(
        graphs=graphs,
        out_dir=out_dir,
        checkpoint=checkpoint,
        geometry=geometry,
        profile=profile,
        provenance=source,
    )
    manifest_path = atomic_write_json(out_dir / MANIFEST_NAME, manifest)

    finite: dict[str, Any] = {}
    if check_finite:
        from cellseg_deploy.runners.stage_executors import TorchExecutor
        from cellseg_deploy.runners.staged_runner import check_stages_finite

        names = {s: [o["name"] for o in geometry.io(s)[1]] for s in STAGES}
        for precision in [p for p in precisions if p != "fp32"]:  # FP32 has 1e34 times FP16's range
            # The traced modules themselves, in PyTorch: activations stay FP16 (ONNX Runtime's CPU provider
            # would compute the FP16 graph's convolutions in FP32 and hide an overflow).
            executor = TorchExecutor(modules[precision], names)
            report = check_stages_finite(out_dir, precision, executor=executor)
            finite[precision] = report
            if not report["finite"]:
                bad = [s for s, ok in report["stage_finite"].items() if not ok]
                raise CheckFailed(
                    f"{precision} stage graph(s) {bad} produced inf/NaN on a {report['image']} image "
                    f"(the profile's largest); use the fp32 graphs or retrain with smaller activations"
                )
        manifest["finite_check"] = finite
        atomic_write_json(manifest_path, manifest)
    return StagedExportResult(
        out_dir=out_dir,
        manifest=manifest_path,
        graphs=graphs,
        profile=profile,
        finite_check=finite,
        seconds=time.perf_counter() - start,
    )


def stage_manifest(
    *,
    graphs: dict[str, dict[str, Path]],
    out_dir: Path,
    checkpoint: Path,
    geometry: StageGeometry,
    profile: StageProfile,
    provenance: dict[str, Any],
) -> dict[str, Any]:
    """The ``manifest.json`` dict of a stage folder (pure apart from hashing the files it names).

    ``provenance``: :func:`cellseg_deploy.export.metadata.provenance` of the source checkpoint (also stored in
    every graph's ``metadata_props``); its model config, versions and opset are copied to the top level.
    """
    stages: dict[str, Any] = {}
    for stage in STAGES:
        inputs, outputs = geometry.io(stage)
        files = {}
        for precision, by_stage in graphs.items():
            path = by_stage[stage]
            files[precision] = {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size}
        stages[stage] = {"graphs": files, "inputs": inputs, "outputs": outputs}
    return {
        "format": STAGED_FORMAT,
        "created": provenance["exported_at"],
        "precisions": sorted(graphs, key=STAGE_PRECISIONS.index),
        "boundary_dtype": BOUNDARY_DTYPE,
        "fp16_conversion": (
            "module.half() traced with float32 Casts at the boundary; BatchNorm folded into convolutions in "
            "float64 before the cast"
        ),
        "host_fp32": "preprocess, anchors, box decoding, proposal and per-class NMS, RoIAlign, mask sigmoid",
        "opset": provenance.get("opset"),
        "stages": stages,
        "geometry": geometry.to_dict(),
        "profile": profile.to_dict(),
        "checkpoint": {"path": str(checkpoint.resolve()), "sha256": provenance["source_sha256"]},
        "model_config": provenance["model_config"],
        "versions": provenance["versions"],
        "provenance": provenance,
    }


# ----------------------------------------------------------------------------------------------------------
# Reading a stage folder
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageFolder:
    """A loaded stage folder: its manifest and where its files are."""

    root: Path
    manifest: dict[str, Any]

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.manifest["model_config"])

    @property
    def geometry(self) -> StageGeometry:
        return StageGeometry.from_dict(self.manifest["geometry"])

    @property
    def profile(self) -> StageProfile:
        return StageProfile.from_dict(self.manifest["profile"])

    @property
    def precisions(self) -> list[str]:
        return list(self.manifest["precisions"])

    def graph(self, stage: str, precision: str) -> Path:
        """Path of a stage graph; a precision the folder lacks raises :class:`ModelFileError`."""
        entry = self.manifest["stages"][stage]["graphs"].get(precision)
        if entry is None:
            raise ModelFileError(
                f"stage folder {self.root} has no {precision} graphs (it has {self.precisions}); "
                "re-export with 'cellseg-deploy export --format staged' (fp16 is on by default)"
            )
        return self.root / entry["file"]

    def graph_sha256(self, stage: str, precision: str) -> str:
        return str(self.manifest["stages"][stage]["graphs"][precision]["sha256"])

    def graphs(self, precision: str, *, verify: bool = True) -> dict[str, Path]:
        """``{stage: path}`` for one precision; with ``verify`` each file's SHA-256 is checked against the
        manifest (a changed or truncated graph raises :class:`ModelFileError`)."""
        out = {}
        for stage in STAGES:
            path = self.graph(stage, precision)
            if not path.is_file():
                raise ModelFileError(f"stage graph {path} is missing; re-export the stage folder {self.root}")
            if verify and sha256_file(path) != self.graph_sha256(stage, precision):
                raise ModelFileError(
                    f"stage graph {path} does not match the SHA-256 in {self.root / MANIFEST_NAME}; "
                    "it changed after export: re-export the stage folder"
                )
            out[stage] = path
        return out

    def output_names(self, stage: str) -> list[str]:
        return [o["name"] for o in self.manifest["stages"][stage]["outputs"]]


def load_stage_folder(path: Path) -> StageFolder:
    """Read a stage folder (or its ``manifest.json``).

    Raises:
        ModelFileError: no manifest, unreadable JSON, or not a cellseg-deploy stage folder.
    """
    from cellseg_deploy.export.metadata import read_manifest

    missing = f"{path} is not a stage folder (no {MANIFEST_NAME}); make one with 'cellseg-deploy export --format staged'"
    manifest_path, manifest = read_manifest(path, MANIFEST_NAME, STAGED_FORMAT, missing, "a stage manifest")
    return StageFolder(root=manifest_path.parent, manifest=manifest)


def synthetic_input(height: int, width: int, *, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A uint8-range RGB test pattern as float32 ``[batch, 3, height, width]`` in [0, 1]: uniform noise with
    saturated (0 and 1) blocks and a bright disc per 64 px cell — busy, high-contrast content that drives
    activations up (used to check FP16 graphs for overflow)."""
    gen = torch.Generator().manual_seed(seed)
    img = torch.randint(0, 256, (batch, 3, height, width), generator=gen).float() / 255.0
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    blocks = ((yy // 16 + xx // 16) % 5 == 0).float()
    img = torch.where(blocks.bool(), (yy // 16 % 2).float().expand_as(img), img)
    disc = ((yy % 64 - 32) ** 2 + (xx % 64 - 32) ** 2) < 14**2
    return torch.where(disc, torch.ones_like(img), img)
