"""Overlays: predicted masks drawn over the image, with their scores and a legend; against ground truth,
coloured by TP / FP / FN.

Only instances scoring at least ``score_thresh`` (:data:`DEFAULT_OVERLAY_SCORE`) are drawn: the evaluation
keeps every detection down to score 0 (COCOeval ranks them), and drawn, those low-score detections are
box-shaped smears over the cells. How many were left out is said in the legend.

Two colourings:

- without ground truth, by class: each instance a translucent fill and a one-pixel outline in its class
  colour (:data:`CLASS_COLORS`);
- with ground truth (``eval --overlays``, or ``predict --overlays`` on a folder with ``test_ground_truth.json``
  beside it), by outcome (:data:`KIND_COLORS`): a drawn prediction matched to a ground-truth instance (same
  class, mask IoU >= :data:`MATCH_IOU`, one-to-one: :mod:`cellseg_deploy.matching`, the matcher parity uses) is a
  **TP**, an unmatched drawn prediction an **FP**, a ground-truth instance matched by no drawn prediction an
  **FN** (its ground-truth mask is drawn).

Each drawn prediction's score is written at its box's top-left corner where it is legible: labels are placed
highest score first and one that would overlap an earlier label or leave the image is left out, so a dense
image shows the confident scores rather than a blot of digits.

The legend (colour, name, count) sits in a strip *below* the image so it never hides cells. Images whose
longer side is under :data:`MIN_OVERLAY_SIDE` pixels are enlarged by an integer factor (nearest neighbour)
so a 33 x 35 image stays legible, and a side still under :data:`MIN_OVERLAY_SHORT_SIDE` pixels (a 257 x 1
image) is stretched alone by an integer factor, so each pixel is drawn as a rectangle rather than lost in a
1 pixel wide strip.

Memory and time: each mask is decoded straight from its run lengths into its own tight box (never into an
``H x W`` buffer), so a 2500 x 1900 image with hundreds of cells costs a few image-sized buffers (the image,
one colour layer, one coverage mask, the label occupancy), never ``N x H x W``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from cellseg_deploy import CLASS_NAMES
from cellseg_deploy.io_utils import atomic_write_bytes
from cellseg_deploy.structures import Instances

_log = logging.getLogger(__name__)

CLASS_COLORS: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),  # class1: red
    (60, 180, 75),  # class2: green
    (0, 130, 200),  # class3: blue
    (245, 130, 48),  # class4: orange
)
"""RGB colour of label ``k`` is ``CLASS_COLORS[k - 1]`` (cycled for more classes)."""

KIND_COLORS: dict[str, tuple[int, int, int]] = {
    "TP": (44, 160, 44),  # green
    "FP": (0, 208, 255),  # cyan
    "FN": (214, 39, 40),  # red
}
"""RGB colour per outcome against ground truth; the same hues as the parity overlays' matched / extra /
missed, and apart from the stains' purples, pinks and browns."""

DEFAULT_OVERLAY_SCORE = 0.5
"""Instances scoring below this are not drawn (parity judges instances from the same score)."""

MATCH_IOU = 0.5
"""Least mask IoU of a TP pair (the COCO AP50 criterion)."""

MIN_OVERLAY_SIDE = 256
"""Overlays of images whose longer side is below this many pixels are enlarged by an integer factor."""

MIN_OVERLAY_SHORT_SIDE = 32
"""After that enlargement, a side shorter than this is stretched alone (integer factor) to reach it."""

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_LABEL_SCALE = 0.4
"""Font scale of the score labels (about 9 px tall)."""


def class_color(label: int) -> tuple[int, int, int]:
    """RGB colour of a 1-based label."""
    return CLASS_COLORS[(int(label) - 1) % len(CLASS_COLORS)]


def overlay_scale(height: int, width: int) -> tuple[int, int]:
    """Integer enlargement ``(sy, sx)`` of an ``height x width`` image in its overlay (see the module docstring)."""
    scale = max(1, math.ceil(MIN_OVERLAY_SIDE / max(height, width)))
    sy = max(scale, math.ceil(MIN_OVERLAY_SHORT_SIDE / height))
    sx = max(scale, math.ceil(MIN_OVERLAY_SHORT_SIDE / width))
    return sy, sx


