"""``cellseg-deploy parity``: does an exported model find the same cells as its checkpoint?

A thin command over :func:`cellseg_deploy.evaluation.parity.run_parity`. Exit codes: 0 parity holds; 1 it
does not (the table and the JSON report say what differed); 2 bad usage or unusable inputs.
"""

from __future__ import annotations

from pathlib import Path

import click

from cellseg_deploy.cli.common import check_outputs, write_json_result
from cellseg_deploy.cli.options import (
    PRECISIONS,
    deprecated_alias,
    device_option,
    json_option,
    limit_option,
    max_pixels_option,
    overwrite_option,
    precision_option,
    progress_option,
    seed_option,
    split_option,
    threads_option,
    val_fraction_option,
)
from cellseg_deploy.errors import CheckFailed
from cellseg_deploy.evaluation.parity import DEFAULT_MIN_INSTANCES


@click.command("parity")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option(
    "--candidate",
    required=True,
    type=click.Path(path_type=Path),
    help="The model to check: an .onnx file, a stage folder, an engine manifest, ...",
)
@click.option(
    "--engine",
    default="onnx",
    show_default=True,
    metavar="NAME",
    help="The candidate's runner (onnx, staged-onnx, trt, ...).",
)
@click.option(
    "--reference-engine",
    default="torch",
    show_default=True,
    metavar="NAME",
    help="The reference's runner (CHECKPOINT is read by it).",
)
@click.option(
    "--data",
    "data_root",
    required=True,
    type=click.Path(path_type=Path),
    help="Dataset root in the competition layout (train/<id>/image.tif + classK.tif, ...).",
)
@limit_option("Compare only the first N images of the split.")
@deprecated_alias("--images", "--limit", "limit", type=click.IntRange(min=1))
@split_option()
@precision_option(
    "The candidate's precision: the tolerance profile, and the candidate runner's precision (fp32 when the "
    "runner has not this one)."
)
@deprecated_alias("--profile", "--precision", "precision", type=click.Choice(PRECISIONS))
@click.option(
    "--tol",
    "tols",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override one limit of the profile, e.g. --tol max_box_diff=1.0 --tol min_agreement=0.97, or turn a check off with --tol max_box_diff=off (repeatable).",
)
@click.option(
    "--score-thresh",
    type=click.FloatRange(0.0, 1.0),
    default=0.5,
    show_default=True,
    help="Instances scoring at least this must agree (matching itself sees every detection).",
)
@click.option(
    "--min-iou",
    type=click.FloatRange(0.0, 1.0, min_open=True),
    default=0.5,
    show_default=True,
    help="Mask IoU a same-class pair needs to count as the same instance.",
)
@click.option(
    "--min-instances",
    type=click.IntRange(min=1),
    default=DEFAULT_MIN_INSTANCES,
    show_default=True,
    help="Fewest instances scoring >= --score-thresh (both sides together) a verdict may rest on; fewer fail.",
)
@device_option("Device of both runners: cpu, cuda or cuda:N.")
@click.option("--candidate-device", default=None, help="Device of the candidate, if other than --device.")
@click.option(
    "--candidate-precision",
    type=click.Choice(PRECISIONS),
    default=None,
    help="Run the candidate at this precision but judge it by --precision's tolerances (rarely needed).",
)
@threads_option("CPU threads for each runner. Default: the backend's own.")
@val_fraction_option
@seed_option()
@progress_option()
@click.option(
    "--overlays",
    "overlays_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Also draw the images where the two sides disagree most (up to 8) into this folder: matched, low-IoU, "
    "missed and extra instances in distinct colours, with a legend (both models run again on those images).",
)
@max_pixels_option
@overwrite_option
@json_option
def parity_cmd(
    checkpoint: Path,
    candidate: Path,
    engine: str,
    reference_engine: str,
    data_root: Path,
    limit: int | None,
    split: str,
    precision: str,
    tols: tuple[str, ...],
    score_thresh: float,
    min_iou: float,
    min_instances: int,
    device: str,
    candidate_device: str | None,
    candidate_precision: str | None,
    threads: int | None,
    val_fraction: float,
    seed: int,
    progress: bool,
    overlays_dir: Path | None,
    max_pixels: int | None,
    overwrite: bool,
    json_path: Path | None,
) -> None:
    """Compare CANDIDATE's instances with CHECKPOINT's (PyTorch) on a dataset split, image by image.

    Instances are matched by class and mask IoU (optimal assignment, against the other side's full list, so a
    score crossing the threshold is a score difference, not a miss); the table gives matched, missed and extra
    instances, box, score and mask IoU differences and the agreement (F1 of the matching, 1.0 for identical
    instances), then each check of the tolerance profile with the number of instances behind it. Exit 1 when
    a check fails or when fewer than --min-instances instances were compared.

    \b
    Examples:
        cellseg-deploy parity runs/tiny/best.pt --candidate models/tiny.onnx --data data/hw3 --limit 20
        cellseg-deploy parity runs/r50/best.pt --candidate models/r50-trt/engines.json --engine trt \\
            --data data/hw3 --device cuda --precision fp16 --tol max_box_diff=6 --json parity.json
        cellseg-deploy parity runs/tiny/best.pt --candidate models/tiny.int8.xml --engine openvino \\
            --precision int8 --data data/hw3 --overlays runs/parity-int8
    """
    check_outputs(
        {"--json": json_path, "--overlays": overlays_dir},
        overwrite=overwrite,
        folders=("--overlays",),
        may_exist=("--overlays",),
    )
    from cellseg_deploy.evaluation.parity import parse_tolerances, run_parity

    report = run_parity(
        checkpoint,
        candidate,
        engine,
        data_root,
        images=limit,
        split=split,
        profile=precision,
        tolerances=parse_tolerances(tols),
        reference_engine=reference_engine,
        score_thresh=score_thresh,
        min_iou=min_iou,
        device=device,
        candidate_device=candidate_device,
        candidate_precision=candidate_precision,
        threads=threads,
        val_fraction=val_fraction,
        seed=seed,
        progress=progress,
        min_instances=min_instances,
        max_pixels=max_pixels,
    )
    click.echo(report.table())
    write_json_result(json_path, report.to_dict())
    if overlays_dir is not None:
        from cellseg_deploy.evaluation.parity.overlays import write_parity_overlays

        drawn = write_parity_overlays(
            report,
            checkpoint,
            candidate,
            engine,
            data_root,
            overlays_dir,
            reference_engine=reference_engine,
            device=device,
            candidate_device=candidate_device,
            threads=threads,
        )
        click.echo(f"wrote {len(drawn)} parity overlay(s) in {overlays_dir}", err=True)
    if not report.passed:
        raise CheckFailed(
            f"parity ({report.profile.name}) failed: "
            + "; ".join(f.split(" (limit")[0] for f in report.failures if not f.startswith("note:"))
        )
