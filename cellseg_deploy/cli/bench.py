"""``cellseg-deploy bench``: latency (or throughput) per engine and per stage, on the same images, with the
environment."""

from __future__ import annotations

from pathlib import Path

import click

from cellseg_deploy.cli.common import check_outputs, write_json_result
from cellseg_deploy.cli.options import (
    deprecated_alias,
    device_option,
    json_option,
    limit_option,
    overwrite_option,
    precision_option,
    progress_option,
    seed_option,
    threads_option,
)


@click.command("bench")
@click.option(
    "--engine",
    "engine_spec",
    default="torch",
    show_default=True,
    help="Comma-separated engines to compare: runner names, optionally with a precision "
    "(torch,onnx,trt:fp16,openvino:bf16); an engine named torch is the speed-up reference.",
)
@click.option(
    "--model",
    "checkpoint",
    type=click.Path(path_type=Path),
    default=None,
    help="Checkpoint (.pt): the torch engine's model, and the source of files other engines need.",
)
@click.option(
    "--model-for",
    "model_for",
    multiple=True,
    metavar="ENGINE=PATH",
    help="The model file of one engine (repeatable), e.g. onnx=models/tiny.onnx; it must have been exported "
    "from --model (checked from its recorded provenance).",
)
@click.option(
    "--allow-mismatch",
    is_flag=True,
    help="Benchmark --model-for files that were not exported from --model (marked in the table).",
)
@click.option(
    "--untrained",
    metavar="ARCH",
    default=None,
    help="Instead of --model: a random-weight ARCH model that returns exactly as many detections as "
    "the image has cells (controlled work; see the docs of cellseg_deploy.bench.models).",
)
@click.option(
    "--proposals",
    type=click.IntRange(min=1),
    default=None,
    help="RPN proposals per image at inference (a model change, see 'cellseg-deploy retune'): --model is "
    "retuned into --cache first, --untrained built with it. Default: the model's own (1000).",
)
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    default=None,
    help="Dataset root (test_release/ or train/) or folder of TIFF/PNG images; default: synthetic images.",
)
@limit_option("With --data: use only the first N images.")
@click.option("--imgsz", type=int, default=512, show_default=True, help="Synthetic image side (px).")
@click.option("--cells", type=int, default=150, show_default=True, help="Cells per synthetic image.")
@click.option(
    "--synthetic-images",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    metavar="N",
    help="Without --data: how many synthetic images to measure on.",
)
@deprecated_alias("--images", "--synthetic-images", "synthetic_images", type=click.IntRange(min=1))
@click.option("--warmup", type=int, default=3, show_default=True, help="Untimed rounds before measuring.")
@click.option(
    "--iters",
    type=int,
    default=None,
    help="Measured rounds (each: every engine on every image). [default: 20]",
)
@click.option(
    "--seconds", type=float, default=None, help="Measure whole rounds for this long instead of --iters."
)
@threads_option("Intra-op CPU threads per runner. Default: the backend's own.")
@click.option(
    "--option",
    "options",
    multiple=True,
    metavar="RUNNER.KEY=VALUE",
    help="A backend option (repeatable), e.g. trt.cuda_graphs=true or onnx.graph_optimization=basic.",
)
@device_option()
@precision_option("Precision of engines named without one (engine:precision in --engine sets one engine's).")
@click.option("--batch", type=int, default=1, show_default=True, help="Images per call (runners that batch).")
@click.option(
    "--mode",
    type=click.Choice(["latency", "throughput"]),
    default="latency",
    show_default=True,
    help="latency: one sample at a time, engines interleaved; throughput: each engine alone through "
    "predict's pipelined loop, images per second and the latency under that load.",
)
@click.option(
    "--concurrency",
    type=int,
    default=1,
    show_default=True,
    help="--mode throughput: inference calls in flight (onnx, openvino; openvino gets as many streams).",
)
@click.option(
    "--workers",
    type=int,
    default=None,
    help="--mode throughput: host threads decoding and post-processing beside inference (0: none). "
    "Default: predict's, 2 on CUDA or with --concurrency above 1, else 0.",
)
@click.option(
    "--sweep",
    "sweep_spec",
    default=None,
    metavar="cells|size|cells,size",
    help="Also measure latency against the number of cells and/or the image size.",
)
@click.option(
    "--sweep-cells", default=None, metavar="N,N,...", help="Points of the cells sweep [25,100,250,500]."
)
@click.option(
    "--sweep-sizes", default=None, metavar="PX,PX,...", help="Points of the size sweep [256,512,1024,2048]."
)
@click.option("--no-memory", is_flag=True, help="Skip the per-engine peak-memory probes (fresh processes).")
@click.option(
    "--isolation",
    type=click.Choice(["process", "shared"]),
    default="process",
    show_default=True,
    help="Latency mode: each engine in a process of its own, driven in the interleaved order, or every engine "
    "in the benchmark's process (where their thread pools and allocators share it).",
)
@click.option(
    "--block",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Latency mode: measured rounds each engine runs back to back before the next engine's turn (the "
    "order flips every block); 1 alternates the engines on every image.",
)
@click.option(
    "--settle",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Latency mode: untimed calls of each engine before each of its blocks.",
)
@click.option(
    "--profile",
    is_flag=True,
    help="Also profile every layer of the openvino and onnx engines (alone, fresh process, after the timed "
    "runs), summed by model part with the precision each layer ran in.",
)
@click.option(
    "--score-thresh", type=float, default=0.0, show_default=True, help="Post-processing score threshold."
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs/bench"),
    show_default=True,
    help="Folder for bench.json, bench.md and the PNG plots.",
)
@click.option(
    "--cache",
    "cache_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs/bench-cache"),
    show_default=True,
    help="Folder for models exported by the benchmark and synthetic images (reused).",
)
@seed_option("Seed of synthetic images and untrained models.")
@progress_option()
@overwrite_option
@json_option
def bench(
    engine_spec: str,
    checkpoint: Path | None,
    model_for: tuple[str, ...],
    allow_mismatch: bool,
    untrained: str | None,
    proposals: int | None,
    data: Path | None,
    limit: int | None,
    imgsz: int,
    cells: int,
    synthetic_images: int,
    warmup: int,
    iters: int | None,
    seconds: float | None,
    threads: int | None,
    options: tuple[str, ...],
    device: str,
    precision: str,
    batch: int,
    mode: str,
    concurrency: int,
    workers: int | None,
    sweep_spec: str | None,
    sweep_cells: str | None,
    sweep_sizes: str | None,
    no_memory: bool,
    isolation: str,
    block: int,
    settle: int,
    profile: bool,
    score_thresh: float,
    out_dir: Path,
    cache_dir: Path,
    seed: int,
    progress: bool,
    overwrite: bool,
    json_path: Path | None,
) -> None:
    """Measure end-to-end and per-stage latency of one or more engines on the same images.

    Engines run interleaved (A, B, A, B, ...) after warm-up; each sample is decode + inference +
    post-processing (paste, RLE) on the host clock, device synchronised. Writes bench.json (with the
    environment), bench.md and PNG plots into --out; prints the tables.

    \b
    Examples:
        cellseg-deploy bench --engine torch,onnx --model runs/tiny/best.pt --imgsz 512 --cells 150
        cellseg-deploy bench --engine torch,onnx --model ckpt.pt --model-for onnx=models/tiny.onnx --seconds 30
        cellseg-deploy bench --engine torch,onnx --untrained tiny --sweep cells,size --iters 5
        cellseg-deploy bench --engine torch,trt,trt:fp16 --device cuda --model ckpt.pt --option trt.rebuild=true
        cellseg-deploy bench --engine onnx --model-for onnx=m.onnx --data data/hw3 --limit 10 --threads 2
        cellseg-deploy bench --engine openvino,openvino:int8 --untrained r50-fpn --iters 3 --profile
        cellseg-deploy bench --engine torch,openvino:int8 --model best.pt --proposals 300
        cellseg-deploy bench --engine openvino:int8 --untrained r50-fpn --synthetic-images 32 \\
            --mode throughput --concurrency 2
    """
    # Before any export or measurement: the report folder (refused when it holds results, unless --overwrite),
    # the cache (reused by design) and --json must be writable.
    check_outputs(
        {"--out": out_dir, "--cache": cache_dir, "--json": json_path},
        overwrite=overwrite,
        folders=("--out", "--cache"),
        may_exist=("--cache",),
    )
    from cellseg_deploy.bench.api import BenchRequest, run_bench
    from cellseg_deploy.bench.models import parse_model_for
    from cellseg_deploy.bench.report import format_text_report
    from cellseg_deploy.bench.runner_bench import BenchSettings, parse_engine_specs, parse_runner_options
    from cellseg_deploy.bench.sweep import DEFAULT_CELLS, DEFAULT_SIZES, parse_int_list, parse_sweep
    from cellseg_deploy.postprocess import PostprocessConfig

    engines = parse_engine_specs(engine_spec)
    if iters is None and seconds is None:
        iters = 20
    settings = BenchSettings(
        engines=engines,
        warmup=warmup,
        iters=iters,
        seconds=seconds,
        device=device,
        precision=precision,
        threads=threads,
        batch=batch,
        mode=mode,
        concurrency=concurrency,
        workers=workers,
        memory=not no_memory,
        profile=profile,
        isolation=isolation,
        block=block,
        settle=settle,
        post=PostprocessConfig(score_thresh=score_thresh),
        runner_options=dict(parse_runner_options(options, engines)),
        progress=progress,
    )
    request = BenchRequest(
        settings=settings,
        checkpoint=checkpoint,
        model_for=parse_model_for(model_for),
        allow_mismatch=allow_mismatch,
        untrained=untrained,
        proposals=proposals,
        data=data,
        limit=limit,
        imgsz=imgsz,
        cells=cells,
        images=synthetic_images,
        seed=seed,
        sweeps=parse_sweep(sweep_spec),
        sweep_cells=parse_int_list(sweep_cells, "--sweep-cells") if sweep_cells else DEFAULT_CELLS,
        sweep_sizes=parse_int_list(sweep_sizes, "--sweep-sizes") if sweep_sizes else DEFAULT_SIZES,
        out_dir=out_dir,
        cache_dir=cache_dir,
    )
    result = run_bench(request, log=lambda msg: click.echo(msg, err=True))
    click.echo(format_text_report(result))
    click.echo(
        f"wrote {result['outputs']['json']}, {result['outputs']['markdown']} and "
        f"{len(result['outputs']['plots'])} plot(s) in {out_dir}",
        err=True,
    )
    write_json_result(json_path, result)
