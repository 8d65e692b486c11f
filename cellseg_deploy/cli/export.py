"""``cellseg-deploy export``: a checkpoint to an ONNX graph, stage graphs, or TensorRT engines.

One library function per format: :func:`cellseg_deploy.backends.onnxrt.export.export_onnx` (``onnx``),
:func:`cellseg_deploy.backends.staged.export.export_staged` (``staged``),
:func:`cellseg_deploy.backends.tensorrt.build.build_engines` (``trt``, after ``export_staged`` when given a checkpoint)
and :func:`cellseg_deploy.backends.openvino.int8.export_openvino_int8` (``openvino-int8``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from cellseg_deploy.backends.registry import EXPORT_FORMATS
from cellseg_deploy.cli.common import (
    check_outputs,
    echo_table,
    json_option,
    overwrite_option,
    write_json_result,
)
from cellseg_deploy.errors import UserError


def _size_pair(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    h, sep, w = value.lower().partition("x")
    if not sep or not h.strip().isdigit() or not w.strip().isdigit():
        raise UserError(f"--opt-size: expected HxW in pixels, e.g. 512x512, got {value!r}")
    return int(h), int(w)


@click.command("export")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(list(EXPORT_FORMATS)),
    default="onnx",
    show_default=True,
    help="onnx: one graph (uint8 image in, 28x28 mask probabilities out); staged: backbone+RPN, box head "
    "and mask head graphs (fp32, and fp16 with --fp16); trt: TensorRT engines of the stages (GPU only); "
    "openvino-int8: the onnx graph quantised to int8 for the CPU (an OpenVINO IR, calibrated on --calib-data).",
)
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(path_type=Path),
    help="onnx: the .onnx file; staged: the stage folder; trt: the engine folder; openvino-int8: the .xml file.",
)
@click.option(
    "--opset", type=click.IntRange(16, 20), default=17, show_default=True, help="ONNX opset (16 to 20)."
)
@click.option(
    "--simplify",
    is_flag=True,
    help="onnx: run onnxslim and keep its graph only if it gives the same outputs as the plain one.",
)
@click.option(
    "--static", is_flag=True, help="onnx: fix the input size to the trace image's (default: dynamic H and W)."
)
@click.option(
    "--trace-image",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="onnx: trace with this image (it must give detections). Default: a synthetic cell image.",
)
@click.option(
    "--fp16/--no-fp16",
    default=None,
    help="staged: also export fp16 graphs (default on); trt: build fp16 engines (default on).",
)
@click.option(
    "--max-batch",
    type=click.IntRange(min=1),
    default=None,
    help="staged/trt: largest image batch of the optimisation profile (default 1).",
)
@click.option(
    "--opt-size",
    default=None,
    metavar="HxW",
    help="staged/trt: the profile's optimum padded input size (default: min_size x min_size).",
)
@click.option(
    "--profile-json",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="staged/trt: a whole stage profile as JSON (batch, height, width, box_rois, mask_rois: [min, opt, max]).",
)
@click.option(
    "--stage-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="trt from a checkpoint: where to write the stage graphs first (default OUT/stages).",
)
@click.option(
    "--workspace-gib",
    type=click.FloatRange(min=0, min_open=True),
    default=4.0,
    show_default=True,
    help="trt: builder workspace limit.",
)
@click.option(
    "--timing-cache",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="trt: timing cache file to reuse and update.",
)
@click.option(
    "--calib-data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="openvino-int8: calibrate on this dataset root's training split (or a folder of images). Default: "
    "synthetic cell images.",
)
@click.option(
    "--calib-images",
    type=click.IntRange(min=1),
    default=None,
    help="openvino-int8: number of calibration images (default 16).",
)
@json_option
@overwrite_option
def export_cmd(
    checkpoint: Path,
    fmt: str,
    out: Path,
    opset: int,
    simplify: bool,
    static: bool,
    trace_image: Path | None,
    fp16: bool | None,
    max_batch: int | None,
    opt_size: str | None,
    profile_json: Path | None,
    stage_dir: Path | None,
    workspace_gib: float,
    timing_cache: Path | None,
    calib_data: Path | None,
    calib_images: int | None,
    json_path: Path | None,
    overwrite: bool,
) -> None:
    """Export CHECKPOINT (a cellseg-deploy .pt; for --format trt also a stage folder) for deployment.

    The ONNX graph carries its provenance (class names, model config, the checkpoint's SHA-256, library
    versions, opset) and is checked against PyTorch on three image sizes before it is written. A missing or
    corrupt checkpoint is a one-line error and nothing is written. Every output (--out, --stage-dir, --json)
    is checked before the export starts: one that cannot be written, or that exists without --overwrite,
    stops the command (exit 2).

    \b
    Examples:
        cellseg-deploy export runs/tiny/best.pt --format onnx --out models/tiny.onnx
        cellseg-deploy export runs/r50/best.pt --format onnx --out models/r50.onnx --simplify --json export.json
        cellseg-deploy export runs/r50/best.pt --format staged --out models/r50-stages --fp16
        cellseg-deploy export runs/r50/best.pt --format trt --out models/r50-trt --fp16   # on a GPU machine
        cellseg-deploy export runs/r50/best.pt --format openvino-int8 --calib-data data/hw3 --out models/r50.int8.xml
    """
    result: Any
    _check_export_outputs(fmt, out, stage_dir, json_path, timing_cache, overwrite)
    if fmt != "openvino-int8" and (calib_data is not None or calib_images is not None):
        raise UserError("--calib-data/--calib-images apply to --format openvino-int8 only")
    if fmt == "openvino-int8":
        _reject_onnx_only(simplify, static, trace_image)
        _reject_stage_options(fmt, fp16, max_batch, opt_size, profile_json, stage_dir, timing_cache)
        from cellseg_deploy.backends.openvino.int8 import DEFAULT_CALIB_IMAGES, export_openvino_int8

        result = export_openvino_int8(
            checkpoint, out, calib_data=calib_data, calib_images=calib_images or DEFAULT_CALIB_IMAGES
        )
        click.echo(
            f"wrote {result.path} (+ {result.bin_path.name}) in {result.seconds:.1f} s: "
            f"{len(result.quantised_layers)} layers int8, calibrated on {result.calibration['source']}"
        )
    elif fmt == "onnx":
        _reject_stage_options(fmt, fp16, max_batch, opt_size, profile_json, stage_dir, timing_cache)
        from cellseg_deploy.backends.onnxrt.export import export_onnx

        image = None
        if trace_image is not None:
            from cellseg_deploy.data.io import read_image

            image = read_image(trace_image)
        result = export_onnx(
            checkpoint, out, opset=opset, simplify=simplify, trace_image=image, dynamic=not static
        )
        _print_onnx(result)
    elif fmt == "staged":
        _reject_onnx_only(simplify, static, trace_image)
        from cellseg_deploy.backends.staged.export import export_staged

        profile = _stage_profile(checkpoint, max_batch, opt_size, profile_json)
        result = export_staged(
            checkpoint, out, fp16=True if fp16 is None else fp16, opset=opset, profile=profile
        )
        click.echo(
            f"wrote stage graphs to {result.out_dir} in {result.seconds:.1f} s (manifest {result.manifest})"
        )
    else:
        _reject_onnx_only(simplify, static, trace_image)
        from cellseg_deploy.backends.tensorrt.build import build_engines, require_tensorrt

        require_tensorrt()  # before any stage export: no GPU or no TensorRT is one line, and nothing is written
        source = checkpoint
        profile = None
        if checkpoint.suffix.lower() in (".pt", ".pth"):
            # Build the engines from fresh stage graphs of this checkpoint.
            from cellseg_deploy.backends.staged.export import export_staged

            profile = _stage_profile(checkpoint, max_batch, opt_size, profile_json)
            source = stage_dir or out / "stages"
            staged = export_staged(
                checkpoint, source, fp16=True if fp16 is None else fp16, opset=opset, profile=profile
            )
            click.echo(f"wrote stage graphs to {staged.out_dir} in {staged.seconds:.1f} s")
        elif max_batch is not None or opt_size is not None or profile_json is not None:
            profile = _stage_profile(None, max_batch, opt_size, profile_json)
        result = build_engines(
            source,
            out,
            fp16=True if fp16 is None else fp16,
            workspace_gib=workspace_gib,
            timing_cache=timing_cache,
            profile=profile,
        )
        click.echo(
            f"built {result.precision} engines in {result.out_dir} in {result.seconds:.1f} s "
            f"(manifest {result.manifest})"
        )
    write_json_result(json_path, result.to_dict())


def _check_export_outputs(
    fmt: str,
    out: Path,
    stage_dir: Path | None,
    json_path: Path | None,
    timing_cache: Path | None,
    overwrite: bool,
) -> None:
    """Every path the export will write, checked before it starts: onnx and openvino-int8 write files (the
    latter a .bin beside the .xml), staged and trt folders (trt's stage graphs go to --stage-dir, by default a
    folder inside --out); the timing cache is read and updated, so only its writability counts."""
    outputs: dict[str, Path | None] = {"--out": out, "--json": json_path, "--timing-cache": timing_cache}
    if fmt == "openvino-int8":
        outputs["the .bin beside --out"] = out.with_suffix(".bin")
    if fmt == "trt":
        outputs["--stage-dir"] = stage_dir
    folders = ("--out", "--stage-dir") if fmt in ("staged", "trt") else ()
    check_outputs(outputs, overwrite=overwrite, folders=folders, may_exist=("--timing-cache",))


def _reject_stage_options(fmt: str, fp16: bool | None, *others: object) -> None:
    """``--fp16``, ``--max-batch``, ``--opt-size``, ``--profile-json``, ``--stage-dir``, ``--timing-cache``
    (in that order in ``others`` after ``fp16``) belong to the staged/trt formats."""
    flags = ("--max-batch", "--opt-size", "--profile-json", "--stage-dir", "--timing-cache")
    for flag, given in (
        ("--fp16", fp16 is not None),
        *((f, v is not None) for f, v in zip(flags, others, strict=True)),
    ):
        if given:
            raise UserError(f"{flag} applies to --format staged/trt, not {fmt}")


def _reject_onnx_only(simplify: bool, static: bool, trace_image: Path | None) -> None:
    for flag, given in (
        ("--simplify", simplify),
        ("--static", static),
        ("--trace-image", trace_image is not None),
    ):
        if given:
            raise UserError(f"{flag} applies to --format onnx only")


def _stage_profile(
    checkpoint: Path | None, max_batch: int | None, opt_size: str | None, profile_json: Path | None
) -> Any:
    """The stage profile the options ask for, or ``None`` for the exporter's default."""
    if profile_json is not None:
        if max_batch is not None or opt_size is not None:
            raise UserError(
                "--profile-json gives the whole profile; do not combine it with --max-batch/--opt-size"
            )
        import json

        from cellseg_deploy.backends.staged.stages import StageProfile

        try:
            data = json.loads(profile_json.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"--profile-json {profile_json}: not readable JSON ({exc})") from exc
        return StageProfile.from_dict(data)
    if max_batch is None and opt_size is None:
        return None
    if checkpoint is None:
        raise UserError(
            "--max-batch/--opt-size need the checkpoint's model config: give a checkpoint or --profile-json"
        )
    from cellseg_deploy.backends.staged.stages import StageProfile
    from cellseg_deploy.modeling.checkpoint import load_checkpoint

    config = load_checkpoint(checkpoint).model_config
    return StageProfile.for_model(config, max_batch=max_batch or 1, opt_size=_size_pair(opt_size))


def _print_onnx(result: Any) -> None:
    checks = result.checks
    click.echo(f"wrote {result.path} ({result.size_bytes / 1e6:.1f} MB) in {result.seconds:.1f} s")
    click.echo(f"  sha256 {result.sha256}")
    click.echo(f"  graph  {result.metadata['graph_sha256']} (without metadata; equal for re-exports)")
    trace = checks["trace_image"]
    click.echo(
        f"  traced on {trace['source']} ({trace['detections']} detections); opset {result.metadata['opset']}"
    )
    rows = [
        [
            f"{c['size'][0]}x{c['size'][1]}",
            c["torch_detections"],
            c["ort_detections"],
            f"{c['max_box_diff']:.1e}",
            f"{c['max_score_diff']:.1e}",
            f"{c['max_mask_diff']:.1e}",
        ]
        for c in checks["images"]
    ]
    echo_table(rows, ["check image", "torch dets", "onnx dets", "box diff px", "score diff", "mask diff"])
    if "simplify" in checks:
        s = checks["simplify"]
        if s["kept"]:
            click.echo(f"simplified: {s['nodes_before']} -> {s['nodes_after']} nodes (same outputs)")
        else:
            click.echo(f"not simplified: {s['reason']}")
