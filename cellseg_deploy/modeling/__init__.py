"""Model architectures, the builder, the raw (unpasted) forward path and self-describing checkpoints."""

from cellseg_deploy.modeling.builder import PRETRAINED_CHOICES, build_model
from cellseg_deploy.modeling.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from cellseg_deploy.modeling.config import ANCHOR_PRESETS, ModelConfig
from cellseg_deploy.modeling.raw import OUTPUT_NAMES, RawMaskRCNN, forward_raw
from cellseg_deploy.modeling.registry import get_arch, list_architectures
from cellseg_deploy.modeling.retune import retune_checkpoint, with_proposals

__all__ = [
    "ANCHOR_PRESETS",
    "OUTPUT_NAMES",
    "PRETRAINED_CHOICES",
    "Checkpoint",
    "ModelConfig",
    "RawMaskRCNN",
    "build_model",
    "forward_raw",
    "get_arch",
    "list_architectures",
    "load_checkpoint",
    "retune_checkpoint",
    "save_checkpoint",
    "with_proposals",
]
