"""Overlays: predicted masks drawn over the image, coloured by class, with a legend.

Each instance gets a translucent fill and a one-pixel outline in its class colour; the legend (class name,
colour, number of instances) sits in a strip *below* the image so it never hides cells. Images whose
longer side is under :data:`MIN_OVERLAY_SIDE` pixels are enlarged by an integer factor (nearest neighbour)
so a 33 x 35 image stays legible, and a side still under :data:`MIN_OVERLAY_SHORT_SIDE` pixels (a 257 x 1
image) is stretched alone by an integer factor, so each pixel is drawn as a rectangle rather than lost in a
1 pixel wide strip.

Memory and time: each mask is decoded straight from its run lengths into its own tight box (never into an
``H x W`` buffer), so a 2500 x 1900 image with hundreds of cells costs a few image-sized buffers (the image,
one colour layer, one coverage mask), never ``N x H x W``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from cellseg_deploy import CLASS_NAMES
from cellseg_deploy.io_utils import atomic_write_bytes
from cellseg_deploy.structures import Instances

CLASS_COLORS: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),  # class1: red
    (60, 180, 75),  # class2: green
    (0, 130, 200),  # class3: blue
    (245, 130, 48),  # class4: orange
)
"""RGB colour of label ``k`` is ``CLASS_COLORS[k - 1]`` (cycled for more classes)."""

MIN_OVERLAY_SIDE = 256
"""Overlays of images whose longer side is below this many pixels are enlarged by an integer factor."""

MIN_OVERLAY_SHORT_SIDE = 32
"""After that enlargement, a side shorter than this is stretched alone (integer factor) to reach it."""

_FONT = cv2.FONT_HERSHEY_SIMPLEX


def class_color(label: int) -> tuple[int, int, int]:
    """RGB colour of a 1-based label."""
    return CLASS_COLORS[(int(label) - 1) % len(CLASS_COLORS)]


def overlay_scale(height: int, width: int) -> tuple[int, int]:
    """Integer enlargement ``(sy, sx)`` of an ``height x width`` image in its overlay (see the module docstring)."""
    scale = max(1, math.ceil(MIN_OVERLAY_SIDE / max(height, width)))
    sy = max(scale, math.ceil(MIN_OVERLAY_SHORT_SIDE / height))
    sx = max(scale, math.ceil(MIN_OVERLAY_SHORT_SIDE / width))
    return sy, sx


def draw_overlay(
    image: np.ndarray,
    inst: Instances,
    *,
    alpha: float = 0.4,
    class_names: Sequence[str] = CLASS_NAMES,
) -> np.ndarray:
    """Draw ``inst`` over ``image``.

    Args:
        image: RGB uint8 ``[H, W, 3]`` (the image the instances were predicted on).
        inst: instances with RLE masks of size ``(H, W)``.
        alpha: opacity of the fill, in [0, 1].
        class_names: legend names; label ``k`` is ``class_names[k - 1]``.

    Returns:
        RGB uint8 ``[sy*H + legend, max(sx*W, legend width), 3]`` where ``(sy, sx)`` is
        :func:`overlay_scale` (``1, 1`` for most images).
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"draw_overlay expects RGB uint8 [H, W, 3], got {image.dtype} {list(image.shape)}")
    height, width = image.shape[:2]
    if tuple(inst.image_size) != (height, width):
        raise ValueError(f"instances are for a {inst.image_size} image, the image is {(height, width)}")
    sy, sx = overlay_scale(height, width)

    # Fill: one colour layer and a coverage mask at the original size (later instances paint on top).
    layer = np.zeros_like(image)
    covered = np.zeros((height, width), bool)
    outlines: list[tuple[tuple[int, int, int], list[np.ndarray]]] = []
    for label, rle in zip(inst.labels, inst.rles, strict=True):
        crop, x, y = _decode_tight(rle)
        if crop.size == 0:
            continue
        color = class_color(int(label))
        layer[y : y + crop.shape[0], x : x + crop.shape[1]][crop > 0] = color
        covered[y : y + crop.shape[0], x : x + crop.shape[1]] |= crop > 0
        contours, _ = cv2.findContours(crop, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE, offset=(x, y))
        outlines.append((color, list(contours)))

    out = image.copy()
    blended = image[covered].astype(np.float32) * (1.0 - alpha) + layer[covered].astype(np.float32) * alpha
    out[covered] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    del layer, covered
    if (sy, sx) != (1, 1):
        out = cv2.resize(out, (width * sx, height * sy), interpolation=cv2.INTER_NEAREST)
    factor = np.array([sx, sy], np.int32)  # contour points are (x, y)
    for color, contours in outlines:
        scaled = [c * factor + factor // 2 for c in contours] if (sy, sx) != (1, 1) else contours
        cv2.drawContours(out, scaled, -1, color, thickness=1)

    counts = np.bincount(inst.labels.astype(np.int64), minlength=len(class_names) + 1) if len(inst) else None
    legend = _legend(class_names, counts, out.shape[1])
    canvas_w = max(out.shape[1], legend.shape[1])
    canvas = np.full((out.shape[0] + legend.shape[0], canvas_w, 3), 255, np.uint8)
    canvas[: out.shape[0], : out.shape[1]] = out
    canvas[out.shape[0] :, : legend.shape[1]] = legend
    return canvas


def write_overlay(path: str | Path, image: np.ndarray, inst: Instances, **kwargs: object) -> Path:
    """:func:`draw_overlay` written as a PNG (atomically)."""
    rgb = draw_overlay(image, inst, **kwargs)  # type: ignore[arg-type]
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"could not encode the overlay for {path} as PNG")
    return atomic_write_bytes(path, buf.tobytes())


