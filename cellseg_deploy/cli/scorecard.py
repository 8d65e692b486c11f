"""``cellseg-deploy scorecard``: one table per model, accuracy, fidelity and speed of every engine.

A thin command over :func:`cellseg_deploy.bench.scorecard.run_scorecard`. Exit codes: 0 every engine's parity
holds; 1 one failed (the table says which and why); 2 bad usage or unusable inputs.
"""

from __future__ import annotations

from pathlib import Path

import click

from cellseg_deploy.cli.common import check_outputs, write_json_result
from cellseg_deploy.cli.options import (
    device_option,
    json_option,
    limit_option,
    overwrite_option,
    progress_option,
    seed_option,
    split_option,
    threads_option,
    val_fraction_option,
)

DEFAULT_ENGINES = "torch,onnx,openvino,openvino:bf16,openvino:int8,staged-onnx"


@click.command("scorecard")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option(
    "--data",
    "data_root",
    required=True,
    type=click.Path(path_type=Path),
    help="Dataset root in the competition layout (train/<id>/image.tif + classK.tif, test_release/).",
)
@click.option(
    "--engine",
    "engine_spec",
    default=DEFAULT_ENGINES,
    show_default=True,
    help="Comma-separated engines, runner names optionally with a precision; torch (the reference of parity "
    "and speed-up) is always measured.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs/scorecard"),
    show_default=True,
    help="Folder for scorecard.json, scorecard.md, accuracy_vs_latency.png and bench/.",
)
@click.option(
    "--cache",
    "cache_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for the exported models (reused while the checkpoint is unchanged). [default: OUT/models]",
)
@split_option(
    "Images of accuracy and parity: the seeded val split of train/ (as in training), train, all or test."
)
@click.option(
    "--max-dets", type=click.IntRange(min=1), default=100, show_default=True, help="COCOeval detection cap."
)
@click.option(
    "--min-instances",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Fewest instances (both sides, scoring >= 0.5) a parity verdict may rest on.",
)
@threads_option("CPU threads for each runner. Default: the backend's own.")
@device_option("cpu, cuda or cuda:N: where every engine predicts and is benchmarked.")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True, help="Untimed rounds.")
@click.option("--iters", type=click.IntRange(min=1), default=5, show_default=True, help="Measured rounds.")
@limit_option("Benchmark only the first N images.")
@click.option("--no-memory", is_flag=True, help="Skip the per-engine peak-memory probes (fresh processes).")
@val_fraction_option
@seed_option()
@progress_option(default=False)
@overwrite_option
@json_option
def scorecard_cmd(
    checkpoint: Path,
    data_root: Path,
    engine_spec: str,
    out_dir: Path,
    cache_dir: Path | None,
    split: str,
    max_dets: int,
    min_instances: int,
    threads: int | None,
    device: str,
    warmup: int,
    iters: int,
    limit: int | None,
    no_memory: bool,
    val_fraction: float,
    seed: int,
    progress: bool,
    overwrite: bool,
    json_path: Path | None,
) -> None:
    """Export what is missing, then give one table: per engine and precision the model file and its size,
    segm AP50/AP on the split, the parity verdict against PyTorch with its key figures, p50 latency, speed-up
    and peak memory.

    Each engine predicts the split once; those instances are scored against the ground truth and compared
    with torch's (the parity profile is the engine's precision). The benchmark runs the engines interleaved
    on the dataset's test_release/ images. Engines whose backend is not available here (TensorRT without
    an NVIDIA GPU) are listed as skipped. Exit 1 when a parity verdict fails.

    \b
    Examples:
        cellseg-deploy scorecard runs/demo/train/best.pt --data runs/demo/data --out runs/scorecard
        cellseg-deploy scorecard runs/r50/best.pt --data data/hw3 --engine torch,onnx,openvino:int8 \\
            --threads 2 --iters 10 --limit 4 --json scorecard.json
        cellseg-deploy scorecard runs/r50/best.pt --data data/hw3 --engine torch,trt,trt:fp16 --device cuda:0
    """
    check_outputs(
        {
            "--out scorecard.json": out_dir / "scorecard.json",
            "--out scorecard.md": out_dir / "scorecard.md",
            "--json": json_path,
        },
        overwrite=overwrite,
    )
    from cellseg_deploy.bench.runner_bench import parse_engine_specs
    from cellseg_deploy.bench.scorecard import ScorecardRequest, run_scorecard, summary_text
    from cellseg_deploy.errors import CheckFailed

    request = ScorecardRequest(
        checkpoint=checkpoint,
        data=data_root,
        engines=parse_engine_specs(engine_spec),
        out_dir=out_dir,
        cache_dir=cache_dir,
        split=split,
        val_fraction=val_fraction,
        seed=seed,
        max_dets=max_dets,
        min_instances=min_instances,
        threads=threads,
        device=device,
        warmup=warmup,
        iters=iters,
        bench_limit=limit,
        memory=not no_memory,
        progress=progress,
    )
    result = run_scorecard(request, lambda msg: click.echo(msg, err=True))
    click.echo(summary_text(result))
    click.echo(f"wrote {result['outputs']['markdown']} and {result['outputs']['json']}", err=True)
    write_json_result(json_path, result)
    failed = [r["engine"] for r in result["rows"] if (r.get("parity") or {}).get("verdict") == "FAIL"]
    if failed:
        raise CheckFailed(f"parity failed for {', '.join(failed)}; see {result['outputs']['markdown']}")
