"""``cellseg-deploy demo``: the whole pipeline on built-in synthetic data, with a Markdown report.

synthesise data -> check it -> train the tiny recipe -> export ONNX and the staged graphs -> parity of every
backend against PyTorch -> segm AP50 of every backend -> benchmark -> predictions zip with overlays ->
``report.md``. Nothing is downloaded. Each step is a library call; this module only orders them and writes the
report.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cellseg_deploy.cli.common import markdown_table
from cellseg_deploy.io_utils import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backend:
    """One backend the demo checks: runner name, its model file (key into the exported files) and precision."""

    label: str
    engine: str
    model: str  # "checkpoint", "onnx" or "stages"
    precision: str
    profile: str


BACKENDS: tuple[Backend, ...] = (
    Backend("onnx fp32", "onnx", "onnx", "fp32", "fp32"),
    Backend("staged-onnx fp32", "staged-onnx", "stages", "fp32", "fp32"),
    Backend("staged-onnx fp16", "staged-onnx", "stages", "fp16", "fp16"),
)


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo run.

    Attributes:
        out: the run folder (data, training run, models, reports all go below it).
        n_train / n_test / seed: the synthetic dataset.
        recipe / overrides: the training recipe (a name in ``train/`` or a path) and ``key=value`` overrides.
        bench_iters: measured rounds of the benchmark (each round runs every engine on every test image).
        max_dets: the COCOeval detection cap for the AP tables.
    """

    out: Path = Path("runs/demo")
    n_train: int = 48
    n_test: int = 8
    seed: int = 0
    recipe: str = "tiny_cpu"
    overrides: tuple[str, ...] = ()
    bench_iters: int = 5
    max_dets: int = 100


@dataclass
class DemoResult:
    """Paths and headline numbers of a finished demo."""

    report: Path
    summary_rows: list[list[Any]] = field(default_factory=list)
    steps: dict[str, float] = field(default_factory=dict)
    all_parity_passed: bool = True


def _step(name: str, steps: dict[str, float], echo: Callable[[str], None]) -> Callable[[], None]:
    echo(f"[demo] {name} ...")
    t0 = time.perf_counter()

    def done() -> None:
        steps[name] = time.perf_counter() - t0
        echo(f"[demo] {name} done in {steps[name]:.1f} s")

    return done


def run_demo(config: DemoConfig, echo: Callable[[str], None] = print) -> DemoResult:
    """Run every step (see the module docstring) and write ``config.out/report.md``."""
    from cellseg_deploy.bench.api import BenchRequest, run_bench
    from cellseg_deploy.bench.runner_bench import BenchSettings
    from cellseg_deploy.data.check import check_dataset
    from cellseg_deploy.data.synth import SynthConfig, make_synthetic_dataset
    from cellseg_deploy.evaluation.parity import run_parity
    from cellseg_deploy.evaluation.predict import evaluate_model, predict_folder
    from cellseg_deploy.export.onnx_export import export_onnx
    from cellseg_deploy.export.staged import export_staged
    from cellseg_deploy.runners import create_runner
    from cellseg_deploy.training import load_recipe, train

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    steps: dict[str, float] = {}
    data = out / "data"

    done = _step("synthesise data", steps, echo)
    make_synthetic_dataset(data, SynthConfig(n_train=config.n_train, n_test=config.n_test, seed=config.seed))
    check = check_dataset(data, progress=False)
    done()

    done = _step("train", steps, echo)
    recipe = load_recipe(config.recipe, list(config.overrides))
    trained = train(recipe, data, out / "train", overwrite=True)
    checkpoint = trained.best_checkpoint or trained.last_checkpoint
    done()

    done = _step("export", steps, echo)
    onnx_result = export_onnx(checkpoint, out / "models" / "model.onnx")
    staged_result = export_staged(checkpoint, out / "models" / "stages", fp16=True)
    models = {"checkpoint": checkpoint, "onnx": onnx_result.path, "stages": staged_result.out_dir}
    done()

    done = _step("parity", steps, echo)
    parity: dict[str, Any] = {}
    for b in BACKENDS:
        verdict = run_parity(
            checkpoint,
            models[b.model],
            b.engine,
            data,
            split="val",
            profile=b.profile,
            candidate_precision=b.precision,
            progress=False,
        )
        parity[b.label] = verdict
        echo(f"[demo]   parity {b.label}: {'PASS' if verdict.passed else 'FAIL'}")
    done()

    done = _step("evaluate", steps, echo)
    evals: dict[str, Any] = {}
    for label, engine, model, precision in [("torch fp32", "torch", "checkpoint", "fp32")] + [
        (b.label, b.engine, b.model, b.precision) for b in BACKENDS
    ]:
        evals[label] = evaluate_model(
            models[model], engine, data, "val", max_dets=config.max_dets, precision=precision, progress=False
        )
    test_eval = evaluate_model(
        onnx_result.path, "onnx", data, "test", max_dets=config.max_dets, progress=False
    )
    done()

    done = _step("benchmark", steps, echo)
    engines = ("torch", "onnx", "staged-onnx")
    bench = run_bench(
        BenchRequest(
            settings=BenchSettings(engines=engines, warmup=1, iters=config.bench_iters, memory=False),
            checkpoint=checkpoint,
            model_for={"onnx": onnx_result.path, "staged-onnx": staged_result.out_dir},
            data=data / "test_release",
            out_dir=out / "bench",
            cache_dir=out / "bench-cache",
        )
    )
    done()

    done = _step("predict", steps, echo)
    with create_runner("onnx", onnx_result.path) as runner:
        summary = predict_folder(
            runner,
            data / "test_release",
            data / "test_image_name_to_ids.json",
            out / "submission.zip",
            overlays_dir=out / "overlays",
            progress=False,
        )
    done()

    rows = _summary_rows(evals, parity, bench)
    report = write_report(
        out,
        config,
        check,
        trained,
        onnx_result,
        staged_result,
        parity,
        evals,
        test_eval,
        bench,
        summary,
        steps,
        rows,
    )
    atomic_write_json(out / "demo.json", {"steps_s": steps, "summary": rows, "report": str(report)})
    return DemoResult(report, rows, steps, all(p.passed for p in parity.values()))