@dataclass(frozen=True)
class GroundTruthOutcome:
    """The outcome of every drawn prediction and every ground-truth instance of one image.

    Attributes:
        pred_tp: bool ``[N_pred]``, True where the prediction is matched (TP), False where it is an FP.
        gt_fn: bool ``[N_gt]``, True where no prediction matched the ground-truth instance (FN).
    """

    pred_tp: np.ndarray
    gt_fn: np.ndarray

    def counts(self) -> dict[str, int]:
        """``{"TP", "FP", "FN"}`` counts."""
        return {
            "TP": int(self.pred_tp.sum()),
            "FP": int((~self.pred_tp).sum()),
            "FN": int(self.gt_fn.sum()),
        }


def match_to_ground_truth(pred: Instances, gt: Instances, min_iou: float = MATCH_IOU) -> GroundTruthOutcome:
    """TP / FP / FN of ``pred`` against ``gt`` (both of one image, the same ``(H, W)``).

    The project's one-to-one same-class matcher (:func:`cellseg_deploy.matching.match_instances`, the one
    parity uses: optimal assignment, a pair needs mask IoU ``>= min_iou``) with the ground truth as the
    reference side; every instance of ``pred`` takes part, so filter by score first.
    """
    from cellseg_deploy.matching import match_instances

    gt_partner, pred_partner, _ = match_instances(gt, pred, min_iou)
    return GroundTruthOutcome(pred_tp=pred_partner >= 0, gt_fn=gt_partner < 0)


