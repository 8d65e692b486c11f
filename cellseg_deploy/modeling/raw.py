"""Mask R-CNN inference that stops before mask pasting: the one forward path shared by the PyTorch runner
and the ONNX export.

torchvision's ``MaskRCNN.forward`` pastes every 28 x 28 mask into a full-size image inside the model (a
``Loop`` in ONNX, slow, and not buildable in TensorRT). Here the model returns the mask probabilities at
the mask head's resolution and :mod:`cellseg_deploy.postprocess` pastes them on the host, identically for
every backend.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.transform import resize_boxes

OUTPUT_NAMES: tuple[str, ...] = ("boxes", "labels", "scores", "mask_probs")
"""Names of the raw outputs, in order (also the ONNX graph's output names)."""


def image_to_tensor(image: torch.Tensor) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` RGB -> float32 ``[3, H, W]`` in [0, 1] (normalisation happens in the model)."""
    return image.permute(2, 0, 1).to(torch.float32) / 255.0


def forward_raw(
    model: MaskRCNN, images: list[torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Run ``model`` (in eval mode) on RGB uint8 images ``[H_i, W_i, 3]`` and return per image
    ``(boxes float32 [N, 4] x1y1x2y2 original px, labels int64 [N], scores float32 [N],
    mask_probs float32 [N, M, M])``."""
    tensors = [image_to_tensor(im) for im in images]
    original_sizes = [(int(t.shape[-2]), int(t.shape[-1])) for t in tensors]
    if torch.jit.is_tracing():  # keep the sizes symbolic in the exported graph
        original_sizes = [t.shape[-2:] for t in tensors]  # type: ignore[misc]
    batch, _ = model.transform(tensors)
    features = model.backbone(batch.tensors)
    proposals, _ = model.rpn(batch, features)
    detections, _ = model.roi_heads(features, proposals, batch.image_sizes)
    out = []
    for det, resized, original in zip(detections, batch.image_sizes, original_sizes, strict=True):
        boxes = resize_boxes(det["boxes"], resized, original)
        out.append((boxes, det["labels"], det["scores"], det["masks"][:, 0]))
    return out


class RawMaskRCNN(nn.Module):
    """``forward(image uint8 [H, W, 3]) -> (boxes, labels, scores, mask_probs)`` for one image.

    Pre-processing (scaling to [0, 1], normalisation, resizing to the model's input size) is inside, so the
    exported graph takes the image as read from disk.
    """

    def __init__(self, model: MaskRCNN) -> None:
        super().__init__()
        self.model = model
        self.eval()  # the wrapper too: torch.onnx.export restores the wrapper's mode down the whole tree

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return forward_raw(self.model, [image])[0]
