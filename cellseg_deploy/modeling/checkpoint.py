"""Self-describing checkpoints.

A checkpoint is a ``torch.save`` of plain containers and tensors only, so it loads with
``torch.load(weights_only=True)`` (no pickled code runs). Keys:

- ``format``: :data:`CHECKPOINT_FORMAT`.
- ``model_config``: :meth:`ModelConfig.to_dict` (architecture, every model setting, class names,
  input normalisation).
- ``state_dict``: the model's weights (CPU tensors).
- ``recipe``: the full training recipe as a dict (empty for untrained models).
- ``epoch``: epochs completed; ``metrics``: the last validation metrics (``segm_AP50`` first).
- ``versions``: library versions; ``created``: ISO time (UTC).
- ``train_state`` (only in ``last.pt``): optimizer, scheduler, scaler and RNG state for ``--resume``.

Writes are atomic (temporary file, then rename), so a crash never leaves a broken checkpoint.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torchvision.models.detection import MaskRCNN

from cellseg_deploy.errors import CheckpointError
from cellseg_deploy.io_utils import atomic_path
from cellseg_deploy.modeling.config import ModelConfig

CHECKPOINT_FORMAT = "cellseg-deploy/checkpoint/1"


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries that shape a model's numbers."""
    import numpy
    import torchvision

    from cellseg_deploy import __version__

    versions = {
        "cellseg_deploy": __version__,
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "numpy": str(numpy.__version__),
    }
    for name in ("onnx", "onnxruntime"):
        with contextlib.suppress(ImportError):
            versions[name] = str(__import__(name).__version__)
    return versions


@dataclass
class Checkpoint:
    """A loaded checkpoint (see the module docstring for the fields)."""

    model_config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    recipe: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    train_state: dict[str, Any] | None = None
    path: Path | None = None

    def build_model(self) -> MaskRCNN:
        """The model with these weights, in eval mode on the CPU."""
        from cellseg_deploy.modeling.registry import get_arch

        model = get_arch(self.model_config.arch).build(self.model_config)
        try:
            model.load_state_dict(self.state_dict, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(
                f"checkpoint {self.path}: weights do not fit architecture {self.model_config.arch!r} "
                f"({str(exc).splitlines()[0][:160]})"
            ) from exc
        return model.eval()


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    config: ModelConfig,
    *,
    recipe: dict[str, Any] | None = None,
    epoch: int = 0,
    metrics: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically. ``model`` may be wrapped (DDP): its ``.module`` is unwrapped."""
    inner = getattr(model, "module", model)
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "model_config": config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in inner.state_dict().items()},
        "recipe": recipe or {},
        "epoch": int(epoch),
        "metrics": metrics or {},
        "versions": library_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if train_state is not None:
        payload["train_state"] = train_state
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint with ``weights_only=True``.

    Raises:
        CheckpointError: missing file, unreadable/corrupt file, or not a cellseg-deploy checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist; train one with 'cellseg-deploy train' or check the path"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch file ({first})") from exc
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(
            f"{path} is not a cellseg-deploy checkpoint (format {found!r}, expected {CHECKPOINT_FORMAT!r}); "
            "to start from plain torchvision weights use --init PATH"
        )
    return Checkpoint(
        model_config=ModelConfig.from_dict(obj["model_config"]),
        state_dict=obj["state_dict"],
        recipe=obj.get("recipe", {}),
        epoch=int(obj.get("epoch", 0)),
        metrics=obj.get("metrics", {}),
        versions=obj.get("versions", {}),
        created=obj.get("created", ""),
        train_state=obj.get("train_state"),
        path=path,
    )
