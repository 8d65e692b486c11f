"""Change a trained model's inference settings without retraining: the number of RPN proposals.

Mask R-CNN's box head (two fully connected layers on a 7 x 7 x 256 RoIAlign feature) runs once per RPN
proposal, ``rpn_post_nms_top_n_test`` of them per image, after the RPN kept the ``rpn_pre_nms_top_n_test``
best-scored anchors of *each* pyramid level for its NMS. torchvision's defaults (1000 and 1000) come from
COCO; a cell image holds a known, bounded number of cells, and proposals beyond a few per cell mostly
duplicate cells the NMS removes later. Fewer proposals make the box head and RoIAlign cheaper on every
backend, but they are a change of the *model*, not of a backend: the detections can differ, so the choice
is the user's and its accuracy has to be measured (``benchmarks/cpu_accuracy.py --proposals N``).

A retuned checkpoint is a new checkpoint with the same weights: every later step (export, parity, eval,
bench) then reads one model, exports are cached under its own SHA-256, and nothing compares a 300-proposal
export against a 1000-proposal reference. ``model_config.extra["retuned"]`` records where it came from
(the source's path and SHA-256), what changed (``{field: [before, after]}``) and the source's validation
metrics, which were measured with the old settings (the new checkpoint's ``metrics`` are empty until it is
evaluated again).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cellseg_deploy.errors import ConfigError
from cellseg_deploy.io_utils import sha256_file
from cellseg_deploy.modeling.checkpoint import load_checkpoint, save_checkpoint
from cellseg_deploy.modeling.config import ModelConfig

PROPOSAL_FIELDS = ("rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_test")
"""The inference settings :func:`with_proposals` changes."""


def with_proposals(config: ModelConfig, proposals: int, pre_nms: int | None = None) -> ModelConfig:
    """``config`` keeping ``proposals`` RPN proposals per image at inference.

    Args:
        config: the model's settings.
        proposals: ``rpn_post_nms_top_n_test``: proposals per image after the RPN's NMS (the box head's RoIs).
        pre_nms: ``rpn_pre_nms_top_n_test``: anchors per pyramid level entering that NMS; ``None``: the same
            number as ``proposals`` (torchvision's defaults are equal too).

    Raises:
        ConfigError: a count below 1.
    """
    pre = proposals if pre_nms is None else pre_nms
    for flag, value in (("--proposals", proposals), ("--pre-nms", pre)):
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    return config.replace(rpn_post_nms_top_n_test=proposals, rpn_pre_nms_top_n_test=pre)


def proposal_changes(before: ModelConfig, after: ModelConfig) -> dict[str, list[int]]:
    """``{field: [before, after]}`` for the proposal settings that differ."""
    return {
        name: [getattr(before, name), getattr(after, name)]
        for name in PROPOSAL_FIELDS
        if getattr(before, name) != getattr(after, name)
    }


def retune_checkpoint(
    src: str | Path, out: str | Path, proposals: int, pre_nms: int | None = None
) -> dict[str, Any]:
    """Write ``out``: the checkpoint ``src`` with :func:`with_proposals` applied (atomically); returns the
    record it stores in ``model_config.extra["retuned"]``, so a caller can report it without reading ``out``.

    The weights are loaded into the architecture first, so a checkpoint that does not build is refused
    here rather than at export. The training state (``last.pt``'s optimizer and RNG) is not carried over:
    a retuned checkpoint is for inference, not for ``--resume``.

    Raises:
        CheckpointError: ``src`` unreadable; ConfigError: bad counts, or ``out`` is ``src``.
    """
    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve():
        raise ConfigError(f"the retuned checkpoint must not replace its source {src}; pick another --out")
    ckpt = load_checkpoint(src)
    config = with_proposals(ckpt.model_config, proposals, pre_nms)
    record: dict[str, Any] = {
        "from": str(src),
        "from_sha256": sha256_file(src),
        "changes": proposal_changes(ckpt.model_config, config),
        "metrics_before": ckpt.metrics,
    }
    config = config.replace(extra={**config.extra, "retuned": record})
    save_checkpoint(out, ckpt.build_model(), config, recipe=ckpt.recipe, epoch=ckpt.epoch)
    return record


def retuned_copy(src: str | Path, folder: str | Path, proposals: int, pre_nms: int | None = None) -> Path:
    """``src`` retuned (:func:`retune_checkpoint`) into ``folder``, written once and reused afterwards: the
    file is named by the source's SHA-256 and the counts, so a changed source gets a new file (a checkpoint's
    bytes change with every write, and a rewrite would invalidate every export cached under its SHA-256)."""
    src = Path(src)
    pre = "" if pre_nms is None else f"-pre{pre_nms}"
    out = Path(folder) / f"{src.stem}-{sha256_file(src)[:12]}-prop{proposals}{pre}.pt"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        retune_checkpoint(src, out, proposals, pre_nms)
    return out