def _ap50(result: Any) -> float | None:
    value = result.metrics["segm"]["AP50"]
    return None if value is None else float(value)


def _summary_rows(evals: dict[str, Any], parity: dict[str, Any], bench: dict[str, Any]) -> list[list[Any]]:
    engines: dict[str, Any] = bench.get("engines", {})
    rows = []
    for label, result in evals.items():
        engine = label.split()[0]
        par = parity.get(label)
        lat = engines.get(engine, {}).get("latency", {}).get("p50_ms") if label.endswith("fp32") else None
        rows.append(
            [
                label,
                _fmt(_ap50(result)),
                "reference" if par is None else ("PASS" if par.passed else "FAIL"),
                "-" if lat is None else f"{lat:.1f}",
            ]
        )
    return rows


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def write_report(
    out: Path,
    config: DemoConfig,
    check: Any,
    trained: Any,
    onnx_result: Any,
    staged_result: Any,
    parity: dict[str, Any],
    evals: dict[str, Any],
    test_eval: Any,
    bench: dict[str, Any],
    summary: Any,
    steps: dict[str, float],
    rows: list[list[Any]],
) -> Path:
    """Write ``out/report.md`` (links are relative to ``out``)."""

    def rel(p: Any) -> str:
        return str(Path(p).resolve().relative_to(out.resolve()))

    s = check.stats
    lines = [
        "# cellseg-deploy demo report",
        "",
        f"Everything below was produced by `cellseg-deploy demo --out {config.out}` on synthetic data "
        "(nothing downloaded). Times are wall-clock on this machine.",
        "",
        "## Summary",
        "",
        markdown_table(rows, ["backend", "segm AP50 (val)", "parity vs torch", "latency p50 (ms)"]),
        "",
        markdown_table([[k, f"{v:.1f}"] for k, v in steps.items()], ["step", "seconds"]),
        "",
        "## Data",
        "",
        f"{s['n_train']} training and {s['n_test']} test images, heights {s['height']} px, widths {s['width']} px; "
        f"instances per class {s['instances_per_class']}; most in one image: {s['max_instances']}.",
        "",
        "## Training",
        "",
        f"Recipe `{config.recipe}`; {trained.epochs} epochs, {trained.steps} steps in {trained.seconds:.0f} s "
        f"(stopped: {trained.stop_reason}). Best validation metrics: "
        + ", ".join(f"{k} {v:.4f}" for k, v in trained.best_metrics.items() if isinstance(v, float)),
        "",
        f"![training curves]({rel(trained.out_dir / 'curves.png')})",
        "",
        "## Export",
        "",
        f"- ONNX: `{rel(onnx_result.path)}` ({onnx_result.size_bytes / 1e6:.1f} MB, {onnx_result.seconds:.1f} s)",
        f"- staged graphs (fp32 and fp16): `{rel(staged_result.out_dir)}` ({staged_result.seconds:.1f} s)",
        "",
        "## Parity against PyTorch",
        "",
    ]
    prow = []
    for label, rep in parity.items():
        o = rep.overall
        prow.append(
            [
                label,
                rep.profile.name,
                "PASS" if rep.passed else "FAIL",
                o.get("matched"),
                o.get("missed"),
                o.get("extra"),
                _num(o.get("max_box_diff")),
                _num(o.get("min_iou")),
                _num(o.get("agreement")),
            ]
        )
    lines += [
        markdown_table(
            prow,
            [
                "backend",
                "profile",
                "verdict",
                "matched",
                "missed",
                "extra",
                "max box diff (px)",
                "min mask IoU",
                "agreement",
            ],
        ),
        "",
    ]
    for label, rep in parity.items():
        if rep.failures:
            lines += [f"- {label} failures: " + "; ".join(rep.failures)]
    lines += ["", "## Accuracy (segm, validation split)", ""]
    arow = []
    for label, result in evals.items():
        m = result.metrics["segm"]
        arow.append(
            [
                label,
                _fmt(m["AP"]),
                _fmt(m["AP50"]),
                _fmt(m["AP75"]),
                ", ".join(f"{k} {_fmt(v)}" for k, v in m["per_class_AP50"].items()),
                m["num_detections"],
            ]
        )
    lines += [
        markdown_table(arow, ["backend", "AP", "AP50", "AP75", "per-class AP50", "detections"]),
        "",
        f"Detection cap: {next(iter(evals.values())).max_dets} per image and category (COCOeval maxDets).",
        f"Test split (ONNX Runtime): segm AP50 {_fmt(_ap50(test_eval))}.",
        "",
        "## Speed",
        "",
    ]
    outputs = bench.get("outputs", {})
    if outputs.get("markdown"):
        lines += [Path(outputs["markdown"]).read_text().replace("](", "](bench/"), ""]
    lines += [
        "## Predictions",
        "",
        f"Submission: `{rel(summary.out_zip)}` ({summary.num_detections} detections on {summary.num_predicted} "
        "test images).",
        "",
    ]
    overlays = sorted(Path(summary.overlays_dir).glob("*.png"))[:3] if summary.overlays_dir else []
    lines += [f"![{p.stem}]({rel(p)})" for p in overlays]
    return atomic_write_text(out / "report.md", "\n".join(lines) + "\n")


def _num(v: Any) -> str:
    return "n/a" if v is None else f"{float(v):.4g}"
