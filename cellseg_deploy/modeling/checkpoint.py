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

Loading refuses, in one line each: a file that is not a torch checkpoint (without quoting its bytes), a
pickle that carries code (naming the globals it would call; such a file is never unpickled here), and
weights that hold NaN or infinite values (a diverged training predicts nothing, silently).
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
        CheckpointError: missing file, unreadable/corrupt file, a file that carries code, not a
            cellseg-deploy checkpoint, or weights with NaN / infinite values.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist; train one with 'cellseg-deploy train' or check the path"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise _load_error(path, exc) from exc
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(
            f"{path} is not a cellseg-deploy checkpoint (format {found!r}, expected {CHECKPOINT_FORMAT!r}); "
            "to start from plain torchvision weights use --init PATH"
        )
    _check_finite(path, obj.get("state_dict"))
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


def _load_error(path: Path, exc: Exception) -> CheckpointError:
    """The one-line refusal for a file ``torch.load(weights_only=True)`` rejected.

    Never repeats torch's own message: it can quote the file's first bytes and it advises loading the file
    unsafely.
    """
    import pickle

    unsafe: list[str] = []
    with contextlib.suppress(Exception):  # not a torch zip file: there is nothing to list
        unsafe = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    if unsafe:
        names = ", ".join(unsafe[:5]) + (f" and {len(unsafe) - 5} more" if len(unsafe) > 5 else "")
        return CheckpointError(
            f"checkpoint {path} carries code ({names}): loading it could run that code, so it is refused; "
            "cellseg-deploy checkpoints hold only weights and settings: use one written by 'cellseg-deploy "
            "train' from a source you trust"
        )
    message = str(exc)
    if isinstance(exc, RuntimeError) and message.startswith("PytorchStreamReader"):
        detail = f" ({message.splitlines()[0][:120]})"
    elif isinstance(exc, pickle.UnpicklingError | EOFError) or "Weights only load failed" in message:
        detail = " (neither a zip archive nor a pickle written by torch.save)"
    else:
        detail = f" ({type(exc).__name__})"
    return CheckpointError(f"checkpoint {path} is corrupt or not a torch file{detail}")


def _check_finite(path: Path, state_dict: Any) -> None:
    """Raise :class:`CheckpointError` when a floating-point weight holds NaN or infinite values."""
    if not isinstance(state_dict, dict):
        return
    bad = [
        name
        for name, t in state_dict.items()
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    if bad:
        raise CheckpointError(
            f"checkpoint {path}: {len(bad)} weight tensor(s) hold NaN or infinite values (first: {bad[0]}); "
            "the training diverged: use an earlier checkpoint, or train again with a lower learning rate"
        )
