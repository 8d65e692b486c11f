"""Pictures of parity: where a candidate backend finds other cells than the reference.

For one image, every instance that parity judges (scoring ``>= score_thresh`` on its side, or matched to one
that does) gets one status, from the same matcher as :func:`~cellseg_deploy.evaluation.parity.compare_instances`
(:func:`cellseg_deploy.matching.match_instances`: same-class optimal assignment on ``(1 - mask IoU) + (1 - box
IoU)``, a pair needs ``mask IoU >= min_iou``):

- ``matched``: a pair with mask IoU ``>= strong_iou`` (drawn once, the reference's outline, green);
- ``low_iou``: a pair below ``strong_iou`` (both outlines, yellow: the reference solid, the candidate dashed);
- ``missed``: a reference instance without a partner (red);
- ``extra``: a candidate instance without a partner (cyan).

:func:`classify_instances` computes the statuses (its counts equal ``compare_instances``'s matched / missed /
extra), :func:`draw_parity_overlay` draws one image, :func:`write_parity_overlays` redraws the images of a
finished :class:`~cellseg_deploy.evaluation.parity.ParityReport` where the two sides agree least (it runs both
models again on just those images: the report keeps counts, not instances).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cellseg_deploy.data.layout import DEFAULT_VAL_FRACTION
from cellseg_deploy.matching import DEFAULT_MIN_IOU, match_instances
from cellseg_deploy.structures import Instances

STATUS_COLOURS: dict[str, str] = {
    "matched": "#2ca02c",
    "low_iou": "#ffd400",
    "missed": "#d62728",
    "extra": "#00d0ff",
}
"""Outline colour per status: green, yellow, red and cyan stand apart from the stained cells' purples, pinks
and browns; low-IoU candidates are also dashed."""

MAX_OVERLAY_IMAGES = 8
"""Images drawn by :func:`write_parity_overlays` (those with the lowest agreement first)."""


@dataclass(frozen=True)
class InstanceStatus:
    """Status per instance of one image (``""``: not judged, below the score threshold and unmatched to a
    judged instance); ``ref_iou`` / ``cand_iou``: the pair's mask IoU (``nan`` without a partner)."""

    ref: np.ndarray  # str [N_ref]
    cand: np.ndarray  # str [N_cand]
    ref_partner: np.ndarray  # int64 [N_ref], -1 without partner
    ref_iou: np.ndarray  # float64 [N_ref]

    def counts(self) -> dict[str, int]:
        """``{"matched", "low_iou", "missed", "extra"}`` counts (pairs counted once)."""
        return {
            "matched": int((self.ref == "matched").sum()),
            "low_iou": int((self.ref == "low_iou").sum()),
            "missed": int((self.ref == "missed").sum()),
            "extra": int((self.cand == "extra").sum()),
        }


def classify_instances(
    ref: Instances,
    cand: Instances,
    *,
    score_thresh: float,
    min_iou: float = DEFAULT_MIN_IOU,
    strong_iou: float = 0.95,
) -> InstanceStatus:
    """The status of every instance of one image (see the module docstring), from parity's own matcher
    (:func:`cellseg_deploy.matching.match_instances`), so the picture and the report agree."""
    ref_partner, cand_partner, ref_iou = match_instances(ref, cand, min_iou)
    ref_hi = ref.scores >= score_thresh
    cand_hi = cand.scores >= score_thresh
    ref_status = np.full(len(ref), "", dtype=object)
    cand_status = np.full(len(cand), "", dtype=object)
    for r, c in enumerate(ref_partner):
        if c >= 0 and (ref_hi[r] or cand_hi[c]):
            status = "matched" if ref_iou[r] >= strong_iou else "low_iou"
            ref_status[r] = cand_status[c] = status
        elif c < 0 and ref_hi[r]:
            ref_status[r] = "missed"
    cand_status[(cand_partner < 0) & cand_hi] = "extra"
    return InstanceStatus(ref_status, cand_status, ref_partner, ref_iou)