def rle_counts(counts: str | bytes) -> list[int]:
    """Run lengths of a compressed COCO RLE string (alternating background/foreground, column-major).

    The string format (pycocotools ``rleToString``): each count is a little-endian sequence of 5-bit groups
    stored as ``chr(48 + group)``, bit 5 (``0x20``) meaning "more groups follow" and bit 4 of the last group
    the sign; from the third count on, the stored value is the difference to the count two places before.
    """
    s = counts.encode("ascii") if isinstance(counts, str) else counts
    out: list[int] = []
    p, n = 0, len(s)
    while p < n:
        value, shift, more = 0, 0, True
        while more:
            c = s[p] - 48
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            p += 1
            shift += 5
            if not more and c & 0x10:
                value |= -1 << shift
        if len(out) > 2:
            value += out[-2]
        out.append(value)
    return out


def _decode_tight(rle: dict) -> tuple[np.ndarray, int, int]:
    """Decode an RLE into its tight box only: ``(uint8 [h, w] 0/1, x, y)``; an empty mask gives size 0.

    Works on the run lengths, so the cost is that of the mask's own columns, never of the whole image.
    """
    height = int(rle["size"][0])
    runs = np.asarray(rle_counts(rle["counts"]), np.int64)
    ends = np.cumsum(runs)
    starts = ends - runs
    fg_starts, fg_ends = starts[1::2], ends[1::2]
    nonempty = fg_ends > fg_starts
    fg_starts, fg_ends = fg_starts[nonempty], fg_ends[nonempty]
    if fg_starts.size == 0:
        return np.zeros((0, 0), np.uint8), 0, 0
    col0 = int(fg_starts[0]) // height
    col1 = int(fg_ends[-1] - 1) // height
    strip = np.zeros((col1 - col0 + 1) * height, np.uint8)  # column-major strip of the mask's columns
    base = col0 * height
    for a, b in zip(fg_starts.tolist(), fg_ends.tolist(), strict=True):
        strip[a - base : b - base] = 1
    cols = strip.reshape(col1 - col0 + 1, height).T  # [H, ncols]
    rows = np.flatnonzero(cols.any(axis=1))
    used = np.flatnonzero(cols.any(axis=0))
    y0, y1 = int(rows[0]), int(rows[-1]) + 1
    x0, x1 = int(used[0]), int(used[-1]) + 1
    return np.ascontiguousarray(cols[y0:y1, x0:x1]), col0 + x0, y0


def _legend(class_names: Sequence[str], counts: np.ndarray | None, min_width: int) -> np.ndarray:
    """A white strip with one ``[colour] name (n)`` entry per class, RGB uint8 ``[h, w, 3]``."""
    font_scale, thick, pad, swatch = 0.45, 1, 6, 12
    entries = []
    for k, name in enumerate(class_names, start=1):
        n = int(counts[k]) if counts is not None and k < len(counts) else 0
        text = f"{name} ({n})"
        (tw, th), _ = cv2.getTextSize(text, _FONT, font_scale, thick)
        entries.append((k, text, tw, th))
    line_h = max(swatch, *(e[3] for e in entries)) + pad
    width = max(min_width, max(pad + swatch + 4 + e[2] + pad for e in entries))
    strip = np.full((pad + line_h * len(entries), width, 3), 255, np.uint8)
    for row, (k, text, _tw, th) in enumerate(entries):
        top = pad + row * line_h
        cv2.rectangle(strip, (pad, top), (pad + swatch, top + swatch), class_color(k), thickness=-1)
        cv2.putText(
            strip,
            text,
            (pad + swatch + 4, top + swatch - max(0, (swatch - th) // 2)),
            _FONT,
            font_scale,
            (0, 0, 0),
            thick,
            cv2.LINE_AA,
        )
    return strip
