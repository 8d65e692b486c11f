"""PyTorch eager runner: the reference every export is compared against.

On CUDA it computes fp32 in fp32: TF32 is off for its forward passes unless option ``tf32=true`` (PyTorch
allows TF32 for cuDNN convolutions by default, and the fp32 parity tolerances are measured against true
fp32). The device is always indexed (``cuda`` -> ``cuda:0``) and made current for loading and inference, so
the CUDA work, the current stream and a CUDA-event timer all belong to the GPU asked for.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import torch

from cellseg_deploy.backends.base import Runner
from cellseg_deploy.backends.devices import device_name, tf32, tf32_state, torch_device
from cellseg_deploy.backends.registry import register_runner
from cellseg_deploy.errors import BackendUnavailable
from cellseg_deploy.modeling.checkpoint import load_checkpoint
from cellseg_deploy.modeling.raw import forward_raw
from cellseg_deploy.structures import Detections


def detections_from_torch(
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], image_size: tuple[int, int]
) -> Detections:
    """Raw model outputs (any device/dtype) -> :class:`Detections` (numpy, fp32 boxes/scores/masks)."""
    boxes, labels, scores, masks = (
        t.detach().float().cpu() if t.is_floating_point() else t.detach().cpu() for t in out
    )
    return Detections(
        boxes=boxes.numpy().astype(np.float32),
        labels=labels.numpy().astype(np.int64),
        scores=scores.numpy().astype(np.float32),
        mask_probs=masks.numpy().astype(np.float32),
        image_size=image_size,
    )


@register_runner
class TorchRunner(Runner):
    """PyTorch eager on a cellseg-deploy checkpoint (``.pt``); CPU or CUDA.

    Precisions: ``fp32``; ``bf16`` runs the network under ``torch.autocast`` (CPU bf16 or CUDA bf16);
    ``fp16`` runs under CUDA autocast (CUDA only). Anchors and box decoding stay fp32 under autocast (the
    architectures' fp32 anchor generator and box coder, :mod:`cellseg_deploy.modeling.registry`); NMS too.
    Options:

    - ``max_batch``: images per forward in :meth:`infer_batch` (default 4).
    - ``tf32`` (CUDA): ``False`` (default) turns TF32 off for cuBLAS and cuDNN during the forward passes;
      ``True`` allows it (faster on Ampere and later, not what the fp32 tolerances were measured on).
    """

    name = "torch"
    description = "PyTorch eager (the reference)"
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "bf16", "fp16")
    model_suffixes: ClassVar[tuple[str, ...]] = (".pt", ".pth")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.torch_device = torch_device(self.device)
        self.device = device_name(self.device)
        self.tf32 = self.bool_option("tf32")

    def _load(self) -> None:
        dev = self.torch_device
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise BackendUnavailable(
                    f"device {self.device!r} asked for, but torch sees no CUDA GPU; use --device cpu"
                )
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise BackendUnavailable(
                    f"device {self.device!r} asked for, but torch sees {torch.cuda.device_count()} GPU(s) "
                    "(indices from 0); pick another --device"
                )
        if self.precision == "fp16" and dev.type != "cuda":
            raise BackendUnavailable("torch fp16 runs on CUDA only; on the CPU use --precision bf16 or fp32")
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        self.checkpoint = load_checkpoint(self.model_path)
        with self._on_device():
            self.model = self.checkpoint.build_model().to(dev)

    def _close(self) -> None:
        del self.model
        if self.torch_device.type == "cuda":
            with self._on_device():
                torch.cuda.empty_cache()

    @contextlib.contextmanager
    def _on_device(self) -> Iterator[None]:
        """This runner's GPU as the current device (its current stream is what CUDA events record on)."""
        if self.torch_device.type != "cuda":
            yield
            return
        with torch.cuda.device(self.torch_device):
            yield

    def _autocast(self) -> Any:
        kind = self.torch_device.type
        if self.precision == "fp32":
            return torch.autocast(device_type=kind, enabled=False)
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=kind, dtype=dtype)

    def _sync(self) -> None:
        if self.torch_device.type == "cuda":
            torch.cuda.synchronize(self.torch_device)

    def _infer(self, image: np.ndarray) -> Detections:
        return self._infer_batch([image])[0]

    def _infer_batch(self, images: list[np.ndarray]) -> list[Detections]:
        max_batch = int(self.options.get("max_batch", 4))
        results: list[Detections] = []
        for start in range(0, len(images), max_batch):
            chunk = images[start : start + max_batch]
            t0 = time.perf_counter()
            tensors = [torch.from_numpy(im).to(self.torch_device) for im in chunk]
            self._sync()
            t1 = time.perf_counter()
            with self._on_device(), tf32(self.tf32), torch.inference_mode(), self._autocast():
                outs = forward_raw(self.model, tensors)
            self._sync()
            t2 = time.perf_counter()
            for im, out in zip(chunk, outs, strict=True):
                det = detections_from_torch(out, (im.shape[0], im.shape[1]))
                det.timings = {"preprocess": (t1 - t0) / len(chunk), "network": (t2 - t1) / len(chunk)}
                results.append(det)
        return results

    def _info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"arch": self.checkpoint.model_config.arch, "torch": str(torch.__version__)}
        if self.torch_device.type == "cuda":
            with tf32(self.tf32):  # what the forward passes run with
                info.update(tf32=self.tf32, **tf32_state().as_info())
            info["cudnn_benchmark"] = bool(torch.backends.cudnn.benchmark)
            info["cudnn_deterministic"] = bool(torch.backends.cudnn.deterministic)
            info["gpu"] = torch.cuda.get_device_name(self.torch_device)
        return info