def _outlines(rle: dict[str, Any]) -> list[np.ndarray]:
    """Outer contours of a mask, each float ``[K, 2]`` of ``x, y`` pixel centres."""
    import cv2

    from cellseg_deploy.data.rle import decode_rle

    mask = decode_rle(rle).astype(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [c.reshape(-1, 2).astype(np.float64) for c in contours if len(c) >= 2]


def draw_parity_overlay(
    image: np.ndarray,
    ref: Instances,
    cand: Instances,
    status: InstanceStatus,
    path: Path,
    *,
    title: str = "",
    max_side_in: float = 6.0,
) -> Path:
    """Draw ``image`` (RGB uint8 ``[H, W, 3]``) with every judged instance outlined by status, and a legend
    with the counts; written to ``path`` as PNG (small: at most ``max_side_in`` inches at 100 dpi)."""
    from matplotlib.lines import Line2D

    from cellseg_deploy.plots import new_figure, save_png

    h, w = image.shape[:2]
    scale = max_side_in / max(h, w)
    img_w, img_h, side = w * scale, h * scale, 2.6  # inches: the image, and the legend column beside it
    fig = new_figure(img_w + side, max(img_h, 1.6), dpi=100)
    ax = fig.add_axes((0.0, 0.0, img_w / (img_w + side), img_h / max(img_h, 1.6)))
    ax.imshow(image, interpolation="nearest")
    # Pairs are drawn from the reference side (one outline), low-IoU pairs with both; unpaired from their own.
    for i, st in enumerate(status.ref):
        if st:
            for contour in _outlines(ref.rles[i]):
                ax.plot(*_closed(contour), color=STATUS_COLOURS[st], linewidth=1.3)
    for j, st in enumerate(status.cand):
        if st in ("low_iou", "extra"):
            for contour in _outlines(cand.rles[j]):
                ax.plot(
                    *_closed(contour),
                    color=STATUS_COLOURS[st],
                    linewidth=1.3,
                    linestyle=(0, (2, 1.5)) if st == "low_iou" else "-",
                )
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_axis_off()
    counts = status.counts()
    labels = {
        "matched": "matched",
        "low_iou": "low mask IoU\n(ref solid, cand dashed)",
        "missed": "missed (ref only)",
        "extra": "extra (cand only)",
    }
    handles = [
        Line2D([], [], color=STATUS_COLOURS[k], linewidth=2.5, label=f"{labels[k]}: {counts[k]}")
        for k in labels
    ]
    fig.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(img_w / (img_w + side) + 0.01, 0.98),
        fontsize=8,
        frameon=False,
        title=title or None,
        title_fontsize=8,
        alignment="left",
    )
    return save_png(fig, path, tight=False)


def _closed(contour: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pts = np.vstack([contour, contour[:1]])
    return pts[:, 0], pts[:, 1]


def worst_images(report: Any, limit: int = MAX_OVERLAY_IMAGES) -> list[int]:
    """Image ids of ``report`` ordered by disagreement (missed + extra + low-IoU pairs, then the lowest
    agreement), at most ``limit``; images that agree perfectly come last."""

    def key(im: Any) -> tuple[float, float]:
        s = im.summary()
        weak = int(im.matched - im.strong_matched) if hasattr(im, "strong_matched") else 0
        bad = float(s["missed"] + s["extra"] + max(weak, 0))
        return (-bad, s["agreement"] if s["agreement"] is not None else 1.0)

    return [int(im.image_id) for im in sorted(report.images, key=key)[:limit]]


def write_parity_overlays(
    report: Any,
    reference_model: str | Path,
    candidate_model: str | Path,
    candidate_engine: str,
    data_root: str | Path,
    out_dir: Path,
    *,
    reference_engine: str = "torch",
    device: str = "cpu",
    candidate_device: str | None = None,
    threads: int | None = None,
    limit: int = MAX_OVERLAY_IMAGES,
) -> list[Path]:
    """Draw the ``limit`` images of a finished parity run where the two sides disagree most.

    Both models run again on those images only, with the settings of ``report`` (split, score threshold,
    IoU settings, the candidate's precision). Returns the written PNGs (``<image name>.png`` in ``out_dir``).
    """
    from cellseg_deploy.data.coco import dataset_to_coco
    from cellseg_deploy.data.io import read_image
    from cellseg_deploy.evaluation.parity.run import runner_pair
    from cellseg_deploy.evaluation.predict import image_path_of
    from cellseg_deploy.postprocess import PostprocessConfig

    st = report.settings
    ids = worst_images(report, limit)
    gt = dataset_to_coco(
        Path(data_root),
        st.get("split", "val"),
        val_fraction=st.get("val_fraction", DEFAULT_VAL_FRACTION),
        seed=st.get("seed", 0),
    )
    entries = {int(e["id"]): e for e in gt["images"]}
    names = {int(im.image_id): im.name or str(im.image_id) for im in report.images}
    post = PostprocessConfig(score_thresh=0.0, max_dets=None)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    precision = (report.candidate or {}).get("precision") or "fp32"
    with runner_pair(
        reference_engine,
        reference_model,
        candidate_engine,
        candidate_model,
        device=device,
        candidate_device=candidate_device,
        candidate_precision=precision,
        threads=threads,
    ) as (ref_runner, cand_runner):
        for image_id in ids:
            image = read_image(image_path_of(entries[image_id], Path(data_root)))
            ref = ref_runner.predict(image, post)
            cand = cand_runner.predict(image, post)
            status = classify_instances(
                ref,
                cand,
                score_thresh=float(st["score_thresh"]),
                min_iou=float(st["min_iou"]),
                strong_iou=float(st["strong_iou"]),
            )
            title = (
                f"{names[image_id]}\n{candidate_engine} {precision} vs {reference_engine}\n"
                f"score >= {st['score_thresh']}; strong IoU {st['strong_iou']}"
            )
            written.append(
                draw_parity_overlay(image, ref, cand, status, out_dir / f"{names[image_id]}.png", title=title)
            )
    return written
