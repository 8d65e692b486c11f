"""PyTorch eager runner: the reference every export is compared against."""

from __future__ import annotations

import time
from typing import Any, ClassVar

import numpy as np
import torch

from cellseg_deploy.errors import BackendUnavailable
from cellseg_deploy.modeling.checkpoint import load_checkpoint
from cellseg_deploy.modeling.raw import forward_raw
from cellseg_deploy.runners.base import Runner
from cellseg_deploy.runners.registry import register_runner
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
    ``fp16`` runs under CUDA autocast (CUDA only). Box decoding and NMS stay fp32 inside torchvision.
    Options: ``max_batch`` (images per forward in :meth:`infer_batch`, default 4).
    """

    name = "torch"
    description = "PyTorch eager (the reference)"
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "bf16", "fp16")
    model_suffixes: ClassVar[tuple[str, ...]] = (".pt", ".pth")

    def _load(self) -> None:
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailable(
                f"device {self.device!r} asked for, but torch sees no CUDA GPU; use --device cpu"
            )
        if self.precision == "fp16" and not self.device.startswith("cuda"):
            raise BackendUnavailable("torch fp16 runs on CUDA only; on the CPU use --precision bf16 or fp32")
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        self.checkpoint = load_checkpoint(self.model_path)
        self.model = self.checkpoint.build_model().to(self.device)

    def _close(self) -> None:
        del self.model
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def _autocast(self) -> Any:
        if self.precision == "fp32":
            return torch.autocast(device_type=self.device.split(":")[0], enabled=False)
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.split(":")[0], dtype=dtype)

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)

    def _infer(self, image: np.ndarray) -> Detections:
        return self._infer_batch([image])[0]

    def _infer_batch(self, images: list[np.ndarray]) -> list[Detections]:
        max_batch = int(self.options.get("max_batch", 4))
        results: list[Detections] = []
        for start in range(0, len(images), max_batch):
            chunk = images[start : start + max_batch]
            t0 = time.perf_counter()
            tensors = [torch.from_numpy(im).to(self.device) for im in chunk]
            self._sync()
            t1 = time.perf_counter()
            with torch.inference_mode(), self._autocast():
                outs = forward_raw(self.model, tensors)
            self._sync()
            t2 = time.perf_counter()
            for im, out in zip(chunk, outs, strict=True):
                det = detections_from_torch(out, (im.shape[0], im.shape[1]))
                det.timings = {"preprocess": (t1 - t0) / len(chunk), "network": (t2 - t1) / len(chunk)}
                results.append(det)
        return results

    def _info(self) -> dict[str, Any]:
        return {"arch": self.checkpoint.model_config.arch, "torch": str(torch.__version__)}
