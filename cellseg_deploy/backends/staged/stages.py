"""Staged export: the Mask R-CNN's three heavy networks as separate ONNX graphs, in FP32 and FP16.

The whole torchvision graph does not build in TensorRT (the mask-paste ``Loop``, the ``If`` inside
``MultiScaleRoIAlign``, empty-tensor reshapes), and per-class NMS offsets boxes by about 1e5, past FP16's
range. So only the networks with weights become graphs, and everything between them stays in FP32 PyTorch,
computed by torchvision's own modules (:mod:`cellseg_deploy.backends.staged.runner`):

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cellseg_deploy.errors import ConfigError, ModelFileError
from cellseg_deploy.io_utils import sha256_file
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


def _round_to_fp16(value: Any) -> Any:
    """``value`` with every floating tensor in it rounded to the nearest FP16 number (past 65504: inf), kept
    float32; tuples, lists and dicts are walked."""
    if isinstance(value, torch.Tensor):
        return value.to(torch.float16).to(value.dtype) if value.is_floating_point() else value
    if isinstance(value, tuple | list):
        return type(value)(_round_to_fp16(v) for v in value)
    if isinstance(value, dict):
        return {k: _round_to_fp16(v) for k, v in value.items()}
    return value


def fp16_storage_stage_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The stage modules with FP16 storage and FP32 arithmetic: FP32 modules whose weights, and every tensor
    entering or leaving each submodule, are rounded to FP16 (an overflow past 65504 shows as inf).

    This is how an FP16 engine computes (FP16 tensors between layers, FP32 accumulation inside them), and it
    runs at FP32 speed: PyTorch's native FP16 convolutions are emulated, and many times slower, on CPUs
    without FP16 arithmetic. The export's finite check runs these on the CPU; values differ from the native
    FP16 modules only in the rounding inside a layer, not in whether an activation overflows.
    """
    modules = build_stage_modules(model, "fp32")
    for stage in modules.values():
        with torch.no_grad():
            for tensor in itertools.chain(stage.parameters(), stage.buffers()):
                if tensor.is_floating_point():
                    tensor.copy_(_round_to_fp16(tensor))
        for sub in stage.modules():
            sub.register_forward_pre_hook(lambda _m, args: _round_to_fp16(args))
            sub.register_forward_hook(lambda _m, _args, out: _round_to_fp16(out))
    return modules


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
    from cellseg_deploy.backends.metadata import read_manifest

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
