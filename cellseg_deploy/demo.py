"""``cellseg-deploy demo``: the whole pipeline on built-in synthetic data, with a Markdown report.

synthesise data -> check it -> train the tiny recipe -> the scorecard of every backend in :data:`DEMO_ENGINES`
(:func:`~cellseg_deploy.bench.scorecard.run_scorecard`: export, segm AP50/AP, parity against PyTorch,
benchmark, peak memory; backends that cannot run here are listed as skipped, with why) -> test-split AP and a
predictions zip with overlays (ONNX Runtime) -> ``report.md``, whose summary is the scorecard's table. Nothing
is downloaded. Each step is a library call; this module only orders them and writes the report.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cellseg_deploy.io_utils import atomic_write_json, atomic_write_text
from cellseg_deploy.tables import format_metric, markdown_table

log = logging.getLogger(__name__)


DEMO_ENGINES: tuple[str, ...] = (
    "torch",
    "onnx",
    "openvino",
    "openvino:bf16",
    "openvino:int8",
    "staged-onnx",
    "staged-onnx:fp16",
    "trt:fp16",
)
"""Every backend and precision the demo measures; those that cannot run here are listed as skipped, with why."""

SUMMARY_HEADERS = ["backend", "segm AP50 (val)", "parity vs torch", "latency p50 (ms)"]


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo run.

    Attributes:
        out: the run folder (data, training run, models, reports all go below it).
        n_train / n_test / seed: the synthetic dataset.
        recipe / overrides: the training recipe (a name in ``train/`` or a path) and ``key=value`` overrides.
        bench_iters: measured rounds of the benchmark (each round runs every engine on every test image).
        max_dets: the COCOeval detection cap for the AP tables.
        engines: what the scorecard measures (those that cannot run here are listed as skipped).
        progress: progress bars on stderr for the long steps (synthesis, training).
    """

    out: Path = Path("runs/demo")
    n_train: int = 48
    n_test: int = 8
    seed: int = 0
    recipe: str = "tiny_cpu"
    overrides: tuple[str, ...] = ()
    bench_iters: int = 5
    max_dets: int = 100
    engines: tuple[str, ...] = DEMO_ENGINES
    progress: bool = True


@dataclass
class DemoResult:
    """Paths and headline numbers of a finished demo (``summary_rows``: :data:`SUMMARY_HEADERS`;
    ``skipped``: engine -> why it could not run here; ``scorecard_text``: the scorecard's full table and its
    ``skipped ENGINE: why`` lines, as ``cellseg-deploy scorecard`` prints them)."""

    report: Path
    summary_rows: list[list[Any]] = field(default_factory=list)
    steps: dict[str, float] = field(default_factory=dict)
    all_parity_passed: bool = True
    skipped: dict[str, str] = field(default_factory=dict)
    scorecard_text: str = ""


def _step(name: str, steps: dict[str, float], echo: Callable[[str], None]) -> Callable[[], None]:
    echo(f"[demo] {name} ...")
    t0 = time.perf_counter()

    def done() -> None:
        steps[name] = time.perf_counter() - t0
        echo(f"[demo] {name} done in {steps[name]:.1f} s")

    return done


