"""eval and predict end to end with a real (random-weight) checkpoint on real TIFF files.

The dataset is written here in the real layout (RGBA LZW ``image.tif``, float64 ``classK.tif`` with
non-contiguous instance ids, a ``test_release/`` folder with its id map and COCO ground truth), holding a
33 x 35 image and a dense 2500 x 1900 image.
"""

from __future__ import annotations

import contextlib
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import tifffile
from pycocotools.coco import COCO

from cellseg_deploy.backends import create_runner
from cellseg_deploy.errors import DataError, UserError
from cellseg_deploy.evaluation import (
    evaluate,
    evaluate_model,
    infer_engine,
    instances_to_results,
    predict_folder,
    read_submission,
    resolve_images,
    run_dataset,
)
from cellseg_deploy.evaluation.predict import EVAL_POSTPROCESS, model_detection_cap

SIZES = {"tiny-33x35": (33, 35, 3), "large-1900x2500": (1900, 2500, 200)}  # H, W, cells


def _write_sample(
    folder: Path, rng: np.random.Generator, h: int, w: int, n: int
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """Write ``image.tif`` (RGBA, LZW) and ``classK.tif`` (float64 ids) with ``n`` round cells."""
    folder.mkdir(parents=True)
    image = np.full((h, w, 3), 40, np.uint8)
    ids = np.zeros((4, h, w), np.float64)
    objects = []
    yy, xx = np.mgrid[:h, :w] if h * w < 10_000 else (None, None)
    for i in range(n):
        r = rng.uniform(3, 6) if h < 100 else rng.uniform(6, 14)
        cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
        y0, y1, x0, x1 = (
            int(max(cy - r - 1, 0)),
            int(min(cy + r + 2, h)),
            int(max(cx - r - 1, 0)),
            int(min(cx + r + 2, w)),
        )
        sy, sx = np.mgrid[y0:y1, x0:x1]
        disk = (sy - cy) ** 2 + (sx - cx) ** 2 <= r * r
        k = int(rng.integers(0, 4))
        inst_id = 3 * i + 7  # non-contiguous ids, > 255 for the large image
        region = ids[k, y0:y1, x0:x1]
        region[disk & (ids[:, y0:y1, x0:x1].sum(0) == 0)] = inst_id
        image[y0:y1, x0:x1][disk] = (200, 120 + 30 * k, 90)
        objects.append((k + 1, inst_id))
    rgba = np.dstack([image, np.full((h, w), 255, np.uint8)])
    tifffile.imwrite(folder / "image.tif", rgba, compression="lzw", photometric="rgb")
    for k in range(4):
        if ids[k].any():
            tifffile.imwrite(folder / f"class{k + 1}.tif", ids[k])
    del yy, xx
    return image, objects


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A dataset root (train/ and test_release/ with the same two images, tiny and large) and the COCO
    ground truth of its train/ side."""
    root = tmp_path_factory.mktemp("layout")
    rng = np.random.default_rng(0)
    for name, (h, w, n) in SIZES.items():
        _write_sample(root / "train" / name, rng, h, w, n)
    # Test side: the same images under test_release/, ids from the map, COCO ground truth of train/ relabelled.
    from cellseg_deploy.data.coco import dataset_to_coco

    gt = dataset_to_coco(root, "all", val_fraction=0.2, seed=0)
    (root / "test_release").mkdir()
    id_map, test_images = [], []
    name_of = {}
    for new_id, entry in enumerate(sorted(gt["images"], key=lambda e: e["id"]), start=1):
        from cellseg_deploy.evaluation.predict import image_path_of

        src = image_path_of(entry, root)
        file_name = f"{src.parent.name}.tif"
        (root / "test_release" / file_name).write_bytes(src.read_bytes())
        id_map.append(
            {"file_name": file_name, "id": new_id, "height": entry["height"], "width": entry["width"]}
        )
        test_images.append(
            {"id": new_id, "file_name": file_name, "height": entry["height"], "width": entry["width"]}
        )
        name_of[entry["id"]] = new_id
    anns = [{**a, "image_id": name_of[a["image_id"]]} for a in gt["annotations"]]
    (root / "test_image_name_to_ids.json").write_text(json.dumps(id_map))
    (root / "test_ground_truth.json").write_text(
        json.dumps({"images": test_images, "annotations": anns, "categories": gt["categories"]})
    )
    return root, gt


@pytest.fixture(scope="module")
def dataset(layout: tuple[Path, dict[str, Any]]) -> Path:
    return layout[0]


@pytest.fixture(scope="module")
def small_synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic set from the project's generator: 3 test images of 48-96 px with their ground truth."""
    from cellseg_deploy.data.synth import SynthConfig, make_synthetic_dataset

    root = tmp_path_factory.mktemp("synth")
    config = SynthConfig(n_train=0, n_test=3, min_size=48, max_size=96, min_cells=3, max_cells=12, seed=3)
    make_synthetic_dataset(root, config, progress=False)
    return root


@pytest.fixture(scope="module")
def runner(random_tiny_checkpoint: Path) -> Any:
    with create_runner("torch", random_tiny_checkpoint) as r:
        yield r


def test_ground_truth_of_the_dataset_scores_one(layout: tuple[Path, dict[str, Any]]) -> None:
    gt = layout[1]
    assert len(gt["annotations"]) > 180, "the large image is dense"
    results = [
        {
            "image_id": a["image_id"],
            "bbox": [float(v) for v in a["bbox"]],
            "score": 1.0,
            "category_id": a["category_id"],
            "segmentation": a["segmentation"],
        }
        for a in gt["annotations"]
    ]
    res = evaluate(gt, results, max_dets=300)
    for iou_type in ("segm", "bbox"):
        assert res.metrics[iou_type]["AP"] == 1.0 and res.metrics[iou_type]["AP50"] == 1.0


def test_eval_tiny_and_large_images(random_tiny_checkpoint: Path, dataset: Path) -> None:
    res = evaluate_model(random_tiny_checkpoint, None, dataset, "all", max_dets=300, progress=False)
    assert res.num_images == 2 and sum(res.num_gt.values()) > 180
    for iou_type in ("segm", "bbox"):
        m = res.metrics[iou_type]
        assert 0.0 <= m["AP50"] <= 1.0 and m["max_dets"] == 300
        assert m["num_detections"] == m["num_detections_evaluated"] > 0
    assert res.info["runner"]["runner"] == "torch" and res.info["model_detections_per_img"] == 100
    assert any("above the model's own cap" in n and "100" in n for n in res.notes), res.notes
    table = res.table()
    assert "maxDets=300" in table and "class1" in table and "segm" in table and "bbox" in table
    json.dumps(res.to_dict())  # JSON-able


def test_eval_on_the_test_side_uses_its_ground_truth(runner: Any, dataset: Path) -> None:
    gt, preds = run_dataset(runner, dataset, "test", post=EVAL_POSTPROCESS, progress=False)
    assert sorted(preds) == [1, 2]
    assert {(im["height"], im["width"]) for im in gt["images"]} == {(33, 35), (1900, 2500)}
    assert all(p.image_size == (im["height"], im["width"]) for im in gt["images"] for p in [preds[im["id"]]])


def test_predict_submission_loads_against_ground_truth(runner: Any, dataset: Path, tmp_path: Path) -> None:
    summary = predict_folder(
        runner,
        dataset / "test_release",
        None,
        tmp_path / "sub.zip",
        overlays_dir=tmp_path / "ov",
        progress=False,
    )
    assert summary.id_source.endswith("test_image_name_to_ids.json"), "the map beside test_release/ is found"
    assert summary.num_predicted == 2 and not summary.failed
    results = read_submission(summary.out_zip)
    assert results == json.loads(summary.results_json.read_text())
    assert len(results) == summary.num_detections > 0
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(dataset / "test_ground_truth.json"))
        coco_dt = coco_gt.loadRes(results)
    assert len(coco_dt.getAnnIds()) == len(results)
    sizes = {r["image_id"]: tuple(r["segmentation"]["size"]) for r in results}
    assert all(sizes[i] == (coco_gt.imgs[i]["height"], coco_gt.imgs[i]["width"]) for i in sizes)
    pngs = sorted(p.name for p in (tmp_path / "ov").iterdir())
    assert pngs == ["large-1900x2500.png", "tiny-33x35.png"]
    assert cv2.imread(str(tmp_path / "ov" / "large-1900x2500.png")).shape[1] == 2500


