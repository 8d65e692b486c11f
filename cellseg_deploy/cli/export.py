"""``cellseg-deploy export``: a checkpoint to an ONNX graph, stage graphs, TensorRT engines or an int8 IR.

The formats, their exporters and the options each accepts are entries of the format registry
(:data:`cellseg_deploy.backends.registry.FORMATS`): this command looks the format up, refuses in one line an
option the entry does not list, turns the options into the exporter's keyword arguments and calls it
(``onnx``: :func:`~cellseg_deploy.backends.onnxrt.export.export_onnx`, ``staged``:
:func:`~cellseg_deploy.backends.staged.export.export_staged`, ``trt``:
:func:`~cellseg_deploy.backends.tensorrt.build.build_engines` after ``export_staged`` when given a checkpoint,
``openvino-int8``: :func:`~cellseg_deploy.backends.openvino.int8.export_openvino_int8`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from cellseg_deploy.backends.registry import (
    CHECKPOINT_SUFFIXES,
    EXPORT_FORMATS,
    FORMATS,
    Format,
    get_format,
    refused_option,
)
from cellseg_deploy.cli.common import check_outputs, echo_table, write_json_result
from cellseg_deploy.cli.options import json_option, overwrite_option, precision_option, progress_option
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
    help="; ".join(f"{f.name}: {f.summary}" for f in FORMATS if f.exporter is not None) + ".",
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
@precision_option(
    help="What to export, one of each format's precisions: staged: fp16 (default) writes fp32 and fp16 "
    "graphs, fp32 the fp32 graphs only; trt: fp16 (default) or fp32 engines; onnx: fp32; openvino-int8: int8.",
    default=None,
)
@click.option("--fp16/--no-fp16", "fp16", default=None, hidden=True)
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
@progress_option()
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
    precision: str | None,
    fp16: bool | None,
    max_batch: int | None,
    opt_size: str | None,
    profile_json: Path | None,
    stage_dir: Path | None,
    workspace_gib: float,
    timing_cache: Path | None,
    calib_data: Path | None,
    calib_images: int | None,
    progress: bool,
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
        cellseg-deploy export runs/r50/best.pt --format staged --out models/r50-stages --precision fp16
        cellseg-deploy export runs/r50/best.pt --format trt --out models/r50-trt --precision fp16   # on a GPU
        cellseg-deploy export runs/r50/best.pt --format openvino-int8 --calib-data data/hw3 --out models/r50.int8.xml
    """
    entry = get_format(fmt)
    ctx = click.get_current_context()
    given = [
        name for name in ctx.params if ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)
    ]
    refusal = refused_option(entry, given)
    if refusal is not None:
        raise UserError(refusal)
    precision = _precision(entry, precision, fp16)
    _check_export_outputs(entry, out, stage_dir, json_path, timing_cache, overwrite)
    entry.run_preflight()  # e.g. no GPU or no TensorRT: one line, before anything is written
    options: dict[str, Any] = {
        "opset": opset,
        "simplify": simplify,
        "static": static,
        "trace_image": trace_image,
        "precision": precision,
        "stage_profile": (max_batch, opt_size, profile_json),
        "workspace_gib": workspace_gib,
        "timing_cache": timing_cache,
        "calib_data": calib_data,
        "calib_images": calib_images,
    }
    source = checkpoint
    is_checkpoint = checkpoint.suffix.lower() in CHECKPOINT_SUFFIXES
    if entry.source_format is not None and is_checkpoint:
        # Build from fresh files of the source format (trt: stage graphs) exported from this checkpoint.
        first = get_format(entry.source_format)
        source = stage_dir or out / "stages"
        staged = first.load_exporter()(checkpoint, source, **_exporter_kwargs(first, options, checkpoint))
        click.echo(f"wrote stage graphs to {staged.out_dir} in {staged.seconds:.1f} s")
    # Options that need the model config read it from CHECKPOINT, unless CHECKPOINT is a source-format folder.
    config_from = None if entry.source_format is not None and not is_checkpoint else checkpoint
    kwargs = _exporter_kwargs(entry, options, config_from)
    result = entry.load_exporter()(source, out, **kwargs)
    _SUMMARIES.get(entry.name, _print_generic)(result)
    write_json_result(json_path, result.to_dict())


