"""Check the benchmark against an outside measurement of the same work.

The benchmark's end-to-end mean latency of one engine (``cellseg_deploy.bench``: decode + infer + post-process,
per image) must agree within a tolerance (10 %) with the wall time of ``predict_folder``
(``cellseg_deploy.evaluation.predict``: the prediction command's library call) over the same images divided
by their number. The two share the runner and the post-processing but not their timing code: this catches a
benchmark that leaves work out of its samples, times the wrong interval, or reports warm-up.

What each side includes beyond the shared work: ``predict_folder`` also lists the folder, converts instances
to result records and writes the submission zip and JSON once per call (a few milliseconds per call, spread
over the images); the benchmark also synchronises the device (a no-op on the CPU). Blocks of the two
measurements alternate so that a drift in machine load affects both.

``--mode throughput`` checks the other figure the same way: the benchmark's images per second
(``bench --mode throughput``: each engine alone through the pipelined loop, with ``--workers``,
``--concurrency`` and ``--batch``) against ``predict_folder`` over the same images with the same loop settings,
images / wall time of each call. Both sides reuse one loaded runner, so neither counts loading the model.

Usage (the suite runs it as a stage; standalone)::

    python benchmarks/check_outside.py --engine onnx --model-for onnx=models/tiny.onnx --images-dir DIR
    python benchmarks/check_outside.py --engine torch --untrained tiny --cells 150 --imgsz 512 --out results/
    python benchmarks/check_outside.py --engine openvino:int8 --untrained r50-fpn --images 32 --mode throughput \
        --workers 2 --concurrency 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from cellseg_deploy.bench.models import EngineModel, build_untrained_checkpoint, resolve_engine_models
from cellseg_deploy.bench.runner_bench import BenchSettings, run_benchmark, split_label
from cellseg_deploy.bench.stats import relative_difference, summarize
from cellseg_deploy.bench.workload import folder_workload, synthetic_workload
from cellseg_deploy.evaluation.pipeline import PipelineSettings
from cellseg_deploy.io_utils import atomic_write_json
from cellseg_deploy.postprocess import PostprocessConfig

TOLERANCE = 0.10


def check_outside(
    engine: str,
    model: EngineModel,
    images_dir: Path,
    *,
    rounds: int = 5,
    blocks: int = 3,
    warmup: int = 2,
    device: str = "cpu",
    threads: int | None = None,
    post: PostprocessConfig | None = None,
    options: dict[str, Any] | None = None,
    tolerance: float = TOLERANCE,
    mode: str = "latency",
    pipeline: PipelineSettings | None = None,
) -> dict[str, Any]:
    """Alternate ``blocks`` benchmark runs and ``blocks`` outside runs over the images of ``images_dir``.

    Each benchmark block: ``warmup`` untimed rounds then ``rounds`` measured rounds of every image
    (:func:`run_benchmark`, one engine, no memory probe). Each outside block: ``warmup`` untimed calls of
    ``predict_folder`` then ``rounds`` timed ones, each timed as a whole with ``time.perf_counter`` and divided
    by the images it predicted.

    ``engine`` is an engine label (``runner`` or ``runner:precision``); ``options`` are its runner's options.

    ``mode="throughput"`` compares images per second instead (the benchmark's ``throughput.images_per_s``
    against images / wall time of each ``predict_folder`` call), both through the loop of ``pipeline``
    (default: predict's own default for the device).

    Returns a JSON-ready dict with both figures (ms per image in latency mode, images/s in throughput mode),
    their relative difference and ``passed``.
    """
    from cellseg_deploy.backends import create_runner
    from cellseg_deploy.evaluation.predict import predict_folder

    post = post or PostprocessConfig()
    runner_name, precision = split_label(engine)
    options = dict(options or {})
    workload = folder_workload(images_dir)
    n_images = len(workload.images)
    if mode == "throughput" and pipeline is None:
        pipeline = PipelineSettings(workers=0)
    loop = pipeline if mode == "throughput" else None
    settings = BenchSettings(
        engines=(engine,),
        mode=mode,
        **(
            {"workers": loop.workers, "concurrency": loop.concurrency, "batch": loop.batch}
            if loop is not None
            else {}
        ),
        warmup=warmup,
        iters=rounds,
        device=device,
        threads=threads,
        memory=False,
        post=post,
        runner_options={runner_name: options},
        progress=False,
    )
    bench_figures: list[float] = []
    outside_per_image_s: list[float] = []
    with (
        tempfile.TemporaryDirectory(prefix="check-outside-") as tmp,
        create_runner(
            runner_name,
            model.path,
            device=device,
            precision=precision or "fp32",
            threads=threads,
            # the loop's own needs (OpenVINO's streams for concurrency), as the benchmark's runner gets them
            options={**(loop.runner_options(runner_name) if loop is not None else {}), **options},
        ) as runner,
    ):
        out_zip = Path(tmp) / "submission.zip"
        for _ in range(blocks):
            result = run_benchmark(settings, {engine: model}, workload)
            entry = result["engines"][engine]
            bench_figures.append(
                entry["throughput"]["images_per_s"] if loop is not None else entry["latency"]["mean_ms"]
            )
            for i in range(warmup + rounds):
                t0 = time.perf_counter()
                summary = predict_folder(
                    runner,
                    images_dir,
                    None,
                    out_zip,
                    post=post,
                    progress=False,
                    **({"pipeline": loop} if loop is not None else {}),
                )
                seconds = time.perf_counter() - t0
                if summary.num_predicted != n_images:
                    raise RuntimeError(
                        f"predict_folder predicted {summary.num_predicted} of {n_images} images"
                    )
                if i >= warmup:
                    outside_per_image_s.append(seconds / n_images)
    outside = summarize(outside_per_image_s)
    if loop is not None:
        return _throughput_result(
            engine, model, workload, rounds, blocks, bench_figures, outside_per_image_s, loop, tolerance
        )
    bench_ms = float(np.mean(bench_figures))
    rel = relative_difference(bench_ms, outside.mean_ms)
    return {
        "engine": engine,
        "mode": "latency",
        "model": model.to_dict(),
        "images": n_images,
        "workload": workload.to_dict(),
        "rounds_per_block": rounds,
        "blocks": blocks,
        "bench_mean_ms_per_image": round(bench_ms, 3),
        "bench_block_means_ms": [round(v, 3) for v in bench_figures],
        "outside_mean_ms_per_image": round(outside.mean_ms, 3),
        "outside": outside.to_dict(),
        "relative_difference": round(rel, 4),
        "tolerance": tolerance,
        "passed": abs(rel) <= tolerance,
        "outside_method": "wall time of cellseg_deploy.evaluation.predict.predict_folder over the folder "
        "(read, infer, post-process, result records, zip + JSON written) / number of images",
    }


def _throughput_result(
    engine: str,
    model: EngineModel,
    workload: Any,
    rounds: int,
    blocks: int,
    bench_ips: list[float],
    outside_per_image_s: list[float],
    loop: PipelineSettings,
    tolerance: float,
) -> dict[str, Any]:
    """The throughput comparison: mean images/s of the benchmark's blocks against predict_folder's calls."""
    outside_ips = [1.0 / s for s in outside_per_image_s]
    bench = float(np.mean(bench_ips))
    outside = float(np.mean(outside_ips))
    rel = relative_difference(bench, outside)
    return {
        "engine": engine,
        "mode": "throughput",
        "pipeline": {"workers": loop.workers, "concurrency": loop.concurrency, "batch": loop.batch},
        "model": model.to_dict(),
        "images": len(workload.images),
        "workload": workload.to_dict(),
        "rounds_per_block": rounds,
        "blocks": blocks,
        "bench_images_per_s": round(bench, 4),
        "bench_block_images_per_s": [round(v, 4) for v in bench_ips],
        "outside_images_per_s": round(outside, 4),
        "outside_call_images_per_s": [round(v, 4) for v in outside_ips],
        "relative_difference": round(rel, 4),
        "tolerance": tolerance,
        "passed": abs(rel) <= tolerance,
        "outside_method": "images / wall time of one cellseg_deploy.evaluation.predict.predict_folder call over "
        "the folder with the same loop settings (read, infer, post-process, result records, zip + JSON written)",
    }


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--engine", required=True, help="runner name, e.g. torch or onnx")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--model", type=Path, help="checkpoint (.pt); other engines get an ONNX export in --cache"
    )
    src.add_argument("--model-for", help="ENGINE=PATH: the engine's own model file")
    src.add_argument("--untrained", metavar="ARCH", help="random-weight ARCH with detections = --cells")
    p.add_argument(
        "--images-dir", type=Path, help="folder of TIFF images (default: synthetic images in --cache)"
    )
    p.add_argument("--imgsz", type=int, default=512)
    p.add_argument("--cells", type=int, default=150)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--blocks", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--mode", choices=("latency", "throughput"), default="latency")
    p.add_argument("--workers", type=int, default=0, help="--mode throughput: host threads of the loop")
    p.add_argument("--concurrency", type=int, default=1, help="--mode throughput: inference calls in flight")
    p.add_argument("--batch", type=int, default=1, help="--mode throughput: images per call")
    p.add_argument("--cache", type=Path, default=Path("runs/bench-cache"))
    p.add_argument("--json", type=Path, default=None, help="write the result here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: prints the comparison, writes ``--json``, exits 1 when it does not pass."""
    from cellseg_deploy.bench.models import parse_model_for

    args = _parse(argv)
    if args.untrained:
        ckpt = build_untrained_checkpoint(
            args.cache / "untrained" / f"{args.untrained}-det{args.cells}-min512-seed0.pt",
            args.untrained,
            args.cells,
        )
        model = resolve_engine_models([args.engine], checkpoint=ckpt, cache_dir=args.cache)[args.engine]
    elif args.model:
        model = resolve_engine_models([args.engine], checkpoint=args.model, cache_dir=args.cache)[args.engine]
    else:
        model = resolve_engine_models([args.engine], model_for=parse_model_for([args.model_for]))[args.engine]
    images_dir = args.images_dir
    if images_dir is None:
        folder = args.cache / "workloads" / f"outside-{args.imgsz}px-{args.cells}cells-{args.images}img"
        images_dir = (
            synthetic_workload(folder, args.imgsz, args.imgsz, args.cells, images=args.images)
            .images[0]
            .path.parent
        )
    result = check_outside(
        args.engine,
        model,
        images_dir,
        rounds=args.rounds,
        blocks=args.blocks,
        warmup=args.warmup,
        device=args.device,
        threads=args.threads,
        mode=args.mode,
        pipeline=PipelineSettings(workers=args.workers, concurrency=args.concurrency, batch=args.batch)
        if args.mode == "throughput"
        else None,
    )
    print(format_check(result))
    if args.json:
        atomic_write_json(args.json, result)
    return 0 if result["passed"] else 1


def format_check(result: dict[str, Any]) -> str:
    """One line: both means, the difference, and the verdict."""
    verdict = "PASS" if result["passed"] else "FAIL"
    if result.get("mode") == "throughput":
        return (
            f"{verdict} {result['engine']} {result['pipeline']}: benchmark {result['bench_images_per_s']:.3f} "
            f"images/s vs predict_folder {result['outside_images_per_s']:.3f} images/s over {result['images']} "
            f"images: {100 * result['relative_difference']:+.1f}% (tolerance {100 * result['tolerance']:.0f}%)"
        )
    return (
        f"{verdict} {result['engine']}: benchmark {result['bench_mean_ms_per_image']:.2f} ms/image vs predict_folder "
        f"{result['outside_mean_ms_per_image']:.2f} ms/image over {result['images']} images: "
        f"{100 * result['relative_difference']:+.1f}% (tolerance {100 * result['tolerance']:.0f}%)"
    )


if __name__ == "__main__":
    sys.exit(main())
