"""Microscopy augmentations applied consistently to an image, its instance masks and boxes.

Geometry (flips, 90-degree rotations, rescale, crop) moves the image, every mask and every box together;
colour (brightness, contrast, saturation, hue, stain jitter, grayscale) touches the image only. Every random
draw comes from the ``numpy.random.Generator`` passed in, so a sample's augmentation is a pure function of
its seed: the loop seeds it from ``(recipe seed, epoch, sample position)``, which makes training
reproducible and a resumed run identical to an uninterrupted one.

Conventions: image uint8 ``[H, W, 3]`` RGB; masks uint8 ``[N, H, W]`` (0/1); boxes float32 ``[N, 4]``
``x1, y1, x2, y2`` in pixels with exclusive ``x2``/``y2`` (a mask covering columns ``a..b`` has
``x1 = a, x2 = b + 1``), i.e. :func:`boxes_from_masks`; labels int64 ``[N]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from cellseg_deploy.training.recipe import AugmentSettings

# Ruifrok & Johnston's stain vectors (rows: haematoxylin, eosin, DAB) in optical-density RGB.
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
_RGB_FROM_HED /= np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass
class Target:
    """One image's instances.

    Attributes:
        masks: uint8 ``[N, H, W]`` binary masks.
        boxes: float32 ``[N, 4]`` ``x1, y1, x2, y2`` (exclusive right/bottom edges).
        labels: int64 ``[N]`` class labels 1..K.
    """

    masks: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, keep: np.ndarray) -> Target:
        """The instances where the boolean ``keep`` ``[N]`` is true."""
        return Target(self.masks[keep], self.boxes[keep], self.labels[keep])


def boxes_from_masks(masks: np.ndarray) -> np.ndarray:
    """Tight boxes of binary masks ``[N, H, W]`` -> float32 ``[N, 4]`` ``x1, y1, x2 + 1, y2 + 1``.

    An empty mask gets ``[0, 0, 0, 0]``.
    """
    n = masks.shape[0]
    boxes = np.zeros((n, 4), np.float32)
    if n == 0:
        return boxes
    m = np.asarray(masks, dtype=bool)
    rows = np.any(m, axis=2)  # [N, H]
    cols = np.any(m, axis=1)  # [N, W]
    has = rows.any(axis=1)
    h, w = masks.shape[1], masks.shape[2]
    y1 = rows.argmax(axis=1)
    y2 = h - rows[:, ::-1].argmax(axis=1)
    x1 = cols.argmax(axis=1)
    x2 = w - cols[:, ::-1].argmax(axis=1)
    boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3] = x1, y1, x2, y2
    boxes[~has] = 0
    return boxes


def hflip(image: np.ndarray, target: Target) -> tuple[np.ndarray, Target]:
    """Mirror left-right."""
    w = image.shape[1]
    boxes = target.boxes.copy()
    boxes[:, 0], boxes[:, 2] = w - target.boxes[:, 2], w - target.boxes[:, 0]
    return image[:, ::-1], Target(target.masks[:, :, ::-1], boxes, target.labels)


def vflip(image: np.ndarray, target: Target) -> tuple[np.ndarray, Target]:
    """Mirror top-bottom."""
    h = image.shape[0]
    boxes = target.boxes.copy()
    boxes[:, 1], boxes[:, 3] = h - target.boxes[:, 3], h - target.boxes[:, 1]
    return image[::-1], Target(target.masks[:, ::-1], boxes, target.labels)


def rot90(image: np.ndarray, target: Target, k: int) -> tuple[np.ndarray, Target]:
    """Rotate by ``k * 90`` degrees counter-clockwise (as ``np.rot90``); the image becomes ``W x H`` for odd k."""
    k %= 4
    if k == 0:
        return image, target
    h, w = image.shape[:2]
    b = target.boxes
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    if k == 1:  # (x, y) -> (y, w - x)
        boxes = np.stack([y1, w - x2, y2, w - x1], axis=1)
    elif k == 2:  # (x, y) -> (w - x, h - y)
        boxes = np.stack([w - x2, h - y2, w - x1, h - y1], axis=1)
    else:  # (x, y) -> (h - y, x)
        boxes = np.stack([h - y2, x1, h - y1, x2], axis=1)
    return (
        np.rot90(image, k, axes=(0, 1)),
        Target(np.rot90(target.masks, k, axes=(1, 2)), boxes.astype(np.float32), target.labels),
    )


def _resize_masks(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of ``[N, H, W]`` masks to ``size`` ``(H', W')``."""
    h, w = size
    n = masks.shape[0]
    if n == 0:
        return np.zeros((0, h, w), np.uint8)
    out = np.empty((n, h, w), np.uint8)
    for start in range(0, n, 512):  # OpenCV resizes at most 512 channels at once
        chunk = np.ascontiguousarray(masks[start : start + 512].transpose(1, 2, 0))
        res = cv2.resize(chunk, (w, h), interpolation=cv2.INTER_NEAREST)
        out[start : start + 512] = res.reshape(h, w, -1).transpose(2, 0, 1)
    return out