def _precision(entry: Format, precision: str | None, fp16: bool | None) -> str:
    """``--precision``, or the deprecated ``--fp16/--no-fp16`` (fp16 / fp32), else the format's default."""
    if fp16 is not None:
        alias = "fp16" if fp16 else "fp32"
        if precision is not None and precision != alias:
            raise click.UsageError(
                "--fp16/--no-fp16 is the deprecated spelling of --precision; give --precision only"
            )
        click.echo(
            f"warning: {'--fp16' if fp16 else '--no-fp16'} is deprecated; use --precision {alias} (same meaning)",
            err=True,
        )
        precision = alias
    if precision is None:
        return entry.default_precision
    if precision not in entry.precisions:
        raise UserError(
            f"--precision {precision} does not apply to --format {entry.name}; it exports "
            f"{'/'.join(entry.precisions)}"
        )
    return precision


def _exporter_kwargs(entry: Format, options: dict[str, Any], checkpoint: Path | None) -> dict[str, Any]:
    """The exporter's keyword arguments from the command's options, for the options ``entry`` accepts.

    An option left at its default and without a CLI default of its own (``None``) is not passed, so the
    exporter's default applies (the same call as the library's defaults)."""
    accepted = entry.options
    kwargs: dict[str, Any] = {}
    if "opset" in accepted and entry.source_format is None:
        kwargs["opset"] = options["opset"]
    if "simplify" in accepted:
        kwargs["simplify"] = options["simplify"]
    if "static" in accepted:
        kwargs["dynamic"] = not options["static"]
    if "trace_image" in accepted:
        image = None
        if options["trace_image"] is not None:
            from cellseg_deploy.data.io import read_image

            image = read_image(options["trace_image"])
        kwargs["trace_image"] = image
    if "fp16" in accepted:
        kwargs["fp16"] = options["precision"] == "fp16"
    if {"max_batch", "opt_size", "profile_json"} <= accepted:
        kwargs["profile"] = _stage_profile(checkpoint, *options["stage_profile"])
    for name in ("workspace_gib", "timing_cache", "calib_data", "calib_images"):
        if name in accepted and options[name] is not None:
            kwargs[name] = options[name]
    return kwargs


def _check_export_outputs(
    entry: Format,
    out: Path,
    stage_dir: Path | None,
    json_path: Path | None,
    timing_cache: Path | None,
    overwrite: bool,
) -> None:
    """Every path the export will write, checked before it starts: file formats write files (and their
    companions beside ``--out``: openvino-int8's .bin), folder formats folders (trt's stage graphs go to
    --stage-dir, by default a folder inside --out); the timing cache is read and updated, so only its
    writability counts."""
    outputs: dict[str, Path | None] = {"--out": out, "--json": json_path, "--timing-cache": timing_cache}
    for suffix in entry.companions:
        outputs[f"the {suffix} beside --out"] = out.with_suffix(suffix)
    if "stage_dir" in entry.options:
        outputs["--stage-dir"] = stage_dir
    folders = ("--out", "--stage-dir") if entry.kind == "folder" else ()
    check_outputs(outputs, overwrite=overwrite, folders=folders, may_exist=("--timing-cache",))


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


def _print_staged(result: Any) -> None:
    click.echo(
        f"wrote stage graphs to {result.out_dir} in {result.seconds:.1f} s (manifest {result.manifest})"
    )


def _print_trt(result: Any) -> None:
    click.echo(
        f"built {result.precision} engines in {result.out_dir} in {result.seconds:.1f} s "
        f"(manifest {result.manifest})"
    )


def _print_int8(result: Any) -> None:
    click.echo(
        f"wrote {result.path} (+ {result.bin_path.name}) in {result.seconds:.1f} s: "
        f"{len(result.quantised_layers)} layers int8, calibrated on {result.calibration['source']}"
    )


def _print_generic(result: Any) -> None:
    where = getattr(result, "path", None) or getattr(result, "out_dir", None)
    click.echo(f"wrote {where} in {getattr(result, 'seconds', 0.0):.1f} s")


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


_SUMMARIES: dict[str, Callable[[Any], None]] = {
    "onnx": _print_onnx,
    "staged": _print_staged,
    "trt": _print_trt,
    "openvino-int8": _print_int8,
}
"""What each format's export prints (by format name); a format without an entry gets one generic line."""
