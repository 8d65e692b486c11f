"""The architecture registry: name -> how to build the torchvision Mask R-CNN.

Each entry builds a ``torchvision.models.detection.MaskRCNN`` with 4 cell classes plus background from a
:class:`~cellseg_deploy.modeling.config.ModelConfig`. Weights are random here; the builder
(:mod:`cellseg_deploy.modeling.builder`) resolves the structure for trained weights (frozen BatchNorm,
trainable stages) and loads pretrained or local weights afterwards. Here ``backbone_norm: auto`` and
``trainable_backbone_layers: null`` mean what torchvision does without trained weights (``BatchNorm2d``,
every stage trains), which is how a checkpoint written before those fields existed was trained.

Boxes stay fp32 under autocast: torchvision makes anchors in the feature maps' dtype and decodes box deltas
in theirs (``BoxCoder.decode_single``: ``boxes.to(rel_codes.dtype)``), so under fp16/bf16 autocast the
proposals and the final boxes are half-precision numbers: at 256-1024 px, steps of 0.25-0.5 px in fp16 and
2-4 px in bf16 (8 significant bits). Every architecture here therefore uses :class:`Fp32AnchorGenerator`
and :class:`Fp32BoxCoder`, in inference and in training (RPN proposals, RoI targets); without autocast
they compute exactly what torchvision's do.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torchvision.models import resnet18, resnet50
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

if TYPE_CHECKING:  # the builders only read a config's fields; the config module imports this one
    from cellseg_deploy.modeling.config import ModelConfig


@dataclass(frozen=True)
class ArchSpec:
    """How to build one architecture.

    Attributes:
        build: ``build(config, rpn_head_kwargs) -> MaskRCNN`` with random weights.
        default_anchors: preset name or sizes used when the config leaves ``anchor_sizes`` unset.
        coco_weights: name of torchvision's COCO weights enum for the whole detector, or None.
        backbone_weights: name of torchvision's ImageNet weights enum for the backbone, or None.
        description: one line for ``--help`` and ``list_architectures(verbose=True)``.
        trained_norm: the trunk's normalisation when starting from trained weights (``backbone_norm:
            auto``): ``frozen`` as torchvision's ``maskrcnn_resnet50_fpn``, ``batch`` as its ``_v2``.
        coco_frozen_bn_eps: the ``FrozenBatchNorm2d`` epsilon torchvision sets for its COCO weights
            (``overwrite_eps(model, 0.0)`` for ``COCO_V1``), or None to keep 1e-5.
    """

    build: Callable[[ModelConfig], MaskRCNN]
    default_anchors: str
    coco_weights: str | None
    backbone_weights: str | None
    description: str
    trained_norm: str = "frozen"
    coco_frozen_bn_eps: float | None = None


class Fp32AnchorGenerator(AnchorGenerator):
    """torchvision's ``AnchorGenerator`` whose anchors are float32 whatever the feature maps' dtype.

    torchvision converts its cell anchors, in place, to the dtype of the first feature map: under autocast
    that is fp16/bf16, and the rounding then sticks for later fp32 calls too. Integer pixel coordinates
    beyond 256 are not representable in bf16, nor beyond 2048 in fp16.
    """

    def set_cell_anchors(self, dtype: torch.dtype, device: torch.device) -> None:
        if dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32
        super().set_cell_anchors(dtype, device)


class Fp32BoxCoder(BoxCoder):
    """torchvision's ``BoxCoder`` that decodes in float32 when the deltas come in fp16/bf16.

    The deltas themselves (a head's output) keep the precision they were computed in; the reference boxes
    and the arithmetic that turns them into pixel coordinates do not lose more. Float32 deltas take
    torchvision's own path unchanged (nothing is added to an fp32 or exported graph).
    """

    def decode_single(self, rel_codes: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        if rel_codes.dtype in (torch.float16, torch.bfloat16):
            rel_codes = rel_codes.float()
        if boxes.dtype in (torch.float16, torch.bfloat16):
            boxes = boxes.float()
        return super().decode_single(rel_codes, boxes)


def fp32_boxes(model: MaskRCNN) -> MaskRCNN:
    """Give ``model`` :class:`Fp32BoxCoder` s (RPN and RoI heads) with torchvision's weights and clip."""
    for owner in (model.rpn, model.roi_heads):
        old = owner.box_coder
        owner.box_coder = Fp32BoxCoder(old.weights, old.bbox_xform_clip)
    return model


def trunk_structure(config: ModelConfig) -> tuple[str, int, float]:
    """``(norm, trainable stages, frozen BatchNorm epsilon)`` of the trunk; ``auto``/``None`` as untrained."""
    norm = "batch" if config.backbone_norm == "auto" else config.backbone_norm
    layers = 5 if config.trainable_backbone_layers is None else config.trainable_backbone_layers
    eps = 1e-5 if config.frozen_bn_eps is None else config.frozen_bn_eps
    return norm, layers, eps


def trunk_norm_layer(config: ModelConfig) -> Callable[..., nn.Module]:
    """The trunk's normalisation layer class (``FrozenBatchNorm2d`` with its epsilon, or ``BatchNorm2d``)."""
    norm, _, eps = trunk_structure(config)
    if norm == "frozen":
        return functools.partial(FrozenBatchNorm2d, eps=eps)
    return nn.BatchNorm2d


def freeze_trunk_stages(trunk: nn.Module, trainable_layers: int) -> None:
    """torchvision's freezing (``_resnet_fpn_extractor``): only the last ``trainable_layers`` stages train."""
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable layers must lie in [0, 5], got {trainable_layers}")
    layers_to_train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        layers_to_train.append("bn1")
    for name, parameter in trunk.named_parameters():
        if not any(name.startswith(layer) for layer in layers_to_train):
            parameter.requires_grad_(False)


def common_kwargs(config: ModelConfig, default_anchors: str, fpn_channels: int) -> dict[str, Any]:
    """MaskRCNN keyword arguments shared by every architecture (anchors, sizes, thresholds, sampling)."""
    sizes = config.resolved_anchor_sizes(default_anchors)
    ratios = (tuple(config.aspect_ratios),) * len(sizes)
    anchor_generator = Fp32AnchorGenerator(sizes=sizes, aspect_ratios=ratios)
    return {
        "num_classes": config.num_classes,
        "min_size": config.min_size,
        "max_size": config.max_size,
        "image_mean": list(config.image_mean),
        "image_std": list(config.image_std),
        "rpn_anchor_generator": anchor_generator,
        "rpn_head": RPNHead(fpn_channels, anchor_generator.num_anchors_per_location()[0]),
        "rpn_pre_nms_top_n_train": config.rpn_pre_nms_top_n_train,
        "rpn_post_nms_top_n_train": config.rpn_post_nms_top_n_train,
        "rpn_pre_nms_top_n_test": config.rpn_pre_nms_top_n_test,
        "rpn_post_nms_top_n_test": config.rpn_post_nms_top_n_test,
        "rpn_nms_thresh": config.rpn_nms_thresh,
        "rpn_batch_size_per_image": config.rpn_batch_size_per_image,
        "box_score_thresh": config.score_thresh,
        "box_nms_thresh": config.nms_thresh,
        "box_detections_per_img": config.detections_per_img,
        "box_batch_size_per_image": config.box_batch_size_per_image,
    }


def _build_r50_fpn(config: ModelConfig) -> MaskRCNN:
    """torchvision's ``maskrcnn_resnet50_fpn``, with the trunk's norm and trainable stages from ``config``."""
    kwargs = common_kwargs(config, "default", 256)
    if len(kwargs["rpn_anchor_generator"].sizes) != 5:
        raise_levels(config, 5)
    _, layers, _ = trunk_structure(config)
    trunk = resnet50(weights=None, norm_layer=trunk_norm_layer(config))
    backbone = _resnet_fpn_extractor(trunk, layers)
    return fp32_boxes(MaskRCNN(backbone, **kwargs))


def _build_r50_fpn_v2(config: ModelConfig) -> MaskRCNN:
    """torchvision's v2 design (BatchNorm in FPN and heads, two-conv RPN head, 4-conv box head)."""
    kwargs = common_kwargs(config, "default", 256)
    if len(kwargs["rpn_anchor_generator"].sizes) != 5:
        raise_levels(config, 5)
    kwargs["rpn_head"] = RPNHead(
        256, kwargs["rpn_anchor_generator"].num_anchors_per_location()[0], conv_depth=2
    )
    _, layers, _ = trunk_structure(config)
    trunk = resnet50(weights=None, norm_layer=trunk_norm_layer(config))
    backbone = _resnet_fpn_extractor(trunk, trainable_layers=layers, norm_layer=nn.BatchNorm2d)
    box_head = FastRCNNConvFCHead((256, 7, 7), [256, 256, 256, 256], [1024], norm_layer=nn.BatchNorm2d)
    mask_head = MaskRCNNHeads(256, [256, 256, 256, 256], 1, norm_layer=nn.BatchNorm2d)
    return fp32_boxes(MaskRCNN(backbone, box_head=box_head, mask_head=mask_head, **kwargs))


TINY_FPN_CHANNELS = 64
TINY_BOX_REPRESENTATION = 256
TINY_MASK_CHANNELS = 64


def _build_tiny(config: ModelConfig) -> MaskRCNN:
    """ResNet18 trunk (trainable BatchNorm from random weights, frozen from ImageNet's, as R50-FPN) with a
    64-channel FPN on strides 4/8/16 (+ max-pool level 32), a 256-wide two-layer box head and a two-conv
    64-channel mask head: a real Mask R-CNN, ~14x fewer FLOPs than R50-FPN at the same input size."""
    kwargs = common_kwargs(config, "cells4", TINY_FPN_CHANNELS)
    if len(kwargs["rpn_anchor_generator"].sizes) != 4:
        raise_levels(config, 4)
    trunk = resnet18(weights=None, norm_layer=trunk_norm_layer(config))
    freeze_trunk_stages(trunk, trunk_structure(config)[1])
    backbone = BackboneWithFPN(
        trunk,
        return_layers={"layer1": "0", "layer2": "1", "layer3": "2"},
        in_channels_list=[64, 128, 256],
        out_channels=TINY_FPN_CHANNELS,
        extra_blocks=LastLevelMaxPool(),
    )
    c = TINY_FPN_CHANNELS
    kwargs["num_classes"] = None  # the predictors below carry the class count
    model = MaskRCNN(
        backbone,
        box_roi_pool=MultiScaleRoIAlign(featmap_names=["0", "1", "2"], output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(c * 7 * 7, TINY_BOX_REPRESENTATION),
        box_predictor=FastRCNNPredictor(TINY_BOX_REPRESENTATION, config.num_classes),
        mask_roi_pool=MultiScaleRoIAlign(featmap_names=["0", "1", "2"], output_size=14, sampling_ratio=2),
        mask_head=MaskRCNNHeads(c, [TINY_MASK_CHANNELS, TINY_MASK_CHANNELS], 1),
        mask_predictor=MaskRCNNPredictor(TINY_MASK_CHANNELS, TINY_MASK_CHANNELS, config.num_classes),
        **kwargs,
    )
    return fp32_boxes(model)


def raise_levels(config: ModelConfig, levels: int) -> None:
    """Reject anchor sizes whose number of levels does not match the architecture's pyramid."""
    from cellseg_deploy.errors import ConfigError

    got = len(config.resolved_anchor_sizes(get_arch(config.arch).default_anchors))
    raise ConfigError(
        f"model.anchor_sizes: architecture {config.arch!r} has {levels} pyramid levels, so it needs "
        f"{levels} anchor size lists; got {got}"
    )


ARCHITECTURES: dict[str, ArchSpec] = {
    "r50-fpn": ArchSpec(
        build=_build_r50_fpn,
        default_anchors="default",
        coco_weights="MaskRCNN_ResNet50_FPN_Weights",
        backbone_weights="ResNet50_Weights",
        description="torchvision ResNet50-FPN Mask R-CNN (the published recipes' architecture)",
        coco_frozen_bn_eps=0.0,
    ),
    "r50-fpn-v2": ArchSpec(
        build=_build_r50_fpn_v2,
        default_anchors="default",
        coco_weights="MaskRCNN_ResNet50_FPN_V2_Weights",
        backbone_weights="ResNet50_Weights",
        description="torchvision ResNet50-FPN v2 (BatchNorm heads, improved training recipe)",
        trained_norm="batch",
    ),
    "tiny": ArchSpec(
        build=_build_tiny,
        default_anchors="cells4",
        coco_weights=None,
        backbone_weights="ResNet18_Weights",
        description="ResNet18 + 64-channel FPN, slim heads: fast on CPUs, for demos and CI",
    ),
}


def list_architectures() -> list[str]:
    """Registered architecture names, sorted."""
    return sorted(ARCHITECTURES)


def get_arch(name: str) -> ArchSpec:
    """The spec of a registered architecture; unknown names raise ``ConfigError`` listing the choices."""
    from cellseg_deploy.errors import ConfigError

    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ConfigError(f"unknown architecture {name!r}; expected one of {list_architectures()}") from None
