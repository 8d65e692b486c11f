"""The architecture registry: name -> how to build the torchvision Mask R-CNN.

Each entry builds a ``torchvision.models.detection.MaskRCNN`` with 4 cell classes plus background from a
:class:`~cellseg_deploy.modeling.config.ModelConfig`. Weights are random here; the builder
(:mod:`cellseg_deploy.modeling.builder`) loads pretrained or local weights afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn
from torchvision.models import resnet18, resnet50
from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

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
    """

    build: Callable[[ModelConfig], MaskRCNN]
    default_anchors: str
    coco_weights: str | None
    backbone_weights: str | None
    description: str


def common_kwargs(config: ModelConfig, default_anchors: str, fpn_channels: int) -> dict[str, Any]:
    """MaskRCNN keyword arguments shared by every architecture (anchors, sizes, thresholds, sampling)."""
    sizes = config.resolved_anchor_sizes(default_anchors)
    ratios = (tuple(config.aspect_ratios),) * len(sizes)
    anchor_generator = AnchorGenerator(sizes=sizes, aspect_ratios=ratios)
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
    kwargs = common_kwargs(config, "default", 256)
    if len(kwargs["rpn_anchor_generator"].sizes) != 5:
        raise_levels(config, 5)
    return maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, **kwargs)


def _build_r50_fpn_v2(config: ModelConfig) -> MaskRCNN:
    """torchvision's v2 design (BatchNorm in FPN and heads, two-conv RPN head, 4-conv box head)."""
    kwargs = common_kwargs(config, "default", 256)
    if len(kwargs["rpn_anchor_generator"].sizes) != 5:
        raise_levels(config, 5)
    kwargs["rpn_head"] = RPNHead(
        256, kwargs["rpn_anchor_generator"].num_anchors_per_location()[0], conv_depth=2
    )
    trunk = resnet50(weights=None, norm_layer=nn.BatchNorm2d)
    backbone = _resnet_fpn_extractor(trunk, trainable_layers=5, norm_layer=nn.BatchNorm2d)
    box_head = FastRCNNConvFCHead((256, 7, 7), [256, 256, 256, 256], [1024], norm_layer=nn.BatchNorm2d)
    mask_head = MaskRCNNHeads(256, [256, 256, 256, 256], 1, norm_layer=nn.BatchNorm2d)
    return MaskRCNN(backbone, box_head=box_head, mask_head=mask_head, **kwargs)


TINY_FPN_CHANNELS = 64
TINY_BOX_REPRESENTATION = 256
TINY_MASK_CHANNELS = 64


def _build_tiny(config: ModelConfig) -> MaskRCNN:
    """ResNet18 trunk (trainable BatchNorm) with a 64-channel FPN on strides 4/8/16 (+ max-pool level 32),
    a 256-wide two-layer box head and a two-conv 64-channel mask head: a real Mask R-CNN, ~14x fewer
    FLOPs than R50-FPN at the same input size."""
    kwargs = common_kwargs(config, "cells4", TINY_FPN_CHANNELS)
    if len(kwargs["rpn_anchor_generator"].sizes) != 4:
        raise_levels(config, 4)
    trunk = resnet18(weights=None, norm_layer=nn.BatchNorm2d)
    backbone = BackboneWithFPN(
        trunk,
        return_layers={"layer1": "0", "layer2": "1", "layer3": "2"},
        in_channels_list=[64, 128, 256],
        out_channels=TINY_FPN_CHANNELS,
        extra_blocks=LastLevelMaxPool(),
    )
    c = TINY_FPN_CHANNELS
    kwargs["num_classes"] = None  # the predictors below carry the class count
    return MaskRCNN(
        backbone,
        box_roi_pool=MultiScaleRoIAlign(featmap_names=["0", "1", "2"], output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(c * 7 * 7, TINY_BOX_REPRESENTATION),
        box_predictor=FastRCNNPredictor(TINY_BOX_REPRESENTATION, config.num_classes),
        mask_roi_pool=MultiScaleRoIAlign(featmap_names=["0", "1", "2"], output_size=14, sampling_ratio=2),
        mask_head=MaskRCNNHeads(c, [TINY_MASK_CHANNELS, TINY_MASK_CHANNELS], 1),
        mask_predictor=MaskRCNNPredictor(TINY_MASK_CHANNELS, TINY_MASK_CHANNELS, config.num_classes),
        **kwargs,
    )


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
    ),
    "r50-fpn-v2": ArchSpec(
        build=_build_r50_fpn_v2,
        default_anchors="default",
        coco_weights="MaskRCNN_ResNet50_FPN_V2_Weights",
        backbone_weights="ResNet50_Weights",
        description="torchvision ResNet50-FPN v2 (BatchNorm heads, improved training recipe)",
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