def test_plain_folder_gets_sorted_ids(runner: Any, dataset: Path, tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    src = dataset / "train" / "tiny-33x35" / "image.tif"
    rgb = tifffile.imread(src)[..., :3]
    cv2.imwrite(str(folder / "b.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    (folder / "a.tif").write_bytes(src.read_bytes())
    (folder / "notes.txt").write_text("not an image")
    entries, source = resolve_images(folder)
    assert [(e.path.name, e.image_id) for e in entries] == [("a.tif", 1), ("b.png", 2)]
    assert "sorted" in source
    summary = predict_folder(runner, folder, None, tmp_path / "out" / "s.zip", progress=False)
    assert summary.num_predicted == 2 and {r["image_id"] for r in read_submission(summary.out_zip)} <= {1, 2}


def test_id_map_mismatch_is_one_clear_line(dataset: Path, tmp_path: Path) -> None:
    folder = tmp_path / "test_release"
    folder.mkdir()
    (folder / "x.tif").write_bytes((dataset / "test_release" / "tiny-33x35.tif").read_bytes())
    id_map = dataset / "test_image_name_to_ids.json"
    with pytest.raises(DataError) as info:
        resolve_images(folder, id_map)
    msg = str(info.value)
    assert "\n" not in msg and "does not match" in msg
    assert "tiny-33x35.tif" in msg and "x.tif" in msg and "--ids" in msg
    bad_map = tmp_path / "bad.json"
    bad_map.write_text(json.dumps([{"file_name": "x.tif"}]))
    with pytest.raises(DataError, match="int 'id'"):
        resolve_images(folder, bad_map)


def test_unreadable_image_is_skipped_and_named_or_stops_with_strict(
    runner: Any, dataset: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "good.tif").write_bytes((dataset / "test_release" / "tiny-33x35.tif").read_bytes())
    (folder / "broken.tif").write_bytes(b"II*\x00 this is not a TIFF")
    summary = predict_folder(runner, folder, None, tmp_path / "s.zip", progress=False)
    assert [name for name, _ in summary.failed] == ["broken.tif"]
    assert summary.num_predicted == 1 and (tmp_path / "s.zip").is_file()
    assert "broken.tif" in summary.text()
    with pytest.raises(DataError, match=r"broken\.tif.*--strict"):
        predict_folder(runner, folder, None, tmp_path / "strict.zip", strict=True, progress=False)
    assert not (tmp_path / "strict.zip").exists()


def test_engine_inference_and_model_cap(runner: Any, tmp_path: Path) -> None:
    assert infer_engine("m.pt") == "torch" and infer_engine("m.onnx") == "onnx"
    assert infer_engine(tmp_path) == "staged-onnx" and infer_engine("stages/manifest.json") == "staged-onnx"
    assert infer_engine("m.int8.xml") == "openvino" and infer_engine("engines/engines.json") == "trt"
    (tmp_path / "engines.json").write_text("{}")
    assert infer_engine(tmp_path) == "trt"  # a folder holding an engine manifest and no stage manifest
    (tmp_path / "manifest.json").write_text("{}")
    assert infer_engine(tmp_path) == "staged-onnx"
    with pytest.raises(UserError, match="--engine"):
        infer_engine("model.bin")
    assert model_detection_cap(runner) == 100


def test_cli_eval_and_predict(
    random_tiny_checkpoint: Path,
    dataset: Path,
    small_synth: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from cellseg_deploy.cli.main import main

    out_json = tmp_path / "eval.json"
    rc = main(
        [
            "eval",
            str(random_tiny_checkpoint),
            "--data",
            str(small_synth),
            "--split",
            "test",
            "--iou",
            "segm",
            "--no-progress",
            "--json",
            str(out_json),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "maxDets=100" in out and "per image and category" in out
    data = json.loads(out_json.read_text())
    assert data["max_dets"] == 100 and set(data["metrics"]) == {"segm"}

    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.tif").write_bytes((dataset / "test_release" / "tiny-33x35.tif").read_bytes())
    (folder / "z.tif").write_bytes(b"garbage")
    rc = main(
        [
            "predict",
            str(random_tiny_checkpoint),
            str(folder),
            "--out",
            str(tmp_path / "s.zip"),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1 and "z.tif" in err
    with zipfile.ZipFile(tmp_path / "s.zip") as zf:
        assert zf.namelist() == ["test-results.json"]
    rc = main(
        [
            "predict",
            str(random_tiny_checkpoint),
            str(folder),
            "--out",
            str(tmp_path / "strict" / "t.zip"),  # its own folder: s.zip's test-results.json is not replaced
            "--strict",
            "--no-progress",
        ]
    )
    assert rc == 2 and "z.tif" in capsys.readouterr().err
    rc = main(
        [
            "predict",
            str(random_tiny_checkpoint),
            str(folder),
            "--out",
            str(tmp_path / "ids" / "u.zip"),
            "--ids",
            str(dataset / "test_image_name_to_ids.json"),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "does not match" in err and len(err.strip().splitlines()) == 1


def test_submission_for_a_synthetic_test_set_loads_against_its_ground_truth(
    runner: Any, small_synth: Path, tmp_path: Path
) -> None:
    root = small_synth
    summary = predict_folder(runner, root / "test_release", None, tmp_path / "sub.zip", progress=False)
    results = read_submission(summary.out_zip)
    assert summary.num_predicted == 3 and len(results) > 0
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(root / "test_ground_truth.json"))
        coco_dt = coco_gt.loadRes(results)
    assert {a["image_id"] for a in coco_dt.dataset["annotations"]} <= set(coco_gt.getImgIds())
    for r in results:
        img = coco_gt.imgs[r["image_id"]]
        assert r["segmentation"]["size"] == [img["height"], img["width"]]
    # The same ground truth through the project's evaluation.
    gt, preds = run_dataset(runner, root, "test", progress=False)
    res = evaluate(gt, [r for i in sorted(preds) for r in instances_to_results(i, preds[i])])
    assert res.num_images == 3 and res.metrics["segm"]["num_detections"] == len(results)


@pytest.mark.slow
def test_trained_model_submission_scores_what_eval_reports(trained_tiny: Any, tmp_path: Path) -> None:
    """With real detections: (1) ``eval`` on val reproduces the AP the training loop stored in the checkpoint
    (same forward path, post-processing and metric), (2) the submission zip scored by pycocotools itself
    against ``test_ground_truth.json`` gives exactly the segm AP/AP50 that ``eval --split test`` reports."""
    import torch

    ckpt, root = trained_tiny.checkpoint, trained_tiny.data_root
    stored = torch.load(ckpt, weights_only=True, map_location="cpu")["metrics"]
    val = evaluate_model(ckpt, None, root, "val", max_dets=stored.get("max_dets", 100), progress=False)
    assert val.metrics["segm"]["AP50"] == stored["segm_AP50"]
    assert val.metrics["bbox"]["AP50"] == stored["bbox_AP50"]

    test = evaluate_model(ckpt, None, root, "test", iou_types=("segm",), progress=False)
    ap50 = test.metrics["segm"]["AP50"]
    assert ap50 is not None and ap50 > 0.0, f"a trained model finds cells (segm AP50 {ap50})"
    with create_runner("torch", ckpt) as r:
        summary = predict_folder(r, root / "test_release", None, tmp_path / "sub.zip", progress=False)
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(root / "test_ground_truth.json"))
        ev = COCOeval(coco_gt, coco_gt.loadRes(read_submission(summary.out_zip)), "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert (ev.stats[0], ev.stats[1]) == (test.metrics["segm"]["AP"], test.metrics["segm"]["AP50"])
