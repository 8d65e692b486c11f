"""Model settings: one frozen dataclass that travels inside every checkpoint and exported model.

Every field is a plain Python value (ints, floats, strings, tuples), so the config round-trips through
JSON, YAML recipes and ``torch.load(weights_only=True)`` checkpoints.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from cellseg_deploy import CLASS_NAMES
from cellseg_deploy.errors import ConfigError
from cellseg_deploy.modeling.coerce import coerce
from cellseg_deploy.modeling.registry import list_architectures

ANCHOR_PRESETS: dict[str, tuple[tuple[int, ...], ...]] = {
    # torchvision's default for ResNet50-FPN: one size per pyramid level (strides 4, 8, 16, 32, 64).
    "default": ((32,), (64,), (128,), (256,), (512,)),
    # The small-anchor preset of the published SE-ResNeXt101 recipe on this data (facts.md).
    "small": ((4, 8), (16, 32), (32, 64), (64, 128), (128, 256)),
    # Four levels (strides 4, 8, 16, 32) sized for cells of 8-60 px; the tiny architecture's default.
    "cells4": ((8,), (16,), (32,), (64,)),
}

BACKBONE_NORMS: tuple[str, ...] = ("auto", "batch", "frozen")
"""Values of ``ModelConfig.backbone_norm``."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and inference settings of a cell Mask R-CNN.

    Sizes are in pixels of the network input (after resizing); thresholds are probabilities in [0, 1].

    Attributes:
        arch: a name from :func:`cellseg_deploy.modeling.list_architectures`.
        class_names: foreground class names; ``num_classes`` is ``len(class_names) + 1`` (background).
        anchor_sizes: a preset name from :data:`ANCHOR_PRESETS`, or explicit sizes, one tuple per level.
            ``None`` takes the architecture's default.
        aspect_ratios: anchor aspect ratios (height / width), the same on every level.
        min_size / max_size: the image is resized so its short side is ``min_size`` unless the long side
            would exceed ``max_size`` (torchvision's ``GeneralizedRCNNTransform``).
        image_mean / image_std: per-channel RGB normalisation of images scaled to [0, 1].
        detections_per_img: the cap on detections per image after NMS (300-1000 is usual on this data).
        score_thresh: box score threshold applied inside the detector.
        nms_thresh: per-class box NMS IoU threshold.
        rpn_*: region proposal settings (pre/post NMS top-N at train and test, NMS IoU, sampling size).
        box_batch_size_per_image: RoIs sampled per image to train the box head.
        backbone_norm: the normalisation of the backbone trunk (ResNet): ``batch`` (``BatchNorm2d``, trains
            its statistics), ``frozen`` (torchvision's ``FrozenBatchNorm2d``: the statistics and affine
            parameters of the initial weights, fixed) or ``auto``: ``frozen`` where the model starts from
            trained weights (COCO, ImageNet or a local file) and the architecture's torchvision builder
            freezes them, else ``batch``, as torchvision decides (``is_trained`` in its ``mask_rcnn.py``).
            Checkpoints record the resolved value, so a model is rebuilt as it was trained.
        trainable_backbone_layers: trunk stages whose parameters train, counted from the last (0..5: ``layer4``,
            ``layer3``, ``layer2``, ``layer1``, ``conv1``; 5 = all). ``None``: torchvision's default, 3 when
            starting from trained weights and 5 otherwise (randomly initialised stages always train).
        frozen_bn_eps: epsilon of ``FrozenBatchNorm2d``. ``None``: 0.0 for torchvision's COCO_V1 weights of
            ``r50-fpn`` (they were trained so, and torchvision sets it), else 1e-5. A local copy of those
            weights given as ``weights.init`` wants ``0.0`` too.
    """

    arch: str = "r50-fpn"
    class_names: tuple[str, ...] = CLASS_NAMES
    anchor_sizes: str | tuple[tuple[int, ...], ...] | None = None
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    min_size: int = 512
    max_size: int = 1024
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    detections_per_img: int = 100
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    rpn_nms_thresh: float = 0.7
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 512
    backbone_norm: str = "auto"
    trainable_backbone_layers: int | None = None
    frozen_bn_eps: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """Number of classes including background (label 0)."""
        return len(self.class_names) + 1

    def resolved_anchor_sizes(
        self, default: str | tuple[tuple[int, ...], ...]
    ) -> tuple[tuple[int, ...], ...]:
        """Anchor sizes per level, resolving a preset name (``default`` when ``anchor_sizes`` is None)."""
        sizes = self.anchor_sizes if self.anchor_sizes is not None else default
        if isinstance(sizes, str):
            if sizes not in ANCHOR_PRESETS:
                raise ConfigError(
                    f"model.anchor_sizes: unknown preset {sizes!r}; expected one of {sorted(ANCHOR_PRESETS)} "
                    "or a list of size lists, one per pyramid level"
                )
            return ANCHOR_PRESETS[sizes]
        return tuple(tuple(int(s) for s in level) for level in sizes)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated)."""
        return ModelConfig.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""

        def plain(v: Any) -> Any:
            if isinstance(v, tuple | list):
                return [plain(x) for x in v]
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            return v

        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build and validate from a dict; unknown keys or wrong types raise :class:`ConfigError`."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(f"model: unknown key(s) {unknown}; allowed keys are {sorted(fields)}")
        hints = typing.get_type_hints(cls)
        kwargs = {name: _coerce(name, value, hints[name]) for name, value in data.items()}
        config = cls(**kwargs)
        config.validate()
        return config

    def validate(self) -> None:
        """Check value ranges; raises :class:`ConfigError` naming the field."""
        if self.arch not in list_architectures():
            raise ConfigError(
                f"model.arch: unknown architecture {self.arch!r}; expected one of {list_architectures()}"
            )
        if not self.class_names:
            raise ConfigError("model.class_names: needs at least one class name")
        for name in (
            "min_size",
            "max_size",
            "detections_per_img",
            "rpn_pre_nms_top_n_train",
            "rpn_post_nms_top_n_train",
            "rpn_pre_nms_top_n_test",
            "rpn_post_nms_top_n_test",
            "rpn_batch_size_per_image",
            "box_batch_size_per_image",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name}: must be a positive integer, got {getattr(self, name)}")
        if self.max_size < self.min_size:
            raise ConfigError(f"model.max_size ({self.max_size}) must be >= model.min_size ({self.min_size})")
        for name in ("score_thresh", "nms_thresh", "rpn_nms_thresh"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"model.{name}: must lie in [0, 1], got {v}")
        if any(r <= 0 for r in self.aspect_ratios):
            raise ConfigError(f"model.aspect_ratios: must be positive, got {list(self.aspect_ratios)}")
        if isinstance(self.anchor_sizes, str):
            self.resolved_anchor_sizes(self.anchor_sizes)
        if self.backbone_norm not in BACKBONE_NORMS:
            raise ConfigError(
                f"model.backbone_norm: unknown value {self.backbone_norm!r}; expected one of {list(BACKBONE_NORMS)}"
            )
        layers = self.trainable_backbone_layers
        if layers is not None and not 0 <= layers <= 5:
            raise ConfigError(
                f"model.trainable_backbone_layers: must lie in 0..5 (5: the whole trunk) or be null, got {layers}"
            )
        if self.frozen_bn_eps is not None and self.frozen_bn_eps < 0:
            raise ConfigError(f"model.frozen_bn_eps: must be >= 0 or null, got {self.frozen_bn_eps}")


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Convert a YAML/JSON value (lists) to the field's type; reject wrong types with the key's name."""
    if name == "anchor_sizes":  # a preset name or sizes: its own message names the presets
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list | tuple) and all(isinstance(level, list | tuple) for level in value):
            return tuple(tuple(int(s) for s in level) for level in value)
        raise ConfigError(
            f"model.anchor_sizes: expected a preset name {sorted(ANCHOR_PRESETS)} or a list of lists of ints, got {value!r}"
        )
    return coerce(f"model.{name}", value, tp)
