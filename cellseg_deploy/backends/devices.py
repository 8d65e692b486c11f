"""Device names and the TF32 switch, shared by every runner, the trainer and the timers.

- :func:`parse_device` turns ``"cpu"``, ``"cuda"``, ``"cuda:1"`` (or a ``torch.device``) into
  ``(kind, index)`` without importing torch, so the ONNX Runtime runner can use it in a process that never
  imports torch; :func:`torch_device` returns the indexed ``torch.device``. ``"cuda"`` means GPU 0, always
  written out as ``cuda:0``: ``torch.cuda.set_device(torch.device("cuda"))`` raises ``ValueError`` (a device
  without an index), and a CUDA-event timer or a stream lookup on an unindexed device silently uses whatever
  GPU is current.
- :func:`set_tf32` / :func:`tf32` set ``torch.backends.cuda.matmul.allow_tf32`` and
  ``torch.backends.cudnn.allow_tf32`` together. On Ampere and later GPUs TF32 rounds fp32 matmul and
  convolution inputs to a 10-bit mantissa; PyTorch allows it for cuDNN convolutions by default, so "fp32" on a
  GPU is TF32 unless someone turns it off. fp32 work here turns it off (the fp32 parity tolerances are
  measured against true fp32) and takes it only as an explicit option; :func:`tf32_state` is what
  ``info()`` reports.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cellseg_deploy.errors import ConfigError

if TYPE_CHECKING:
    import torch

DEVICE_KINDS: tuple[str, ...] = ("cpu", "cuda")


def parse_device(device: Any) -> tuple[str, int | None]:
    """``(kind, index)`` of a device name or ``torch.device``; ``index`` is ``None`` for the CPU.

    ``"cuda"`` gives index 0. Raises :class:`~cellseg_deploy.errors.ConfigError` for anything else
    (``"gpu"``, ``"cuda:x"``, ``"cuda:-1"``, ``"mps"``).
    """
    text = str(device).strip().lower()
    kind, sep, rest = text.partition(":")
    if kind not in DEVICE_KINDS:
        raise ConfigError(f"unknown device {device!r}: expected 'cpu', 'cuda' or 'cuda:N'")
    if kind == "cpu":
        if sep and rest not in ("", "0"):
            raise ConfigError(f"unknown device {device!r}: the CPU has no index other than 0; use 'cpu'")
        return "cpu", None
    if not sep:
        return "cuda", 0
    if not rest.isdigit():
        raise ConfigError(f"unknown device {device!r}: expected 'cuda:N' with N a GPU index >= 0")
    return "cuda", int(rest)


def device_name(device: Any) -> str:
    """The normalised name: ``"cpu"`` or ``"cuda:N"`` (``"cuda"`` -> ``"cuda:0"``)."""
    kind, index = parse_device(device)
    return kind if index is None else f"{kind}:{index}"


def torch_device(device: Any) -> torch.device:
    """An indexed ``torch.device``: ``cuda`` -> ``cuda:0``, ``cpu`` stays ``cpu`` (torch gives it no index)."""
    import torch

    kind, index = parse_device(device)
    return torch.device(kind) if index is None else torch.device(kind, index)


@dataclass(frozen=True)
class TF32State:
    """What ``torch.backends`` says about TF32: for matmuls (cuBLAS) and for cuDNN convolutions."""

    matmul: bool
    cudnn: bool

    @property
    def enabled(self) -> bool:
        """True where either switch lets fp32 work run in TF32."""
        return self.matmul or self.cudnn

    def as_info(self) -> dict[str, bool]:
        """For a runner's ``info()``: ``{"tf32_matmul": ..., "tf32_cudnn": ...}``."""
        return {"tf32_matmul": self.matmul, "tf32_cudnn": self.cudnn}


def tf32_state() -> TF32State:
    """The current TF32 switches (process-wide in torch)."""
    import torch

    return TF32State(
        matmul=bool(torch.backends.cuda.matmul.allow_tf32), cudnn=bool(torch.backends.cudnn.allow_tf32)
    )


def set_tf32(enabled: bool = False) -> TF32State:
    """Set both TF32 switches to ``enabled`` (default off: fp32 means fp32) and return the previous state.

    The switches are process-wide: a runner calls this where it is created (the caller asked for a
    precision), and :func:`tf32` restores them for code that must not leak the setting.
    """
    import torch

    previous = tf32_state()
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)
    return previous


def restore_tf32(state: TF32State) -> None:
    """Put both switches back to ``state`` (as returned by :func:`set_tf32`)."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = state.matmul
    torch.backends.cudnn.allow_tf32 = state.cudnn


@contextlib.contextmanager
def tf32(enabled: bool = False) -> Iterator[TF32State]:
    """Context with both TF32 switches at ``enabled``; yields the state inside, restores the old one after."""
    previous = set_tf32(enabled)
    try:
        yield tf32_state()
    finally:
        restore_tf32(previous)