def gt_instances(annotations: Sequence[Mapping[str, Any]], image_size: tuple[int, int]) -> Instances:
    """One image's COCO ground-truth annotations as :class:`Instances` (score 1; crowd regions left out).

    Args:
        annotations: COCO annotations with ``category_id``, ``bbox`` ``[x, y, w, h]`` and ``segmentation``
            (compressed or uncompressed RLE, or polygons).
        image_size: ``(H, W)`` of the image.
    """
    from pycocotools import mask as mask_utils

    h, w = int(image_size[0]), int(image_size[1])
    boxes, labels, rles = [], [], []
    for ann in annotations:
        if ann.get("iscrowd"):
            continue
        seg = ann["segmentation"]
        if isinstance(seg, list):  # polygons
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
        elif isinstance(seg.get("counts"), list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(seg, h, w)
        else:
            rle = seg
        counts = rle["counts"]
        rles.append({"size": [h, w], "counts": counts.decode() if isinstance(counts, bytes) else counts})
        x, y, bw, bh = (float(v) for v in ann["bbox"])
        boxes.append([x, y, x + bw, y + bh])
        labels.append(int(ann["category_id"]))
    return Instances(
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        labels=np.asarray(labels, np.int64),
        scores=np.ones(len(labels), np.float32),
        rles=rles,
        image_size=(h, w),
    )


def draw_overlay(
    image: np.ndarray,
    inst: Instances,
    *,
    alpha: float = 0.4,
    class_names: Sequence[str] = CLASS_NAMES,
    score_thresh: float = DEFAULT_OVERLAY_SCORE,
    gt: Instances | None = None,
    min_iou: float = MATCH_IOU,
    show_scores: bool = True,
) -> np.ndarray:
    """Draw the instances of ``inst`` scoring ``>= score_thresh`` over ``image``.

    Args:
        image: RGB uint8 ``[H, W, 3]`` (the image the instances were predicted on).
        inst: instances with RLE masks of size ``(H, W)``.
        alpha: opacity of the fill, in [0, 1].
        class_names: legend names; label ``k`` is ``class_names[k - 1]``.
        score_thresh: instances scoring below this are not drawn (nor matched to ``gt``).
        gt: the image's ground truth (:func:`gt_instances`): colour by TP / FP / FN instead of by class.
        min_iou: least mask IoU of a TP pair.
        show_scores: write each drawn prediction's score beside it where legible.

    Returns:
        RGB uint8 ``[sy*H + legend, max(sx*W, legend width), 3]`` where ``(sy, sx)`` is
        :func:`overlay_scale` (``1, 1`` for most images).
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"draw_overlay expects RGB uint8 [H, W, 3], got {image.dtype} {list(image.shape)}")
    height, width = image.shape[:2]
    if tuple(inst.image_size) != (height, width):
        raise ValueError(f"instances are for a {inst.image_size} image, the image is {(height, width)}")
    if gt is not None and tuple(gt.image_size) != (height, width):
        raise ValueError(f"ground truth is for a {gt.image_size} image, the image is {(height, width)}")
    sy, sx = overlay_scale(height, width)
    shown = inst.select(np.asarray(inst.scores) >= score_thresh)
    hidden = len(inst) - len(shown)

    # What to draw, in order (later instances paint on top): (rle, colour, score or None, box).
    items: list[tuple[dict[str, Any], tuple[int, int, int], float | None, np.ndarray]] = []
    entries: list[tuple[tuple[int, int, int] | None, str]]  # the legend's lines
    if gt is None:
        for label, rle, score, box in zip(shown.labels, shown.rles, shown.scores, shown.boxes, strict=True):
            items.append((rle, class_color(int(label)), float(score), box))
        counts = np.bincount(shown.labels.astype(np.int64), minlength=len(class_names) + 1)
        entries = [
            (class_color(k), f"{name} ({int(counts[k]) if k < len(counts) else 0})")
            for k, name in enumerate(class_names, start=1)
        ]
    else:
        outcome = match_to_ground_truth(shown, gt, min_iou)
        for i in np.flatnonzero(outcome.gt_fn):
            items.append((gt.rles[i], KIND_COLORS["FN"], None, gt.boxes[i]))
        for i in np.argsort(outcome.pred_tp, kind="stable"):  # FP first, TP on top
            kind = "TP" if outcome.pred_tp[i] else "FP"
            items.append((shown.rles[i], KIND_COLORS[kind], float(shown.scores[i]), shown.boxes[i]))
        n = outcome.counts()
        entries = [
            (KIND_COLORS["TP"], f"TP: prediction matching a GT cell ({n['TP']})"),
            (KIND_COLORS["FP"], f"FP: prediction matching none ({n['FP']})"),
            (KIND_COLORS["FN"], f"FN: GT cell no prediction matches ({n['FN']})"),
            (None, f"match: same class, mask IoU >= {min_iou:g}, one-to-one"),
        ]
    entries.append((None, f"drawn: score >= {score_thresh:g} ({hidden} below not drawn)"))

    # Fill: one colour layer and a coverage mask at the original size.
    layer = np.zeros_like(image)
    covered = np.zeros((height, width), bool)
    outlines: list[tuple[tuple[int, int, int], list[np.ndarray]]] = []
    for rle, color, _score, _box in items:
        crop, x, y = _decode_tight(rle)
        if crop.size == 0:
            continue
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
    if show_scores:
        _draw_scores(out, [(s, b) for _r, _c, s, b in items if s is not None], (sy, sx))

    legend = _legend(entries, out.shape[1])
    canvas_w = max(out.shape[1], legend.shape[1])
    canvas = np.full((out.shape[0] + legend.shape[0], canvas_w, 3), 255, np.uint8)
    canvas[: out.shape[0], : out.shape[1]] = out
    canvas[out.shape[0] :, : legend.shape[1]] = legend
    return canvas


def _draw_scores(out: np.ndarray, scored: list[tuple[float, np.ndarray]], scale: tuple[int, int]) -> None:
    """Write ``"0.93"`` on a white tag at each box's top-left corner (just above the box, else just inside), highest score
    first, leaving out a label that would overlap an earlier one or leave the image (``out`` is drawn on)."""
    sy, sx = scale
    taken = np.zeros(out.shape[:2], bool)
    for score, box in sorted(scored, key=lambda t: -t[0]):
        text = f"{score:.2f}"
        (tw, th), base = cv2.getTextSize(text, _FONT, _LABEL_SCALE, 1)
        x0 = math.floor(float(box[0]) * sx)
        top = math.floor(float(box[1]) * sy)
        y1 = top - 1  # the label's bottom row: above the box ...
        if y1 - th - base - 1 < 0:
            y1 = top + th + base + 1  # ... or inside it at the image's top edge
        y0, x1 = y1 - th - base - 1, x0 + tw + 2
        if x0 < 0 or y0 < 0 or x1 > out.shape[1] or y1 > out.shape[0] or taken[y0:y1, x0:x1].any():
            continue
        taken[y0:y1, x0:x1] = True
        out[y0:y1, x0:x1] = 255  # a white tag: small text stays legible on any stain
        cv2.putText(out, text, (x0 + 1, y1 - base), _FONT, _LABEL_SCALE, (0, 0, 0), 1, cv2.LINE_AA)


def write_overlay(path: str | Path, image: np.ndarray, inst: Instances, **kwargs: Any) -> Path:
    """:func:`draw_overlay` written as a PNG (atomically)."""
    rgb = draw_overlay(image, inst, **kwargs)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"could not encode the overlay for {path} as PNG")
    return atomic_write_bytes(path, buf.tobytes())


# ----------------------------------------------------------------------------------------------------------
# Ground truth for the overlays of eval and predict
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OverlayTruth:
    """Ground truth by image file name, for ``predict --overlays`` on a folder that has it.

    Attributes:
        source: the ground-truth file.
        by_name: file name -> ``((H, W), annotations)``.
    """

    source: Path
    by_name: dict[str, tuple[tuple[int, int], list[dict[str, Any]]]]

    def instances_for(self, file_name: str, size: tuple[int, ...]) -> Instances | None:
        """The ground truth of one image, ``None`` when the file lists no image of that name and size."""
        found = self.by_name.get(file_name)
        if found is None or tuple(found[0]) != tuple(int(v) for v in size[:2]):
            return None
        return gt_instances(found[1], found[0])


def ground_truth_beside(images_dir: str | Path) -> OverlayTruth | None:
    """``test_ground_truth.json`` beside ``images_dir`` (the synthetic sets' ``test_release/``), by file name.

    ``None`` when there is none, or when it cannot be read (logged: the overlays are then coloured by class,
    and the predictions are unaffected).
    """
    from cellseg_deploy.data.layout import TEST_GT_NAME

    path = Path(images_dir).parent / TEST_GT_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        anns: dict[int, list[dict[str, Any]]] = {}
        for ann in data["annotations"]:
            anns.setdefault(int(ann["image_id"]), []).append(ann)
        by_name = {
            str(Path(e["file_name"]).name): (
                (int(e["height"]), int(e["width"])),
                anns.get(int(e["id"]), []),
            )
            for e in data["images"]
        }
    except (OSError, ValueError, KeyError, TypeError) as exc:
        _log.warning("overlays without ground truth: cannot read %s (%s)", path, exc)
        return None
    return OverlayTruth(path, by_name)


def write_eval_overlays(
    gt: Mapping[str, Any],
    predictions: Mapping[int, Instances],
    image_paths: Mapping[int, Path],
    out_dir: str | Path,
    *,
    score_thresh: float = DEFAULT_OVERLAY_SCORE,
    max_pixels: int | None = None,
) -> list[Path]:
    """One TP / FP / FN overlay per predicted image of an evaluated split (``eval --overlays``).

    The images are read again (the evaluation keeps instances, not pixels; no model runs here). Named
    after the sample (``train/<sample>/image.tif`` -> ``<sample>.png``) or the test file's stem.

    Args:
        gt: the split's COCO ground truth (:func:`~cellseg_deploy.evaluation.predict.run_dataset`).
        predictions: ``{image_id: Instances}`` of the same run.
        image_paths: ``{image_id: image file}``
            (:func:`~cellseg_deploy.evaluation.predict.image_path_of` of each entry).
        out_dir: folder for the PNGs (created).
        score_thresh: predictions scoring below this are not drawn.
        max_pixels: the image-size limit of the run.

    Returns:
        The written PNGs, in the ground truth's image order.
    """
    from cellseg_deploy.data.io import read_image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    anns: dict[int, list[dict[str, Any]]] = {}
    for ann in gt["annotations"]:
        anns.setdefault(int(ann["image_id"]), []).append(ann)
    written: list[Path] = []
    for entry in gt["images"]:
        image_id = int(entry["id"])
        if image_id not in predictions:
            continue
        image = read_image(image_paths[image_id], max_pixels=max_pixels)
        truth = gt_instances(anns.get(image_id, []), image.shape[:2])
        name = str(entry.get("sample_id") or Path(str(entry.get("file_name", image_id))).stem)
        written.append(
            write_overlay(
                out / f"{name}.png", image, predictions[image_id], score_thresh=score_thresh, gt=truth
            )
        )
    return written


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


def _legend(entries: Sequence[tuple[tuple[int, int, int] | None, str]], min_width: int) -> np.ndarray:
    """A white strip with one ``[colour] text`` line per entry (no swatch for colour ``None``), RGB uint8
    ``[h, w, 3]``."""
    font_scale, thick, pad, swatch = 0.45, 1, 6, 12
    sized = []
    for color, text in entries:
        (tw, th), _ = cv2.getTextSize(text, _FONT, font_scale, thick)
        sized.append((color, text, tw, th))
    line_h = max(swatch, *(e[3] for e in sized)) + pad
    width = max(min_width, max(pad + swatch + 4 + e[2] + pad for e in sized))
    strip = np.full((pad + line_h * len(sized), width, 3), 255, np.uint8)
    for row, (color, text, _tw, th) in enumerate(sized):
        top = pad + row * line_h
        if color is not None:
            cv2.rectangle(strip, (pad, top), (pad + swatch, top + swatch), color, thickness=-1)
        cv2.putText(
            strip,
            text,
            (pad + swatch + 4, top + swatch - max(0, (swatch - th) // 2)),
            _FONT,
            font_scale,
            (0, 0, 0) if color is not None else (90, 90, 90),
            thick,
            cv2.LINE_AA,
        )
    return strip
