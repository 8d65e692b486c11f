"""``cellseg-deploy eval`` and ``cellseg-deploy predict``: thin commands over :mod:`cellseg_deploy.evaluation`.

Exit codes: 0 success; 1 some images could not be read or run and were skipped (the others were written
or scored, the skipped ones are named); 2 bad usage or bad input, an output that cannot be written or
already exists (checked before any work; ``--overwrite`` replaces), or ``predict --strict`` stopping at the
first bad image (nothing written).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from cellseg_deploy.cli.common import check_outputs, write_json_result
from cellseg_deploy.cli.options import (
    F,
    device_option,
    json_option,
    max_pixels_option,
    overwrite_option,
    precision_option,
    progress_option,
    seed_option,
    split_option,
    threads_option,
    val_fraction_option,
)

_ENGINE_HELP = (
    "Runner to use (a registered name: torch, onnx, staged-onnx, trt, ...). Default: from the model file "
    "(.pt -> torch, .onnx -> onnx, .xml -> openvino, engines.json or its folder -> trt, stage folder or "
    "manifest -> staged-onnx)."
)


def _runner_options(func: F) -> F:
    """``--engine --device --precision --threads``, shared by eval and predict."""
    func = threads_option()(func)
    func = precision_option()(func)
    func = device_option()(func)
    func = click.option("--engine", default=None, metavar="NAME", help=_ENGINE_HELP)(func)
    return func


def _loop_options(func: F) -> F:
    """``--workers --batch --concurrency``: the pipelined loop (:mod:`cellseg_deploy.evaluation.pipeline`)."""
    func = click.option(
        "--concurrency",
        type=click.IntRange(min=1),
        default=1,
        show_default=True,
        help="Inference calls in flight (onnx, openvino; openvino gets as many streams).",
    )(func)
    func = click.option(
        "--batch",
        type=click.IntRange(min=1),
        default=1,
        show_default=True,
        help="Images per inference call (runners that batch).",
    )(func)
    func = click.option(
        "--workers",
        type=click.IntRange(min=0),
        default=None,
        help="Host threads decoding and post-processing beside inference; 0: one image at a time. "
        "Default: 2 on CUDA or with --concurrency above 1, else 0 (on the CPU, inference already uses every "
        "core; see docs/evaluation.md).",
    )(func)
    return func


def _pipeline(workers: int | None, batch: int, concurrency: int, device: str) -> Any:
    from cellseg_deploy.evaluation.pipeline import PipelineSettings

    if workers is None:  # measured: host threads beside a CPU backend's own threads cost more than they hide
        workers = 2 if device.startswith("cuda") or concurrency > 1 else 0
    return PipelineSettings(workers=workers, batch=batch, concurrency=concurrency, depth=2 if workers else 0)


def _overlay_score_option(func: F) -> F:
    """``--overlay-score``: what the overlays draw (the scores and the submission keep every detection)."""
    return click.option(
        "--overlay-score",
        type=click.FloatRange(0.0, 1.0),
        default=0.5,
        show_default=True,
        help="Overlays draw only detections scoring at least this (with their scores); AP and the "
        "submission are unaffected.",
    )(func)


def _post_options(func: F) -> F:
    """``--score-thresh --mask-thresh``: the shared post-processing."""
    func = click.option(
        "--mask-thresh",
        type=click.FloatRange(0.0, 1.0, max_open=True),
        default=0.5,
        show_default=True,
        help="A pixel is in the mask when its pasted probability is above this.",
    )(func)
    func = click.option(
        "--score-thresh",
        type=click.FloatRange(0.0, 1.0),
        default=0.0,
        show_default=True,
        help="Drop detections scoring below this (the model applies its own score_thresh first).",
    )(func)
    return func


@click.command("eval")
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--data",
    "data_root",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Dataset root (train/, test_release/, test_image_name_to_ids.json, test_ground_truth.json).",
)
@split_option(
    "val/train: the seeded split of train/; all: all of train/; test: test_release/ vs test_ground_truth.json."
)
@click.option(
    "--max-dets",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="COCOeval's cap: detections scored per image and category (highest scores first).",
)
@_post_options
@val_fraction_option
@seed_option()
@click.option(
    "--overlays",
    "overlays_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Also write one PNG per image: predictions coloured TP (matched to a ground-truth cell: same class, "
    "mask IoU >= 0.5, one-to-one), FP (unmatched) and FN (missed ground truth).",
)
@_overlay_score_option
@click.option(
    "--iou",
    "iou_types",
    default="segm,bbox",
    show_default=True,
    help="IoU types to score: segm, bbox or both.",
)
@_runner_options
@_loop_options
@max_pixels_option
@progress_option()
@json_option
@overwrite_option
def eval_cmd(
    model: Path,
    data_root: Path,
    split: str,
    max_dets: int,
    score_thresh: float,
    mask_thresh: float,
    val_fraction: float,
    seed: int,
    overlays_dir: Path | None,
    overlay_score: float,
    iou_types: str,
    engine: str | None,
    device: str,
    precision: str,
    threads: int | None,
    workers: int | None,
    batch: int,
    concurrency: int,
    max_pixels: int | None,
    progress: bool,
    json_path: Path | None,
    overwrite: bool,
) -> None:
    """COCO segm and bbox AP, AP50, AP75 and per-class AP50 of MODEL on a dataset split, with any runner.

    MODEL is a checkpoint (.pt), an exported .onnx file, an OpenVINO .xml IR, a stage folder or a TensorRT
    engine manifest (engines.json; --engine picks the runner otherwise inferred from the file). The table
    states the detection cap used (COCOeval keeps at most --max-dets detections per image and category);
    the model's own cap (detections_per_img, fixed in the checkpoint and baked into exports) applies first.
    An image that cannot be read or run is skipped, left out of the scores and named (exit 1).

    \b
    Examples:
        cellseg-deploy eval runs/r50/best.pt --data data/hw3 --split val
        cellseg-deploy eval models/r50.onnx --data data/hw3 --split test --max-dets 300 --json eval.json
        cellseg-deploy eval runs/r50/best.pt --data data/hw3 --overlays overlays/ --overlay-score 0.5
        torchrun --nproc-per-node 2 -m cellseg_deploy.cli.main eval models/r50.onnx --data data/hw3
    """
    check_outputs(
        {"--json": json_path, "--overlays": overlays_dir}, overwrite=overwrite, folders=("--overlays",)
    )
    from cellseg_deploy.data.io import DEFAULT_MAX_PIXELS
    from cellseg_deploy.evaluation import distributed
    from cellseg_deploy.evaluation.predict import ImageFailures, evaluate_model

    types = tuple(t.strip() for t in iou_types.split(",") if t.strip())
    failures = ImageFailures()
    pipeline = _pipeline(workers, batch, concurrency, device)
    with distributed.session(device) as dist:
        result = evaluate_model(
            model,
            engine,
            data_root,
            split,
            max_dets=max_dets,
            score_thresh=score_thresh,
            mask_thresh=mask_thresh,
            val_fraction=val_fraction,
            seed=seed,
            device=distributed.rank_device(dist, device),
            precision=precision,
            threads=distributed.rank_threads(dist, threads, device),
            iou_types=types,
            progress=progress,
            failures=failures,
            max_pixels=max_pixels or DEFAULT_MAX_PIXELS,
            pipeline=pipeline,
            dist=dist,
            overlays_dir=overlays_dir,
            overlay_score=overlay_score,
        )
    if dist is not None and not dist.is_main:
        if failures:
            raise SystemExit(1)  # rank 0 prints the table and names the skipped images
        return
    click.echo(result.table())
    if "overlays" in result.info:
        drawn = result.info["overlays"]
        click.echo(
            f"overlays in {drawn['dir']} ({drawn['images']} images, TP/FP/FN against the ground truth)"
        )
    write_json_result(json_path, result.to_dict())
    if failures:
        scored = int(result.info.get("images_scored", 0))
        raise failures.error(len(failures) + scored, f"the scores above are over the other {scored}")


@click.command("predict")
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.argument("images_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--ids",
    "ids_map",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Id map (test_image_name_to_ids.json). Default: IMAGES_DIR/../test_image_name_to_ids.json if it "
    "exists, else ids 1..N in sorted file-name order.",
)
@click.option(
    "--out",
    "out_zip",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Submission zip to write; test-results.json is also written beside it.",
)
@click.option(
    "--overlays",
    "overlays_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Also write one PNG per image with the predicted masks coloured by class; with "
    "test_ground_truth.json beside IMAGES_DIR, coloured TP / FP / FN against it as in eval --overlays.",
)
@_overlay_score_option
@click.option(
    "--strict",
    is_flag=True,
    help="Stop (exit 2) at the first image that cannot be read or run instead of skipping it.",
)
@_post_options
@click.option(
    "--max-per-image",
    type=click.IntRange(min=1),
    default=None,
    help="Keep at most this many detections per image (highest scores). Default: all the model returns.",
)
@_runner_options
@_loop_options
@max_pixels_option
@progress_option()
@json_option
@overwrite_option
def predict_cmd(
    model: Path,
    images_dir: Path,
    ids_map: Path | None,
    out_zip: Path,
    overlays_dir: Path | None,
    overlay_score: float,
    strict: bool,
    score_thresh: float,
    mask_thresh: float,
    max_per_image: int | None,
    engine: str | None,
    device: str,
    precision: str,
    threads: int | None,
    workers: int | None,
    batch: int,
    concurrency: int,
    max_pixels: int | None,
    progress: bool,
    json_path: Path | None,
    overwrite: bool,
) -> None:
    """Predict every image in IMAGES_DIR and write the competition submission (zip + test-results.json).

    IMAGES_DIR is test_release/ (ids from its id map) or any folder of TIFF/PNG/JPEG images (ids 1..N in
    sorted file-name order; the output says which). Each image is handled alone: one that cannot be read,
    is above --max-pixels or cannot be run by the model is skipped and named at the end, and the exit code is
    then 1 (the submission holds the other images); --strict stops at it with exit 2. Images of extreme
    aspect ratio (1 x 600) are padded for the model and their masks cut back to the image.

    Every output (--out, test-results.json beside it, --overlays, --json) is checked before the model is
    loaded: one that cannot be written, or that exists without --overwrite, stops the command (exit 2).

    \b
    Examples:
        cellseg-deploy predict runs/r50/best.pt data/hw3/test_release --out submission.zip
        cellseg-deploy predict models/r50.onnx my_images/ --out preds.zip --overlays overlays/
        cellseg-deploy predict models/r50-int8.xml data/hw3/test_release --out s.zip --precision int8
        torchrun --nproc-per-node 2 -m cellseg_deploy.cli.main predict models/r50.onnx data/hw3/test_release --out s.zip
    """
    check_outputs(
        {
            "--out": out_zip,
            "test-results.json beside --out": out_zip.with_name("test-results.json"),
            "--overlays": overlays_dir,
            "--json": json_path,
        },
        overwrite=overwrite,
        folders=("--overlays",),
    )
    from cellseg_deploy.backends.registry import create_runner
    from cellseg_deploy.data.io import DEFAULT_MAX_PIXELS
    from cellseg_deploy.errors import CheckFailed
    from cellseg_deploy.evaluation import distributed
    from cellseg_deploy.evaluation.predict import infer_engine, predict_folder
    from cellseg_deploy.postprocess import PostprocessConfig

    post = PostprocessConfig(score_thresh=score_thresh, mask_thresh=mask_thresh, max_dets=max_per_image)
    name = engine or infer_engine(model)
    pipeline = _pipeline(workers, batch, concurrency, device)
    with (
        distributed.session(device) as dist,
        create_runner(
            name,
            model,
            device=distributed.rank_device(dist, device),
            precision=precision,
            threads=distributed.rank_threads(dist, threads, device),
            options=pipeline.runner_options(name),
        ) as runner,
    ):
        summary = predict_folder(
            runner,
            images_dir,
            ids_map,
            out_zip,
            overlays_dir=overlays_dir,
            overlay_score=overlay_score,
            strict=strict,
            post=post,
            progress=progress,
            max_pixels=max_pixels or DEFAULT_MAX_PIXELS,
            pipeline=pipeline,
            dist=dist,
        )
    if dist is not None and not dist.is_main:
        if summary.failed:
            raise SystemExit(1)  # rank 0 prints the summary and names the skipped images
        return
    click.echo(summary.text())
    write_json_result(json_path, summary.to_dict())
    if summary.failed:
        names = ", ".join(n for n, _ in summary.failed[:5]) + (" ..." if len(summary.failed) > 5 else "")
        raise CheckFailed(
            f"{len(summary.failed)} of {summary.num_images} image(s) could not be read or run and were skipped "
            f"({names}); {summary.out_zip} holds the other {summary.num_predicted}"
        )