def rescale(image: np.ndarray, target: Target, factor: float) -> tuple[np.ndarray, Target]:
    """Resize by ``factor`` (bilinear image, nearest masks); boxes are recomputed from the masks."""
    h, w = image.shape[:2]
    nh, nw = max(1, round(h * factor)), max(1, round(w * factor))
    if (nh, nw) == (h, w):
        return image, target
    image = cv2.resize(np.ascontiguousarray(image), (nw, nh), interpolation=cv2.INTER_LINEAR)
    masks = _resize_masks(target.masks, (nh, nw))
    return image, Target(masks, boxes_from_masks(masks), target.labels)


def crop(image: np.ndarray, target: Target, y0: int, x0: int, h: int, w: int) -> tuple[np.ndarray, Target]:
    """The window ``[y0:y0+h, x0:x0+w]``; boxes are recomputed from the cropped masks."""
    masks = target.masks[:, y0 : y0 + h, x0 : x0 + w]
    return image[y0 : y0 + h, x0 : x0 + w], Target(masks, boxes_from_masks(masks), target.labels)


def color_jitter(image: np.ndarray, settings: AugmentSettings, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast, saturation, hue and stain jitter, then optional grayscale (uint8 in and out)."""
    s = settings
    draws = rng.random(6)  # fixed number of draws keeps the stream aligned whatever is enabled
    img = image.astype(np.float32) / 255.0
    if s.brightness > 0:
        img = img * (1.0 + s.brightness * (2.0 * draws[0] - 1.0))
    if s.contrast > 0:
        mean = float((img @ _LUMA).mean())
        img = (img - mean) * (1.0 + s.contrast * (2.0 * draws[1] - 1.0)) + mean
    if s.saturation > 0:
        gray = (img @ _LUMA)[..., None]
        img = (img - gray) * (1.0 + s.saturation * (2.0 * draws[2] - 1.0)) + gray
    if s.hue > 0:
        img = _rotate_hue(img, s.hue * (2.0 * draws[3] - 1.0))
    if s.stain > 0:
        img = _stain_jitter(img, s.stain, rng)
    if s.grayscale > 0 and draws[4] < s.grayscale:
        img = np.repeat((img @ _LUMA)[..., None], 3, axis=2)
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _rotate_hue(img: np.ndarray, turns: float) -> np.ndarray:
    """Rotate hue by ``turns`` of the colour circle (a rotation about the grey axis in YIQ space)."""
    theta = 2.0 * np.pi * turns
    c, s = np.cos(theta), np.sin(theta)
    to_yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    rot = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    m = np.linalg.inv(to_yiq) @ rot @ to_yiq
    return img @ m.T.astype(np.float32)


def _stain_jitter(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Tellez-style HED jitter: per-stain concentration ``c * (1 + N(0, sigma)) + N(0, sigma / 4)``."""
    alpha = 1.0 + rng.normal(0.0, sigma, 3)
    beta = rng.normal(0.0, sigma / 4.0, 3)
    od = -np.log(np.clip(img, 1.0 / 255.0, 1.0))
    conc = od @ _HED_FROM_RGB.astype(np.float32)
    conc = conc * alpha.astype(np.float32) + beta.astype(np.float32)
    return np.exp(-(conc @ _RGB_FROM_HED.astype(np.float32)))


def augment(
    image: np.ndarray, target: Target, settings: AugmentSettings, rng: np.random.Generator
) -> tuple[np.ndarray, Target]:
    """Apply the recipe's augmentations to one sample.

    Args:
        image: uint8 ``[H, W, 3]`` RGB.
        target: the image's instances (masks ``[N, H, W]`` at the image's size).
        settings: probabilities and strengths (:class:`AugmentSettings`).
        rng: the only source of randomness.

    Returns:
        ``(image, target)``: a contiguous uint8 ``[H', W', 3]`` image and its instances; instances that left
        the image or became thinner than ``settings.min_box_size`` are dropped.
    """
    s = settings
    draws = rng.random(4)
    k = int(rng.integers(1, 4))
    if draws[0] < s.hflip:
        image, target = hflip(image, target)
    if draws[1] < s.vflip:
        image, target = vflip(image, target)
    if draws[2] < s.rot90:
        image, target = rot90(image, target, k)
    lo, hi = s.scale_range
    factor = float(rng.uniform(lo, hi)) if hi > lo else lo
    if factor != 1.0:
        image, target = rescale(image, target, factor)
    if s.crop_size > 0:
        h, w = image.shape[:2]
        ch, cw = min(h, s.crop_size), min(w, s.crop_size)
        y0 = int(rng.integers(0, h - ch + 1))
        x0 = int(rng.integers(0, w - cw + 1))
        if (ch, cw) != (h, w):
            image, target = crop(image, target, y0, x0, ch, cw)
    if any(v > 0 for v in (s.brightness, s.contrast, s.saturation, s.hue, s.stain, s.grayscale)):
        image = color_jitter(np.ascontiguousarray(image), s, rng)
    b = target.boxes
    keep = ((b[:, 2] - b[:, 0]) >= max(s.min_box_size, 1.0)) & (
        (b[:, 3] - b[:, 1]) >= max(s.min_box_size, 1.0)
    )
    if not keep.all():
        target = target.select(keep)
    target = Target(np.ascontiguousarray(target.masks), np.ascontiguousarray(target.boxes), target.labels)
    return np.ascontiguousarray(image), target