def run_demo(config: DemoConfig, echo: Callable[[str], None] = print) -> DemoResult:
    """Run every step (see the module docstring) and write ``config.out/report.md``."""
    from cellseg_deploy.backends import create_runner
    from cellseg_deploy.bench.scorecard import ScorecardRequest, run_scorecard, summary_text
    from cellseg_deploy.data.check import check_dataset
    from cellseg_deploy.data.synth import SynthConfig, make_synthetic_dataset
    from cellseg_deploy.evaluation.predict import evaluate_model, predict_folder
    from cellseg_deploy.training import load_recipe, train

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    steps: dict[str, float] = {}
    data = out / "data"

    done = _step("synthesise data", steps, echo)
    make_synthetic_dataset(
        data,
        SynthConfig(n_train=config.n_train, n_test=config.n_test, seed=config.seed),
        progress=config.progress,
    )
    check = check_dataset(data, progress=False)
    done()

    done = _step("train", steps, echo)
    recipe = load_recipe(config.recipe, list(config.overrides))
    trained = train(recipe, data, out / "train", overwrite=True, progress=config.progress)
    checkpoint = trained.best_checkpoint or trained.last_checkpoint
    done()

    done = _step("scorecard (export, accuracy, parity, benchmark)", steps, echo)
    card = run_scorecard(
        ScorecardRequest(
            checkpoint=checkpoint,
            data=data,
            engines=config.engines,
            out_dir=out / "scorecard",
            cache_dir=out / "models",
            max_dets=config.max_dets,
            iters=config.bench_iters,
        ),
        lambda msg: echo(f"[demo]   {msg}"),
    )
    done()

    rows = {r["engine"]: r for r in card["rows"]}
    onnx_model = Path(rows["onnx"]["model"]["path"])
    done = _step("test split and predictions (onnx)", steps, echo)
    test_eval = evaluate_model(onnx_model, "onnx", data, "test", max_dets=config.max_dets, progress=False)
    with create_runner("onnx", onnx_model) as runner:
        summary = predict_folder(
            runner,
            data / "test_release",
            data / "test_image_name_to_ids.json",
            out / "submission.zip",
            overlays_dir=out / "overlays",
            progress=False,
        )
    done()

    summary_rows = _summary_rows(card)
    report = write_report(out, config, check, trained, card, test_eval, summary, steps)
    atomic_write_json(
        out / "demo.json",
        {
            "steps_s": steps,
            "summary": summary_rows,
            "skipped": card["skipped"],
            "scorecard": card["outputs"]["json"],
            "report": str(report),
        },
    )
    passed = all(
        r.get("parity", {}).get("verdict") in ("PASS", "reference")
        for r in card["rows"]
        if not r.get("skipped")
    )
    return DemoResult(report, summary_rows, steps, passed, dict(card["skipped"]), summary_text(card))


def _summary_rows(card: dict[str, Any]) -> list[list[Any]]:
    """``[engine, AP50, parity verdict, p50 ms]`` per engine (:data:`SUMMARY_HEADERS`); one that could not run
    here says so in the verdict column (the reason is in the report)."""
    out = []
    for r in card["rows"]:
        if r.get("skipped"):
            out.append([r["engine"], "-", "skipped (cannot run here, see report.md)", "-"])
            continue
        p50 = (r.get("speed") or {}).get("p50_ms")
        out.append(
            [r["engine"], format_metric(r["accuracy"]["AP50"]), r["parity"]["verdict"], format_metric(p50, 1)]
        )
    return out


