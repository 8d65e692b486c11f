"""``build_model``: a Mask R-CNN from a config, with random, pretrained or local initial weights.

Weights, in order of precedence:

1. ``init=PATH``: a local file with the whole model's weights (a cellseg-deploy checkpoint or a plain
   torchvision state dict, e.g. ``maskrcnn_resnet50_fpn_coco-*.pth``); tensors whose shape does not fit
   (the class-specific predictors) are skipped and counted.
2. ``pretrained_backbone=PATH``: a local ImageNet state dict for the backbone trunk (e.g. ``resnet50-*.pth``).
3. ``pretrained="coco"`` / ``"imagenet"``: torchvision's own weights through its normal download API.
4. Otherwise random initialisation, said once in the log.

Structure follows the weights, as torchvision's own builders decide it (``is_trained`` in
``torchvision/models/detection/mask_rcnn.py``): a model that starts from trained weights (any of 1-3) gets
``FrozenBatchNorm2d`` in its trunk where torchvision's builder for that architecture uses it, and only its
last 3 trunk stages train unless ``model.trainable_backbone_layers`` says otherwise; a randomly initialised
one trains ``BatchNorm2d`` and every stage. Without this, fine-tuning from COCO with one image per GPU
would update BatchNorm statistics from single images. :func:`resolve_model_config` writes the decision into
the config (the one a checkpoint records), so the same structure is rebuilt from the checkpoint alone.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torchvision.models.detection import MaskRCNN

from cellseg_deploy.errors import CheckpointError, ConfigError
from cellseg_deploy.modeling.config import ModelConfig
from cellseg_deploy.modeling.registry import get_arch

log = logging.getLogger(__name__)

PRETRAINED_CHOICES: tuple[str, ...] = ("none", "coco", "imagenet")
"""Values of ``pretrained`` (and of a recipe's ``weights.pretrained``): random, COCO detector or ImageNet backbone."""


def starts_trained(
    pretrained: str = "none", init: str | Path | None = None, pretrained_backbone: str | Path | None = None
) -> bool:
    """Whether these initial weights are trained ones (torchvision's ``is_trained``)."""
    return init is not None or pretrained_backbone is not None or pretrained != "none"


def resolve_model_config(
    config: ModelConfig,
    *,
    pretrained: str = "none",
    init: str | Path | None = None,
    pretrained_backbone: str | Path | None = None,
) -> ModelConfig:
    """``config`` with ``backbone_norm``, ``trainable_backbone_layers`` and ``frozen_bn_eps`` decided for
    these initial weights (see the module docstring); explicit values are kept, so a resolved config (as a
    checkpoint records it) rebuilds the same structure without weights. Idempotent.

    Unlike torchvision, which ignores ``trainable_backbone_layers`` below 5 without trained weights (with a
    warning), an explicit value is kept here: rebuilding a fine-tuned model must keep its frozen stages. The
    training loop warns where a recipe freezes randomly initialised stages.
    """
    if pretrained not in PRETRAINED_CHOICES:
        raise ConfigError(
            f"pretrained: unknown value {pretrained!r}; expected one of {list(PRETRAINED_CHOICES)}"
        )
    spec = get_arch(config.arch)
    trained = starts_trained(pretrained, init, pretrained_backbone)
    norm = config.backbone_norm
    if norm == "auto":
        norm = spec.trained_norm if trained else "batch"
    layers = config.trainable_backbone_layers
    if layers is None:
        layers = 3 if trained else 5
    eps = config.frozen_bn_eps
    if eps is None:
        from_coco = init is None and pretrained_backbone is None and pretrained == "coco"
        eps = spec.coco_frozen_bn_eps if from_coco and spec.coco_frozen_bn_eps is not None else 1e-5
    return config.replace(backbone_norm=norm, trainable_backbone_layers=layers, frozen_bn_eps=eps)


def build_model(
    config: ModelConfig,
    *,
    pretrained: str = "none",
    init: str | Path | None = None,
    pretrained_backbone: str | Path | None = None,
) -> MaskRCNN:
    """Build the Mask R-CNN described by ``config`` and load its initial weights.

    The structure is :func:`resolve_model_config`'s for these weights (pass its result to
    :func:`~cellseg_deploy.modeling.checkpoint.save_checkpoint` so checkpoints rebuild it). Returns the
    model in training mode on the CPU.

    Raises:
        ConfigError: unknown architecture or ``pretrained`` value, or weights this architecture lacks.
        CheckpointError: a local weight file that is missing or unreadable.
        BackendUnavailable: torchvision's download failed (no network): one line naming the offline option.
    """
    config.validate()
    config = resolve_model_config(
        config, pretrained=pretrained, init=init, pretrained_backbone=pretrained_backbone
    )
    spec = get_arch(config.arch)
    model = spec.build(config)
    if init is not None:
        _load_local_weights(model, Path(init), what="init")
    elif pretrained_backbone is not None:
        _load_local_weights(model.backbone.body, Path(pretrained_backbone), what="pretrained_backbone")
    elif pretrained == "coco":
        _load_torchvision_coco(model, config)
    elif pretrained == "imagenet":
        _load_torchvision_backbone(model, config)
    else:
        log.info("model %s: random initialisation (no pretrained weights asked for)", config.arch)
    return model


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a local weight file: a cellseg-deploy checkpoint or a plain state dict.

    Loaded with ``weights_only=True`` (no pickled code runs).
    """
    if not path.is_file():
        raise CheckpointError(f"weight file {path} does not exist; pass the path of a .pt/.pth file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
        raise CheckpointError(
            f"cannot read weight file {path}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        ) from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"weight file {path} holds no state dict (a mapping of names to tensors)")
    return obj


def _load_local_weights(module: torch.nn.Module, path: Path, what: str) -> None:
    state = read_state_dict(path)
    own = module.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not fitting:
        raise CheckpointError(
            f"{what} file {path}: none of its {len(state)} tensors fit this model "
            f"(first key {next(iter(state), None)!r}); is it for another architecture?"
        )
    module.load_state_dict(fitting, strict=False)
    log.info(
        "%s: loaded %d/%d tensors from %s (%d skipped: missing or different shape)",
        what,
        len(fitting),
        len(own),
        path,
        len(state) - len(fitting),
    )


def _download_failed(what: str, exc: Exception) -> Exception:
    from cellseg_deploy.errors import BackendUnavailable

    first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
    return BackendUnavailable(
        f"could not download torchvision's {what} weights ({first}); offline, pass a local file with "
        "--init PATH (whole model) or --pretrained-backbone PATH (backbone), or train from random init"
    )


def _load_torchvision_coco(model: MaskRCNN, config: ModelConfig) -> None:
    import torchvision.models.detection as det

    spec = get_arch(config.arch)
    if spec.coco_weights is None:
        raise ConfigError(
            f"pretrained: architecture {config.arch!r} has no COCO weights; use 'imagenet' or 'none'"
        )
    weights = getattr(det, spec.coco_weights).DEFAULT
    try:
        state = weights.get_state_dict(progress=True)
    except Exception as exc:
        raise _download_failed("COCO", exc) from exc
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(fitting, strict=False)
    log.info("pretrained COCO weights %s: loaded %d/%d tensors", weights, len(fitting), len(own))


def _load_torchvision_backbone(model: MaskRCNN, config: ModelConfig) -> None:
    import torchvision.models as tvm

    spec = get_arch(config.arch)
    if spec.backbone_weights is None:
        raise ConfigError(f"pretrained: architecture {config.arch!r} has no ImageNet backbone weights")
    weights = getattr(tvm, spec.backbone_weights).DEFAULT
    try:
        state = weights.get_state_dict(progress=True)
    except Exception as exc:
        raise _download_failed("ImageNet backbone", exc) from exc
    body = model.backbone.body
    own = body.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    body.load_state_dict(fitting, strict=False)
    log.info("pretrained backbone %s: loaded %d/%d tensors", weights, len(fitting), len(own))
