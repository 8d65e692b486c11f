"""The data types that flow between runners, post-processing, evaluation, parity and benchmarks.

Coordinates are always in original-image pixels, boxes ``[x1, y1, x2, y2]`` (x right, y down,
``x2``/``y2`` exclusive edges as in torchvision). Labels are 1..4 (0 is background and never appears).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Detections:
    """Raw output of a runner for one image, before post-processing.

    Attributes:
        boxes: float32 ``[N, 4]`` ``x1, y1, x2, y2`` in original-image pixels.
        labels: int64 ``[N]`` in 1..4.
        scores: float32 ``[N]`` in [0, 1], sorted descending.
        mask_probs: float32 ``[N, M, M]`` mask probabilities at the mask head's resolution
            (``M`` = 28 for torchvision), relative to each box (not yet pasted).
        image_size: ``(H, W)`` of the original image.
        timings: seconds spent per stage inside the runner for this image
            (``"preprocess"``, ``"network"``, and for staged runners one entry per stage), for benchmarks.
    """

    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    mask_probs: np.ndarray
    image_size: tuple[int, int]
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.boxes)
        if (
            self.boxes.shape != (n, 4)
            or len(self.labels) != n
            or len(self.scores) != n
            or len(self.mask_probs) != n
        ):
            from cellseg_deploy.errors import InvalidModelOutput

            raise InvalidModelOutput(
                f"inconsistent detections: boxes {self.boxes.shape}, labels {self.labels.shape}, "
                f"scores {self.scores.shape}, mask_probs {self.mask_probs.shape}"
            )
        if self.mask_probs.ndim == 4:  # [N, 1, M, M] -> [N, M, M]
            self.mask_probs = self.mask_probs[:, 0]

    def __len__(self) -> int:
        return len(self.boxes)

    @classmethod
    def empty(cls, image_size: tuple[int, int], mask_size: int = 28) -> Detections:
        """No detections for an image of ``image_size`` ``(H, W)``."""
        return cls(
            boxes=np.zeros((0, 4), np.float32),
            labels=np.zeros((0,), np.int64),
            scores=np.zeros((0,), np.float32),
            mask_probs=np.zeros((0, mask_size, mask_size), np.float32),
            image_size=image_size,
        )


@dataclass
class Instances:
    """Post-processed instances for one image: what evaluation, parity, predict and overlays consume.

    Attributes:
        boxes: float32 ``[N, 4]`` ``x1, y1, x2, y2`` in original-image pixels (the detector's boxes).
        labels: int64 ``[N]`` in 1..4.
        scores: float32 ``[N]``.
        rles: ``N`` COCO compressed RLEs ``{"size": [H, W], "counts": str}`` of the binary masks at the
            original resolution (column-major, as pycocotools encodes them).
        image_size: ``(H, W)``.
        mask_probs: optional float32 ``[N, M, M]``, the mask head's probabilities in [0, 1] of the same rows,
            at the head's resolution (``M`` = 28 for torchvision) and relative to each box, i.e. before
            pasting and thresholding (what :attr:`Detections.mask_probs` held for the kept detections).
            :func:`~cellseg_deploy.postprocess.postprocess` fills it (``N * M * M * 4`` bytes: 3 KiB per
            instance); ``None`` when the producer did not keep them (hand-made instances, read from files).
            Parity compares them between backends, since the binary masks hide a probability error that
            stays on one side of the mask threshold.
    """

    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    rles: list[dict[str, Any]]
    image_size: tuple[int, int]
    mask_probs: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.boxes)

    def masks(self) -> np.ndarray:
        """Dense binary masks, bool ``[N, H, W]`` (memory ``N*H*W`` bytes: use on small images only)."""
        from cellseg_deploy.data.rle import decode_rles

        return decode_rles(self.rles, self.image_size)

    def select(self, keep: np.ndarray) -> Instances:
        """The subset given by a boolean mask or an index array over the N instances."""
        idx = np.flatnonzero(keep) if keep.dtype == bool else np.asarray(keep, dtype=np.int64)
        return Instances(
            boxes=self.boxes[idx],
            labels=self.labels[idx],
            scores=self.scores[idx],
            rles=[self.rles[i] for i in idx],
            image_size=self.image_size,
            mask_probs=None if self.mask_probs is None else self.mask_probs[idx],
        )


@dataclass(frozen=True)
class LayerTime:
    """One layer of a compiled graph in one call, as the runtime's own profiler timed it.

    Attributes:
        name: the runtime's name of the layer (for OpenVINO a fused layer carries one original node's name).
        op: the layer's type in the runtime (``Convolution``, ``ROIAlign``, ``Conv``, ...).
        kernel: the implementation that ran (OpenVINO's ``exec_type`` such as ``brgconv_avx512_amx_I8``;
            ONNX Runtime's execution provider).
        precision: what the layer computed in: ``int8``, ``bf16``, ``fp16``, ``fp32``, ``int32``, ``int64``,
            ... (OpenVINO: the kernel's precision; ONNX Runtime: the element type of its first output).
        ms: wall time of the layer in this call, milliseconds.
        origin: names that say where in the model the layer comes from, most telling first: its own name,
            the original graph nodes fused into it, then its neighbours' names (for layers the runtime made
            itself, such as inserted reorders or quantise steps).
    """

    name: str
    op: str
    kernel: str
    precision: str
    ms: float
    origin: tuple[str, ...] = ()
