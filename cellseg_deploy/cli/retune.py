"""``cellseg-deploy retune``: a checkpoint with fewer (or more) RPN proposals, same weights.

See :mod:`cellseg_deploy.modeling.retune` for why this is a new checkpoint and not a backend option.
"""

from __future__ import annotations

from pathlib import Path

import click

from cellseg_deploy.cli.common import check_outputs, write_json_result
from cellseg_deploy.cli.options import json_option, overwrite_option


@click.command("retune")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option(
    "--proposals",
    type=int,
    required=True,
    help="RPN proposals per image after the RPN's NMS (rpn_post_nms_top_n_test; the box head's RoIs).",
)
@click.option(
    "--pre-nms",
    type=int,
    default=None,
    help="Anchors per pyramid level entering the RPN's NMS (rpn_pre_nms_top_n_test). Default: --proposals.",
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The new checkpoint (.pt).")
@overwrite_option
@json_option
def retune_cmd(
    checkpoint: Path,
    proposals: int,
    pre_nms: int | None,
    out: Path,
    overwrite: bool,
    json_path: Path | None,
) -> None:
    """Write a copy of CHECKPOINT that keeps --proposals RPN proposals per image at inference.

    Cell images hold far fewer cells than the 1000 proposals torchvision keeps by default; fewer proposals make
    the box head cheaper on every backend but can change the detections. Export, check and benchmark the new
    checkpoint like any other, and compare its AP with the original's (cellseg-deploy eval, or
    benchmarks/cpu_accuracy.py --proposals N).

    \b
    Example:
        cellseg-deploy retune runs/r50/best.pt --proposals 300 --out runs/r50/best-p300.pt
        cellseg-deploy export runs/r50/best-p300.pt --format onnx --out models/r50-p300.onnx
    """
    check_outputs({"--out": out, "--json": json_path}, overwrite=overwrite)
    from cellseg_deploy.modeling import retune_checkpoint

    record = retune_checkpoint(checkpoint, out, proposals, pre_nms)
    changes = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in record["changes"].items()) or "nothing changed"
    click.echo(f"wrote {out}: {changes}")
    write_json_result(json_path, {"checkpoint": str(out), **record})
