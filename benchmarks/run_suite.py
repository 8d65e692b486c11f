"""The standard benchmark suite: every available engine, the tiny and R50 architectures, small and large
images, sparse and dense, two sweeps, and the outside-measurement check. Writes ``benchmarks/results/``.

Models: the suite builds its own, untrained, with a controlled detection count (``--untrained`` in
``cellseg-deploy bench``, see ``cellseg_deploy/bench/models.py``): random weights, score threshold 0 and
``detections_per_img`` equal to the image's cell count, so every engine does the work of exactly that many
detections (mask head, pasting, RLE) on every image. Engines that read another file than the checkpoint get
one exported from it. Nothing is downloaded and nothing is trained.

Usage::

    python benchmarks/run_suite.py                 # the full suite -> benchmarks/results/ (quiet machine!)
    python benchmarks/run_suite.py --quick         # a reduced run, to check the script -> runs/bench-suite-quick/
    python benchmarks/run_suite.py --device cuda   # on a GPU machine

Exit code 0 when every stage ran and the outside check passed; 1 when a stage failed (its error is in the
summary, the other stages still ran) or the check did not pass.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from check_outside import check_outside, format_check  # noqa: E402

from cellseg_deploy.backends import create_runner, get_runner_class, list_runners  # noqa: E402
from cellseg_deploy.bench.api import BenchRequest, run_bench  # noqa: E402
from cellseg_deploy.bench.environment import capture_environment  # noqa: E402
from cellseg_deploy.bench.models import EXPORTERS, build_untrained_checkpoint, resolve_engine_models  # noqa: E402
from cellseg_deploy.bench.report import (  # noqa: E402
    MAIN_HEADERS,
    STAGE_HEADERS,
    main_rows,
    stage_rows,
    sweep_rows,
)
from cellseg_deploy.bench.runner_bench import BenchSettings, parse_engine_specs, split_label  # noqa: E402
from cellseg_deploy.bench.workload import synthetic_workload  # noqa: E402
from cellseg_deploy.io_utils import atomic_write_json, atomic_write_text  # noqa: E402
from cellseg_deploy.tables import markdown_table  # noqa: E402


@dataclass(frozen=True)
class Plan:
    """Sizes and counts of a suite run (full or quick)."""

    archs: tuple[str, ...]
    cases: tuple[tuple[str, int, int], ...]  # (case name, image side px, cells)
    images: int
    warmup: int
    iters: dict[str, int]  # measured rounds per architecture
    sweep_archs: tuple[str, ...]
    sweep_cells: tuple[int, ...]
    sweep_sizes: tuple[int, ...]
    sweep_iters: dict[str, int]
    sweep_fixed_size: int
    sweep_fixed_cells: int
    min_size: int
    outside: dict[str, int]


FULL = Plan(
    archs=("tiny", "r50-fpn"),
    # 512 px sparse and at the issue's ~150 cells; a large dense image (800 px, 500 cells) at its own size.
    cases=(("512-sparse", 512, 30), ("512-150", 512, 150), ("800-dense", 800, 500)),
    images=1,
    warmup=2,
    iters={"tiny": 10, "r50-fpn": 5},
    sweep_archs=("tiny",),
    sweep_cells=(25, 100, 250, 500),
    sweep_sizes=(256, 512, 1024),
    sweep_iters={"tiny": 3},
    sweep_fixed_size=512,
    sweep_fixed_cells=150,
    min_size=512,
    outside={"imgsz": 512, "cells": 150, "images": 2, "rounds": 2, "blocks": 3, "warmup": 1},
)
QUICK = Plan(
    archs=("tiny",),
    cases=(("256-sparse", 256, 8), ("256-dense", 256, 60), ("768-dense", 768, 100)),
    images=1,
    warmup=1,
    iters={"tiny": 2},
    sweep_archs=("tiny",),
    sweep_cells=(10, 40),
    sweep_sizes=(192, 384),
    sweep_iters={"tiny": 1},
    sweep_fixed_size=256,
    sweep_fixed_cells=20,
    min_size=256,
    outside={"imgsz": 256, "cells": 30, "images": 2, "rounds": 2, "blocks": 1, "warmup": 1},
)


EXTRA_PRECISIONS = {"cpu": ("bf16", "int8"), "cuda": ("fp16",)}
"""Besides fp32, each runner that supports them also runs at these precisions (``runner:precision``)."""


RUNNER_OPTIONS: dict[str, dict[str, Any]] = {"trt": {"rebuild": True}}
"""Backend options the suite sets: TensorRT builds its engines from the exported stage folder (once, cached)."""


def candidate_engines(explicit: str | None, device: str) -> tuple[list[str], dict[str, str]]:
    """Engine labels the suite can run: installed, available here, with a model it can make itself; each at
    fp32 and, where the runner supports them, at the device's reduced precisions (bf16 and int8 on CPU, fp16 on
    CUDA)."""
    if explicit:
        return list(parse_engine_specs(explicit)), {}
    labels: list[str] = []
    skipped: dict[str, str] = {}
    extras = EXTRA_PRECISIONS["cuda" if device.startswith("cuda") else "cpu"]
    for name in list_runners():
        try:
            cls = get_runner_class(name)
        except Exception as exc:  # a runner module whose backend is missing may fail to import
            skipped[name] = f"cannot import: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            continue
        reason = cls.unavailable_reason()
        if reason is not None:
            skipped[name] = reason
            continue
        suffixes = tuple(s.lower() for s in cls.model_suffixes)
        if not (".pt" in suffixes or any(e.suffix in suffixes for e in EXPORTERS)):
            skipped[name] = (
                f"reads {', '.join(suffixes) or 'other files'}, which the suite cannot export yet "
                "(add an exporter to cellseg_deploy.bench.models.EXPORTERS)"
            )
            continue
        labels.append(name)
        labels += [f"{name}:{extra}" for extra in extras if extra in cls.precisions]
    return labels, skipped


def preflight(
    engines: list[str], cache: Path, device: str, threads: int | None, min_size: int, skipped: dict[str, str]
) -> list[str]:
    """Load each engine once on a small untrained tiny model; drop (and record) those that fail here."""
    ckpt = build_untrained_checkpoint(
        cache / "untrained" / f"tiny-det10-min{min_size}-seed0.pt", "tiny", 10, min_size=min_size
    )
    good = []
    for label in engines:
        name, precision = split_label(label)
        try:
            model = resolve_engine_models([label], checkpoint=ckpt, cache_dir=cache)[label]
            with create_runner(
                name,
                model.path,
                device=device,
                precision=precision or "fp32",
                threads=threads,
                options=RUNNER_OPTIONS.get(name, {}),
            ):
                pass
            good.append(label)
        except Exception as exc:
            skipped[label] = (
                f"failed to load on {device}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            )
    return good


def _settings(
    engines: list[str], plan: Plan, device: str, threads: int | None, *, iters: int, memory: bool
) -> BenchSettings:
    return BenchSettings(
        engines=tuple(engines),
        warmup=plan.warmup,
        iters=iters,
        device=device,
        threads=threads,
        memory=memory,
        runner_options={
            k: v for k, v in RUNNER_OPTIONS.items() if any(split_label(e)[0] == k for e in engines)
        },
        progress=True,
    )


def run_cases(
    plan: Plan, engines: list[str], out: Path, cache: Path, device: str, threads: int | None, log: Any
) -> list[dict[str, Any]]:
    """Every (architecture, case): a full benchmark with memory probes."""
    results = []
    for arch in plan.archs:
        for case_name, imgsz, cells in plan.cases:
            name = f"{arch}_{case_name}"
            log(f"== case {name}: {imgsz} px, {cells} cells, engines {','.join(engines)}")
            request = BenchRequest(
                settings=_settings(engines, plan, device, threads, iters=plan.iters[arch], memory=True),
                untrained=arch,
                untrained_min_size=plan.min_size,
                imgsz=imgsz,
                cells=cells,
                images=plan.images,
                out_dir=out / name,
                cache_dir=cache,
            )
            entry: dict[str, Any] = {"case": name, "arch": arch, "imgsz": imgsz, "cells": cells}
            try:
                entry["result"] = run_bench(request, log=log)
            except Exception as exc:  # one broken case must not lose the others' results
                entry["error"] = _error_line(exc)
                log(f"case {name} failed: {entry['error']}")
            results.append(entry)
    return results


def run_sweeps(
    plan: Plan, engines: list[str], out: Path, cache: Path, device: str, threads: int | None, log: Any
) -> list[dict[str, Any]]:
    """Per architecture: latency against cells and against image size (no memory probes)."""
    results = []
    for arch in plan.sweep_archs:
        name = f"{arch}_sweeps"
        log(f"== sweeps {name}")
        request = BenchRequest(
            settings=_settings(engines, plan, device, threads, iters=plan.sweep_iters[arch], memory=False),
            untrained=arch,
            untrained_min_size=plan.min_size,
            imgsz=plan.sweep_fixed_size,
            cells=plan.sweep_fixed_cells,
            images=1,
            sweeps=("cells", "size"),
            sweep_cells=plan.sweep_cells,
            sweep_sizes=plan.sweep_sizes,
            out_dir=out / name,
            cache_dir=cache,
        )
        entry: dict[str, Any] = {"case": name, "arch": arch}
        try:
            entry["result"] = run_bench(request, log=log)
        except Exception as exc:
            entry["error"] = _error_line(exc)
            log(f"sweeps {name} failed: {entry['error']}")
        results.append(entry)
    return results


def run_outside(
    plan: Plan, engines: list[str], cache: Path, device: str, threads: int | None, log: Any
) -> list[dict[str, Any]]:
    """The outside-measurement check on the tiny architecture for every engine."""
    o = plan.outside
    ckpt = build_untrained_checkpoint(
        cache / "untrained" / f"tiny-det{o['cells']}-min{plan.min_size}-seed0.pt",
        "tiny",
        o["cells"],
        min_size=plan.min_size,
    )
    folder = cache / "workloads" / f"outside-{o['imgsz']}px-{o['cells']}cells-{o['images']}img"
    images_dir = (
        synthetic_workload(folder, o["imgsz"], o["imgsz"], o["cells"], images=o["images"])
        .images[0]
        .path.parent
    )
    checks = []
    for engine in engines:
        name = split_label(engine)[0]
        model = resolve_engine_models([engine], checkpoint=ckpt, cache_dir=cache)[engine]
        log(f"== outside check {engine}")
        check = check_outside(
            engine,
            model,
            images_dir,
            rounds=o["rounds"],
            blocks=o["blocks"],
            warmup=o["warmup"],
            device=device,
            threads=threads,
            options=RUNNER_OPTIONS.get(name, {}),
        )
        log(format_check(check))
        checks.append(check)
    return checks


def _error_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"


def summary_markdown(summary: dict[str, Any]) -> str:
    """``summary.md``: how it was made, the environment, one table per case, sweeps, the outside check."""
    env = summary["environment"]
    md = [
        "# cellseg-deploy benchmark suite",
        "",
        f"Made by `{summary['command']}` on {summary['created']} in {summary['seconds'] / 60:.1f} min "
        f"(commit `{env.get('git_commit')}`). Regenerate with the same command (see `benchmarks/README.md`).",
        "",
        "## Environment",
        "",
        f"- CPU: {env['cpu']['model']}, {env['cpu']['usable_cores']} usable cores; RAM {env['memory_total_mb'] / 1024:.1f} GiB",
        f"- GPU: {env['gpu']['name'] if env.get('gpu') and env['gpu'].get('available') else 'none used'}",
        f"- OS: {env['os']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v),
        f"- threads per runner: {summary['threads']}; device: {summary['device']}",
        f"- load average at start: {env.get('load_average')}",
        "",
        "## What is measured",
        "",
        "- Models: untrained (random weights, seed 0), score threshold 0 and `detections_per_img` = the image's cell "
        "count, so each engine returns exactly that many detections on every image (checked: `dets/img`). Network "
        "cost, pasting and RLE therefore match a trained model with that many detections; box sizes come from "
        "random proposals (the anchor sizes), not from cells. Input size: short side "
        f"{summary['plan']['min_size']} px (torchvision resizing).",
        "- Each sample: decode the TIFF (page-cached) + inference + the shared post-processing (paste, RLE), host wall "
        "clock, device synchronised; engines interleaved, order flipped each round; warm-up excluded. Stage "
        "definitions are in each case's `bench.md`.",
        "- Memory: each engine alone in a fresh process (`peak RSS MB`; `+model MB` over the process before loading).",
        f"- Engines run: {', '.join(summary['engines'])}. Skipped: "
        + ("; ".join(f"{k} ({v})" for k, v in summary["skipped_engines"].items()) or "none")
        + ".",
    ]
    for case in summary["cases"]:
        if "error" in case:
            md += ["", f"## {case['case']}", "", f"FAILED: {case['error']}"]
            continue
        r = case["result"]
        md += [
            "",
            f"## {case['case']} ({case['imgsz']} x {case['imgsz']} px, {case['cells']} cells)",
            "",
            markdown_table(main_rows(r), MAIN_HEADERS),
            "",
            markdown_table(stage_rows(r), STAGE_HEADERS),
            "",
            f"Details and plots: [`{case['case']}/bench.md`]({case['case']}/bench.md)",
        ]
        md += [f"- warning: {w}" for w in r.get("warnings", [])]
    for sweep_case in summary["sweeps"]:
        if "error" in sweep_case:
            md += ["", f"## {sweep_case['case']}", "", f"FAILED: {sweep_case['error']}"]
            continue
        for kind, sweep in sweep_case["result"].get("sweeps", {}).items():
            headers, rows = sweep_rows(sweep)
            md += [
                "",
                f"## {sweep_case['arch']}: {sweep['description']}",
                "",
                markdown_table(rows, headers),
                "",
                f"![latency vs {kind}]({sweep_case['case']}/latency_vs_{kind}.png)",
            ]
    md += [
        "",
        "## Outside check",
        "",
        "The benchmark's end-to-end mean per image against the wall time of `predict_folder` over the same images "
        "divided by their number (`benchmarks/check_outside.py`).",
        "",
    ]
    md += [f"- {format_check(c)}" for c in summary["outside_checks"]]
    return "\n".join(md) + "\n"


def _slim(result: dict[str, Any]) -> dict[str, Any]:
    """A case's result without raw samples (those stay in the case's own bench.json)."""
    out = {k: v for k, v in result.items() if k not in ("environment", "definitions")}
    out["engines"] = {
        n: {k: v for k, v in e.items() if k not in ("samples_ms", "per_image")}
        for n, e in result["engines"].items()
    }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run the standard benchmark suite.")
    p.add_argument(
        "--quick", action="store_true", help="reduced sizes and iterations (checks the script end to end)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results folder (default benchmarks/results, or runs/bench-suite-quick with --quick)",
    )
    p.add_argument("--cache", type=Path, default=Path("runs/bench-cache"), help="models and images (reused)")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads per runner (default: the cores this process may use)",
    )
    p.add_argument("--engines", default=None, help="comma-separated engines (default: every available one)")
    p.add_argument("--skip-sweeps", action="store_true")
    p.add_argument("--skip-outside", action="store_true")
    args = p.parse_args(argv)
    plan = QUICK if args.quick else FULL
    out: Path = args.out or (Path("runs/bench-suite-quick") if args.quick else HERE / "results")
    threads = args.threads or (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    )
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    engines, skipped = candidate_engines(args.engines, args.device)
    engines = preflight(engines, args.cache, args.device, threads, plan.min_size, skipped)
    if not engines:
        log(f"no engine can run here: {skipped}")
        return 2
    log(f"engines: {', '.join(engines)}; skipped: {skipped or 'none'}; threads {threads}; out {out}")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    environment = capture_environment(args.device, threads)
    cases = run_cases(plan, engines, out, args.cache, args.device, threads, log)
    sweeps = [] if args.skip_sweeps else run_sweeps(plan, engines, out, args.cache, args.device, threads, log)
    checks = [] if args.skip_outside else run_outside(plan, engines, args.cache, args.device, threads, log)
    if checks:
        atomic_write_json(out / "check_outside.json", checks)
    summary = {
        "schema": "cellseg-deploy/bench-suite/1",
        "command": "python benchmarks/run_suite.py"
        + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - t_start, 1),
        "quick": args.quick,
        "device": args.device,
        "threads": threads,
        "plan": plan.__dict__,
        "engines": engines,
        "skipped_engines": skipped,
        "environment": environment,
        "cases": [{**c, "result": _slim(c["result"])} if "result" in c else c for c in cases],
        "sweeps": [{**s, "result": _slim(s["result"])} if "result" in s else s for s in sweeps],
        "outside_checks": checks,
    }
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", summary_markdown(summary))
    log(f"wrote {out / 'summary.md'} and {out / 'summary.json'} in {summary['seconds'] / 60:.1f} min")
    for c in checks:
        log(format_check(c))
    failed = [c["case"] for c in cases + sweeps if "error" in c]
    if failed:
        log(f"failed stages: {', '.join(failed)}")
    return 0 if all(c["passed"] for c in checks) and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