def write_report(
    out: Path,
    config: DemoConfig,
    check: Any,
    trained: Any,
    card: dict[str, Any],
    test_eval: Any,
    summary: Any,
    steps: dict[str, float],
) -> Path:
    """Write ``out/report.md`` (links are relative to ``out``); its summary is the scorecard's table."""
    from cellseg_deploy.bench.scorecard import HEADERS, table_rows

    def rel(p: Any) -> str:
        return str(Path(p).resolve().relative_to(out.resolve()))

    s = check.stats
    ran = [r for r in card["rows"] if not r.get("skipped")]
    lines = [
        "# cellseg-deploy demo report",
        "",
        f"Everything below was produced by `cellseg-deploy demo --out {config.out}` on synthetic data "
        "(nothing downloaded). Times are wall-clock on this machine, which others may share.",
        "",
        "## Summary",
        "",
        "The scorecard of the trained checkpoint (the same as `cellseg-deploy scorecard "
        f"{trained.best_checkpoint or trained.last_checkpoint} --data {out / 'data'} --engine "
        f"{','.join(config.engines)} --out {out / 'scorecard'} --cache {out / 'models'}`; "
        f"`{rel(card['outputs']['markdown'])}`):",
        "",
        markdown_table(table_rows(card), HEADERS),
        "",
    ]
    if card["skipped"]:
        lines += ["Skipped (cannot run here):", ""]
        lines += [f"- {label}: {reason}" for label, reason in card["skipped"].items()]
        lines.append("")
    lines += [
        f"Accuracy and parity on the {card['data']['images']} validation images "
        f"({card['data']['gt_instances']} ground-truth cells); speed on {card['bench']['workload']}, threads "
        f"{card['bench']['threads']}.",
        "",
    ]
    if card["outputs"].get("chart"):
        lines += [f"![accuracy against latency]({rel(card['outputs']['chart'])})", ""]
    lines += [
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
        "## Models",
        "",
    ]
    lines += [
        f"- {r['engine']}: `{rel(r['model']['path'])}` ({r['model']['size_bytes'] / 1e6:.1f} MB; {r['model']['note']})"
        for r in ran
    ]
    lines += ["", "## Parity against PyTorch (the checks behind each verdict)", ""]
    for r in ran:
        par = r["parity"]
        if par["verdict"] == "reference":
            continue
        checks = par["report"]["checks"]
        lines += [
            f"### {r['engine']}: {par['verdict']} (profile {par['profile']}, {par['instances']} instances)",
            "",
            markdown_table(
                [
                    [c["key"], _num(c["value"]), f"{c['op']} {c['limit']:g}", c["n"], _verdict(c)]
                    for c in checks
                ],
                ["check", "value", "limit", "n", "ok"],
            ),
            "",
        ]
        lines += [f"- failure: {f}" for f in par["failures"]]
        lines += [f"- note: {n}" for n in par["notes"]]
        lines.append("")
    lines += ["## Accuracy (segm, validation split)", ""]
    arow = []
    for r in ran:
        a = r["accuracy"]
        per_class = a.get("per_class_AP50") or {}
        arow.append(
            [
                r["engine"],
                format_metric(a["AP"]),
                format_metric(a["AP50"]),
                format_metric(a.get("AP75")),
                ", ".join(f"{k} {format_metric(v)}" for k, v in per_class.items()),
                a.get("detections"),
            ]
        )
    lines += [
        markdown_table(arow, ["backend", "AP", "AP50", "AP75", "per-class AP50", "detections"]),
        "",
        f"Detection cap: {config.max_dets} per image and category (COCOeval maxDets).",
        f"Test split (ONNX Runtime): segm AP50 {format_metric(test_eval.metrics['segm']['AP50'])}.",
        "",
        "## Speed",
        "",
    ]
    bench_md = Path(card["bench"]["markdown"])
    if bench_md.is_file():
        prefix = rel(bench_md.parent) + "/"
        lines += [
            bench_md.read_text()
            .replace("# cellseg-deploy benchmark\n", "")
            .replace("\n## ", "\n### ")  # its sections below this report's "Speed"
            .replace("](", "](" + prefix),
            "",
        ]
    lines += [
        "## Predictions",
        "",
        f"Submission: `{rel(summary.out_zip)}` ({summary.num_detections} detections on {summary.num_predicted} "
        "test images).",
        "",
    ]
    if summary.overlays_dir and summary.overlays_gt:
        lines += [
            "Overlays: the detections scoring >= 0.5 (score on each), coloured against "
            f"`{rel(summary.overlays_gt)}`: TP green (same class, mask IoU >= 0.5, one-to-one), FP cyan, "
            "FN red (the missed ground-truth cell).",
            "",
        ]
    overlays = sorted(Path(summary.overlays_dir).glob("*.png"))[:3] if summary.overlays_dir else []
    lines += [f"![{p.stem}]({rel(p)})" for p in overlays]
    return atomic_write_text(out / "report.md", "\n".join(lines) + "\n")


def _verdict(check: dict[str, Any]) -> str:
    if not check.get("judged"):
        return "n/a" + (f" ({check['skipped']})" if check.get("skipped") else "")
    return "yes" if check.get("ok") else "NO"


def _num(v: Any) -> str:
    return "n/a" if v is None else f"{float(v):.4g}"
