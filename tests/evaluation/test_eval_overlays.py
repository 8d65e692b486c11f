"""Overlays: run-length decoding into the tight box, colours by class, legend, tiny and large images."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import cv2
import numpy as np
from eval_synth import random_instances
from pycocotools import mask as mask_utils

from cellseg_deploy.data.rle import encode_crop, encode_mask
from cellseg_deploy.evaluation.overlays import (
    _decode_tight,
    class_color,
    draw_overlay,
    rle_counts,
    write_overlay,
)
from cellseg_deploy.structures import Instances


def test_rle_counts_matches_pycocotools() -> None:
    runs = [0, 5, 4_750_000 - 12, 7]  # leading foreground, a run longer than 2**22
    counts = mask_utils.frPyObjects({"size": [1900, 2500], "counts": runs}, 1900, 2500)["counts"]
    assert rle_counts(counts) == runs
    assert rle_counts(counts.decode()) == runs


def test_decode_tight_equals_full_decode() -> None:
    rng = np.random.default_rng(0)
    for t in range(200):
        h, w = (int(v) for v in rng.integers(1, 30, 2))
        mask = rng.random((h, w)) < rng.random() * 0.3
        if t % 7 == 0:
            mask[:] = t % 2 == 0  # all or nothing
        crop, x, y = _decode_tight(encode_mask(mask))
        full = np.zeros((h, w), bool)
        full[y : y + crop.shape[0], x : x + crop.shape[1]] = crop > 0
        assert (full == mask).all(), t
        if mask.any():
            ys, xs = np.nonzero(mask)
            assert (x, y, crop.shape[1], crop.shape[0]) == (
                xs.min(),
                ys.min(),
                np.ptp(xs) + 1,
                np.ptp(ys) + 1,
            )


def test_overlay_colours_pixels_by_class(tmp_path: Path) -> None:
    h, w = 60, 80
    masks = np.zeros((2, h, w), bool)
    masks[0, 5:20, 5:25] = True
    masks[1, 30:50, 40:70] = True
    inst = Instances(
        boxes=np.array([[5, 5, 25, 20], [40, 30, 70, 50]], np.float32),
        labels=np.array([1, 3], np.int64),
        scores=np.array([0.9, 0.8], np.float32),
        rles=[encode_mask(m) for m in masks],
        image_size=(h, w),
    )
    image = np.full((h, w, 3), 100, np.uint8)
    out = draw_overlay(image, inst, alpha=0.5)
    scale = out.shape[1] // w  # small images are enlarged by an integer factor
    assert scale >= 2 and out.shape[0] > h * scale, "legend strip below the image"
    inside1 = out[12 * scale, 15 * scale].astype(int)
    inside3 = out[40 * scale, 55 * scale].astype(int)
    outside = out[55 * scale, 5 * scale].astype(int)
    assert np.abs(inside1 - (np.array(class_color(1)) + 100) / 2).max() <= 1
    assert np.abs(inside3 - (np.array(class_color(3)) + 100) / 2).max() <= 1
    assert (outside == 100).all()
    path = write_overlay(tmp_path / "o.png", image, inst, alpha=0.5)
    back = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    assert (back == out).all()


def test_overlay_of_tiny_and_empty() -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (33, 35, 3), dtype=np.uint8)
    out = draw_overlay(image, random_instances(rng, (33, 35), 3))
    assert out.dtype == np.uint8 and out.shape[0] > 33
    empty = Instances(
        np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32), [], (33, 35)
    )
    assert draw_overlay(image, empty).shape == out.shape


def test_large_dense_overlay_never_builds_n_by_h_by_w() -> None:
    """2500 x 1900 with 400 cells: peak traced memory stays at a few image-sized buffers (N x H x W: 1.9 GB)."""
    rng = np.random.default_rng(2)
    h, w, n = 1900, 2500, 400
    rles, boxes = [], []
    for _ in range(n):
        r = rng.uniform(5, 12)
        cy, cx = rng.uniform(r, h - r - 1), rng.uniform(r, w - r - 1)
        y0, x0, s = int(cy - r), int(cx - r), int(2 * r) + 2
        yy, xx = np.mgrid[:s, :s]
        rles.append(encode_crop(((yy + y0 - cy) ** 2 + (xx + x0 - cx) ** 2) <= r * r, x0, y0, (h, w)))
        boxes.append([x0, y0, x0 + s, y0 + s])
    inst = Instances(
        np.array(boxes, np.float32), rng.integers(1, 5, n), rng.random(n).astype(np.float32), rles, (h, w)
    )
    image = np.full((h, w, 3), 90, np.uint8)
    tracemalloc.start()
    try:
        out = draw_overlay(image, inst)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.shape[1] == w
    assert peak < 8 * h * w * 3, f"peak {peak / 1e6:.0f} MB"


def test_thin_images_are_stretched_along_their_short_side() -> None:
    from cellseg_deploy.evaluation.overlays import MIN_OVERLAY_SHORT_SIDE, overlay_scale

    assert overlay_scale(257, 1) == (1, MIN_OVERLAY_SHORT_SIDE)
    assert overlay_scale(1, 600) == (MIN_OVERLAY_SHORT_SIDE, 1)
    assert overlay_scale(33, 35) == (8, 8)  # small images: one factor for both sides, as before
    assert overlay_scale(500, 400) == (1, 1)
    image = np.zeros((257, 1, 3), np.uint8)
    inst = Instances(
        boxes=np.zeros((0, 4), np.float32),
        labels=np.zeros((0,), np.int64),
        scores=np.zeros((0,), np.float32),
        rles=[],
        image_size=(257, 1),
    )
    out = draw_overlay(image, inst)
    assert out.shape[0] > 257 and np.all(out[:257, :MIN_OVERLAY_SHORT_SIDE] == 0)


# ----------------------------------------------------------------------------------------------------------
# Score threshold, scores, TP / FP / FN against ground truth
# ----------------------------------------------------------------------------------------------------------
def _rect(size: tuple[int, int], y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros(size, bool)
    m[y0:y1, x0:x1] = True
    return m


def _instances(masks: list[np.ndarray], labels: list[int], scores: list[float]) -> Instances:
    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return Instances(
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        labels=np.asarray(labels, np.int64),
        scores=np.asarray(scores, np.float32),
        rles=[encode_mask(m) for m in masks],
        image_size=masks[0].shape,
    )


SIZE = (60, 80)
GT_A = _rect(SIZE, 5, 20, 5, 25)  # class 1, found exactly: TP
GT_B = _rect(SIZE, 30, 50, 40, 70)  # class 2, found shifted by 2 px (IoU 0.82): TP
GT_C = _rect(SIZE, 40, 55, 5, 20)  # class 1, found only below the score threshold: FN
PRED_FP = _rect(SIZE, 24, 34, 28, 36)  # class 1, where no cell is: FP
PRED_LOW = _rect(SIZE, 2, 58, 72, 79)  # a box-shaped low-score mask: not drawn


def _case() -> tuple[np.ndarray, Instances, Instances]:
    gt = _instances([GT_A, GT_B, GT_C], [1, 2, 1], [1.0, 1.0, 1.0])
    pred = _instances(
        [GT_A, _rect(SIZE, 32, 52, 40, 70), PRED_FP, GT_C, PRED_LOW],
        [1, 2, 1, 1, 3],
        [0.9, 0.7, 0.8, 0.3, 0.1],
    )
    return np.full((*SIZE, 3), 100, np.uint8), pred, gt


def _blend(color: tuple[int, int, int], base: int = 100) -> np.ndarray:
    return (np.asarray(color) + base) / 2  # alpha 0.5


def test_tp_fp_fn_overlay_pixels_have_the_kind_colours() -> None:
    from cellseg_deploy.evaluation.overlays import KIND_COLORS, overlay_scale

    image, pred, gt = _case()
    out = draw_overlay(image, pred, gt=gt, alpha=0.5, show_scores=False)
    s = overlay_scale(*SIZE)[0]

    def px(y: int, x: int) -> np.ndarray:
        return out[y * s + s // 2, x * s + s // 2].astype(int)

    assert np.abs(px(12, 15) - _blend(KIND_COLORS["TP"])).max() <= 1  # A
    assert np.abs(px(45, 55) - _blend(KIND_COLORS["TP"])).max() <= 1  # B (the prediction's pixels)
    assert np.abs(px(29, 32) - _blend(KIND_COLORS["FP"])).max() <= 1  # the prediction where no cell is
    assert np.abs(px(47, 12) - _blend(KIND_COLORS["FN"])).max() <= 1  # C: its score-0.3 find is not drawn
    assert (px(30, 75) == 100).all(), "the low-score box-shaped mask is not drawn"
    assert (px(57, 35) == 100).all()
    legend = out[SIZE[0] * s :]
    for color in KIND_COLORS.values():
        assert (legend == np.asarray(color)).all(axis=2).sum() >= 100, "a legend swatch per kind"
    assert len({tuple(c) for c in KIND_COLORS.values()}) == 3


def test_the_counts_follow_the_score_threshold_and_the_class() -> None:
    from cellseg_deploy.evaluation.overlays import match_to_ground_truth

    _image, pred, gt = _case()
    shown = pred.select(pred.scores >= 0.5)
    assert match_to_ground_truth(shown, gt).counts() == {"TP": 2, "FP": 1, "FN": 1}
    shown = pred.select(pred.scores >= 0.2)  # C's find now counts; the 0.1 box is still out
    assert match_to_ground_truth(shown, gt).counts() == {"TP": 3, "FP": 1, "FN": 0}
    relabelled = _instances([GT_A], [2], [0.9])  # right place, wrong class: an FP and an FN
    assert match_to_ground_truth(relabelled, gt).counts() == {"TP": 0, "FP": 1, "FN": 3}


def test_the_threshold_removes_low_score_instances_from_the_picture() -> None:
    image, pred, _gt = _case()
    s = draw_overlay(image, pred).shape[1] // SIZE[1]
    at = (30 * s + s // 2, 75 * s + s // 2)  # inside the score-0.1 box only
    assert (draw_overlay(image, pred, show_scores=False)[at] == 100).all()
    low = draw_overlay(image, pred, score_thresh=0.05, alpha=0.5, show_scores=False)
    assert np.abs(low[at].astype(int) - _blend(class_color(3))).max() <= 1


def test_scores_are_written_beside_the_instances() -> None:
    image, pred, gt = _case()
    with_scores = draw_overlay(image, pred, gt=gt)
    without = draw_overlay(image, pred, gt=gt, show_scores=False)
    s = without.shape[1] // SIZE[1]
    # the label of A (score 0.9) sits just above its box's top-left corner (x 5, y 5 in image pixels)
    band = (slice(5 * s - 12, 5 * s), slice(5 * s, 5 * s + 24))
    assert (without[band] == 100).all()
    assert (with_scores[band].max(axis=2) < 60).sum() > 10, "dark text pixels"
    assert (with_scores[band] == 255).all(axis=2).sum() > 10, "on its white tag"


def test_crowded_score_labels_are_left_out_rather_than_overlapped() -> None:
    image = np.full((300, 300, 3), 100, np.uint8)
    masks = [_rect((300, 300), 100, 110, 100 + i, 110 + i) for i in range(8)]  # 8 boxes 1 px apart
    inst = _instances(masks, [1] * 8, [0.9 - 0.01 * i for i in range(8)])
    out = draw_overlay(image, inst, alpha=0.0)
    band = out[85:100, 95:140]
    dark_cols = np.flatnonzero((band.max(axis=2) < 60).any(axis=0))
    assert dark_cols.size and np.ptp(dark_cols) < 26, "one label (the best score), not eight piled up"


def test_gt_instances_from_coco_annotations() -> None:
    from eval_synth import gt_dict

    from cellseg_deploy.evaluation.overlays import gt_instances

    _image, _pred, gt = _case()
    coco = gt_dict({1: gt})
    back = gt_instances(coco["annotations"], SIZE)
    assert back.labels.tolist() == [1, 2, 1] and (back.scores == 1).all()
    assert np.allclose(back.boxes, gt.boxes)
    assert (back.masks() == gt.masks()).all()
    polygon = {**coco["annotations"][0], "segmentation": [[5, 5, 24, 5, 24, 19, 5, 19]]}
    assert gt_instances([polygon], SIZE).masks()[0][12, 15]


def test_eval_overlays_read_the_split_and_colour_against_it(tmp_path: Path) -> None:
    """``write_eval_overlays`` on a real layout: a TIFF image, its ground truth, predictions."""
    import tifffile

    from cellseg_deploy.evaluation.overlays import KIND_COLORS, write_eval_overlays

    image, pred, gt = _case()
    (tmp_path / "train" / "s1").mkdir(parents=True)
    tifffile.imwrite(tmp_path / "train" / "s1" / "image.tif", image)
    from eval_synth import gt_dict

    coco = gt_dict({7: gt})
    coco["images"][0].update(sample_id="s1", file_name="s1/image.tif")
    paths = write_eval_overlays(
        coco, {7: pred}, {7: tmp_path / "train" / "s1" / "image.tif"}, tmp_path / "ov", score_thresh=0.5
    )
    assert [p.name for p in paths] == ["s1.png"]
    back = cv2.cvtColor(cv2.imread(str(paths[0])), cv2.COLOR_BGR2RGB)
    assert (back == draw_overlay(image, pred, gt=gt_instances_of(coco))).all()
    assert (back == np.asarray(KIND_COLORS["FN"])).all(axis=2).any()


def gt_instances_of(coco: dict) -> Instances:
    from cellseg_deploy.evaluation.overlays import gt_instances

    return gt_instances(coco["annotations"], SIZE)


def _has_colour(png: Path, color: tuple[int, int, int]) -> bool:
    rgb = cv2.cvtColor(cv2.imread(str(png)), cv2.COLOR_BGR2RGB)
    return bool((rgb == np.asarray(color)).all(axis=2).any())


def test_eval_and_predict_cli_write_tp_fp_fn_overlays(
    random_tiny_checkpoint: Path, tmp_path: Path, capsys
) -> None:
    """``eval --overlays`` and ``predict --overlays`` on a synthetic set (ground truth on both sides): one PNG
    per image, coloured against the ground truth, the threshold an option."""
    from cellseg_deploy.cli.main import main
    from cellseg_deploy.data.synth import SynthConfig, make_synthetic_dataset
    from cellseg_deploy.evaluation.overlays import KIND_COLORS

    data = tmp_path / "data"
    make_synthetic_dataset(data, SynthConfig(n_train=3, n_test=1, min_size=64, max_size=96), progress=False)
    code = main(
        [
            "eval",
            str(random_tiny_checkpoint),
            "--data",
            str(data),
            "--split",
            "all",
            "--no-progress",
            "--overlays",
            str(tmp_path / "ev"),
            "--overlay-score",
            "0.9",
        ]
    )
    assert code == 0
    pngs = sorted((tmp_path / "ev").glob("*.png"))
    assert len(pngs) == 3, "one per image of the split"
    assert all(_has_colour(p, KIND_COLORS["FN"]) for p in pngs), "an untrained model misses the cells"
    assert "overlays in" in capsys.readouterr().out
    code = main(
        [
            "predict",
            str(random_tiny_checkpoint),
            str(data / "test_release"),
            "--out",
            str(tmp_path / "s.zip"),
            "--overlays",
            str(tmp_path / "pr"),
            "--overlay-score",
            "0",
            "--no-progress",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "TP/FP/FN against" in out and "test_ground_truth.json" in out
    (png,) = (tmp_path / "pr").glob("*.png")
    assert _has_colour(png, KIND_COLORS["FP"]), "at score 0 the random detections are drawn, unmatched"
