"""One table per model: every engine's model file, accuracy, fidelity to PyTorch, speed and memory.

:func:`run_scorecard` is what ``cellseg-deploy scorecard`` runs, in four steps that reuse the library:

1. **models**: every engine label (``runner`` or ``runner:precision``) gets its model file from the checkpoint
   (:func:`~cellseg_deploy.bench.models.resolve_engine_models`: the checkpoint itself, or a file exported into
   the cache folder once and reused while the checkpoint is unchanged);
2. **accuracy and parity in one pass**: each engine predicts the split once with the evaluation
   post-processing (every detection kept, :data:`~cellseg_deploy.evaluation.predict.EVAL_POSTPROCESS`); those
   instances are scored against the ground truth (COCOeval segm AP50 / AP at ``max_dets``) *and* compared with
   the ``torch`` engine's instances of the same images
   (:func:`~cellseg_deploy.evaluation.parity.compare_runs`, the tolerance profile named after the engine's
   precision). That is what ``eval`` and ``parity`` compute, without running any model twice;
3. **speed and memory**: :func:`~cellseg_deploy.bench.api.run_bench` on the dataset's images (``test_release/``
   when present), engines interleaved, each engine's peak RSS from a fresh process;
4. **report**: ``scorecard.json`` (every figure, the parity checks with their instance counts),
   ``scorecard.md`` (the one table and its notes) and ``accuracy_vs_latency.png``, plus the benchmark's own
   report in ``bench/``.

``torch`` (fp32) is the reference of parity and of the speed-up, so it is always measured (added first when
the list lacks it). An engine whose backend cannot load here (:class:`~cellseg_deploy.errors.BackendUnavailable`,
e.g. TensorRT without an NVIDIA GPU) is listed as skipped with the reason, not an error.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellseg_deploy.errors import BackendUnavailable, ConfigError

log = logging.getLogger(__name__)

Log = Callable[[str], None]

SCHEMA = "cellseg-deploy/scorecard/1"
REFERENCE = "torch"

HEADERS = [
    "engine",
    "model file",
    "size MB",
    "segm AP50",
    "segm AP",
    "parity",
    "agreement",
    "matched / missed / extra",
    "box diff max px",
    "mask IoU mean",
    "p50 ms",
    "x torch (p50)",
    "peak RSS MB",
]


@dataclass(frozen=True)
class ScorecardRequest:
    """What ``cellseg-deploy scorecard`` was asked for.

    Attributes:
        checkpoint: the cellseg-deploy checkpoint (``.pt``) every engine's model comes from.
        data: dataset root in the competition layout (``train/``, ``test_release/``, ...).
        engines: engine labels, checked (:func:`~cellseg_deploy.bench.runner_bench.parse_engine_specs`).
        out_dir: where ``scorecard.json``, ``scorecard.md``, the chart and ``bench/`` go.
        cache_dir: exported models (reused); default ``out_dir / "models"``.
        split / val_fraction / seed: the images accuracy and parity are measured on (as in training).
        max_dets: COCOeval's cap on detections per image and category.
        score_thresh / min_iou / min_instances: parity's settings (:func:`~cellseg_deploy.evaluation.parity.compare_runs`).
        threads: intra-op CPU threads of every runner (``None``: each backend's default).
        device: where every runner runs, ``"cpu"`` or ``"cuda[:N]"`` (normalised: ``"cuda"`` -> ``"cuda:0"``);
            the same device for accuracy, parity and the benchmark.
        warmup / iters: benchmark rounds; bench_limit: at most this many benchmark images.
        memory: measure each engine's peak memory in a fresh process.
        progress: progress bars on stderr.
    """

    checkpoint: Path
    data: Path
    engines: tuple[str, ...]
    out_dir: Path = Path("runs/scorecard")
    cache_dir: Path | None = None
    split: str = "val"
    val_fraction: float = 0.2
    seed: int = 0
    max_dets: int = 100
    score_thresh: float = 0.5
    min_iou: float = 0.5
    min_instances: int = 20
    threads: int | None = None
    device: str = "cpu"
    warmup: int = 1
    iters: int = 5
    bench_limit: int | None = None
    memory: bool = True
    progress: bool = False

    def __post_init__(self) -> None:
        from cellseg_deploy.backends.devices import device_name

        object.__setattr__(self, "device", device_name(self.device))  # a bad name: one-line ConfigError
        if not self.engines:
            raise ConfigError("no engine given; pass --engine torch,onnx,...")
        if self.iters < 1 or self.warmup < 0:
            raise ConfigError(f"--iters must be >= 1 and --warmup >= 0, got {self.iters}, {self.warmup}")

    @property
    def labels(self) -> tuple[str, ...]:
        """The engines measured: ``torch`` first (the reference), then the others in the given order."""
        rest = tuple(e for e in self.engines if e != REFERENCE)
        return (REFERENCE, *rest)

    @property
    def models_dir(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else self.out_dir / "models"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in ("checkpoint", "data", "out_dir", "cache_dir"):
            d[key] = None if d[key] is None else str(d[key])
        d["engines"] = list(self.engines)
        return d


def model_size_bytes(path: Path) -> int:
    """Bytes on disk of a model: a file (an OpenVINO ``.xml`` with its ``.bin``), or every file of a folder."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    size = path.stat().st_size
    if path.suffix.lower() == ".xml" and path.with_suffix(".bin").is_file():
        size += path.with_suffix(".bin").stat().st_size
    return size


def profile_for(precision: str) -> str:
    """The parity tolerance profile of an engine precision (``fp32`` for any precision without its own)."""
    from cellseg_deploy.evaluation.parity import PROFILES

    return precision if precision in PROFILES else "fp32"


def run_scorecard(request: ScorecardRequest, log_fn: Log | None = None) -> dict[str, Any]:
    """Measure every engine (see the module docstring) and write the report; returns the JSON-ready result.

    The result holds ``schema``, ``created``, ``request``, ``data`` (split, images, ground-truth instances),
    ``rows`` (per engine: ``engine``, ``runner``, ``precision``, ``model``, ``accuracy``, ``parity``,
    ``speed``, ``memory`` or ``skipped``), ``skipped`` (``{engine: reason}``), ``bench`` (where its report
    is, its workload and thread settings) and ``outputs``.

    Raises:
        UserError: a checkpoint, dataset or engine that cannot be used (one line).
    """
    from cellseg_deploy.backends import get_runner_class
    from cellseg_deploy.bench.api import BenchRequest, models_by_label, run_bench
    from cellseg_deploy.bench.models import resolve_engine_models
    from cellseg_deploy.bench.report import instructions_text
    from cellseg_deploy.bench.runner_bench import BenchSettings, split_label

    say = log_fn or (lambda _msg: None)
    rows: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for label in request.labels:
        runner, precision = split_label(label)
        reason = get_runner_class(runner).unavailable_reason()
        if reason:  # nothing to export or load for a backend that cannot run here
            skipped[label] = reason
            rows[label] = {"engine": label, "runner": runner, "precision": precision or "fp32"}
            rows[label] |= {"model": None, "skipped": reason}
            say(f"[scorecard] {label}: skipped ({reason})")
    if REFERENCE in skipped:
        raise BackendUnavailable(f"the reference engine {REFERENCE!r} cannot run: {skipped[REFERENCE]}")
    labels = tuple(label for label in request.labels if label not in skipped)
    models = models_by_label(
        labels,
        "fp32",
        lambda engines: resolve_engine_models(
            engines, checkpoint=request.checkpoint, cache_dir=request.models_dir, on_export=say
        ),
    )
    reference: dict[int, Any] | None = None
    gt: dict[str, Any] = {}
    for label in labels:
        runner, precision = split_label(label)
        precision = precision or "fp32"
        model = models[label]
        row: dict[str, Any] = {
            "engine": label,
            "runner": runner,
            "precision": precision,
            "model": {
                "path": str(model.path),
                "source": model.source,
                "note": model.note,
                "size_bytes": model_size_bytes(model.path),
            },
        }
        rows[label] = row
        say(f"[scorecard] {label}: predicting split {request.split!r}")
        try:
            gt, preds, info = _predict_split(request, runner, model.path, precision)
        except BackendUnavailable as exc:
            if label == REFERENCE:
                raise
            skipped[label] = str(exc)
            row["skipped"] = str(exc)
            say(f"[scorecard] {label}: skipped ({exc})")
            continue
        row["info"] = info
        row["accuracy"] = _accuracy(gt, preds, request.max_dets)
        if label == REFERENCE:
            reference = preds
            row["parity"] = {"verdict": "reference"}
        else:
            assert reference is not None  # torch runs first; without it nothing is measured at all
            row["parity"] = _parity(request, reference, preds, gt, precision)
            say(f"[scorecard] {label}: parity {row['parity']['verdict']}")
    measured = tuple(label for label in labels if label not in skipped)
    say(f"[scorecard] benchmark: {', '.join(measured)}")
    bench = run_bench(
        BenchRequest(
            settings=BenchSettings(
                engines=measured,
                warmup=request.warmup,
                iters=request.iters,
                threads=request.threads,
                device=request.device,
                memory=request.memory,
                progress=request.progress,
            ),
            checkpoint=request.checkpoint,
            data=request.data,
            limit=request.bench_limit,
            out_dir=request.out_dir / "bench",
            cache_dir=request.models_dir,
        ),
        log=say,
    )
    rows = {label: rows[label] for label in request.labels}  # the asked order, skipped ones in place
    for label in measured:
        e = bench["engines"][label]
        sp = e.get("speedup_vs_torch") or {}
        rows[label]["speed"] = {
            "p50_ms": e["latency"]["p50_ms"],
            "mean_ms": e["latency"]["mean_ms"],
            "n": e["latency"]["n"],
            "speedup_p50": sp.get("p50"),
            "detections_per_image": e["detections_per_image"]["mean"],
        }
        rows[label]["memory"] = e.get("memory") or {}
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "request": request.to_dict(),
        "data": {
            "root": str(request.data),
            "split": request.split,
            "images": len(gt.get("images", [])),
            "gt_instances": sum(1 for a in gt.get("annotations", []) if not a.get("iscrowd")),
            "max_dets": request.max_dets,
        },
        "rows": list(rows.values()),
        "skipped": skipped,
        "bench": {
            "json": bench["outputs"]["json"],
            "markdown": bench["outputs"]["markdown"],
            "plots": bench["outputs"]["plots"],
            "workload": bench["workload"]["description"],
            "threads": _threads_used(bench),
            "cpu": bench["environment"]["cpu"]["model"] + instructions_text(bench["environment"]["cpu"]),
            "warnings": bench.get("warnings", []),
        },
    }
    write_scorecard(result, request.out_dir)
    return result


def _predict_split(
    request: ScorecardRequest, runner: str, model_path: Path, precision: str
) -> tuple[dict[str, Any], dict[int, Any], dict[str, Any]]:
    """``(gt, {image_id: Instances}, runner info)`` of one engine on the split (every detection kept)."""
    from cellseg_deploy.backends import create_runner
    from cellseg_deploy.evaluation.predict import run_dataset

    with create_runner(
        runner, model_path, device=request.device, precision=precision, threads=request.threads
    ) as r:
        gt, preds = run_dataset(
            r,
            request.data,
            request.split,
            val_fraction=request.val_fraction,
            seed=request.seed,
            progress=request.progress,
        )
        return gt, preds, r.info()


def _accuracy(gt: dict[str, Any], preds: dict[int, Any], max_dets: int) -> dict[str, Any]:
    from cellseg_deploy.evaluation.coco_eval import evaluate, predictions_to_results

    m = evaluate(gt, predictions_to_results(preds), max_dets=max_dets, iou_types=("segm",)).metrics["segm"]
    return {
        "AP50": m["AP50"],
        "AP": m["AP"],
        "AP75": m.get("AP75"),
        "per_class_AP50": m.get("per_class_AP50"),
        "detections": m.get("num_detections"),
        "max_dets": max_dets,
    }


def _parity(
    request: ScorecardRequest,
    reference: dict[int, Any],
    preds: dict[int, Any],
    gt: dict[str, Any],
    precision: str,
) -> dict[str, Any]:
    """The parity verdict of one engine against the reference's instances, with its key figures."""
    from cellseg_deploy.evaluation.parity import compare_runs, get_profile

    names = {int(e["id"]): str(e.get("file_name", e["id"]))[:12] for e in gt.get("images", [])}
    report = compare_runs(
        reference,
        preds,
        profile=get_profile(profile_for(precision)),
        score_thresh=request.score_thresh,
        min_iou=request.min_iou,
        gt=gt,
        names=names,
        min_instances=request.min_instances,
    )
    full = report.to_dict()
    o = report.overall
    checks = full["checks"]
    return {
        "verdict": "PASS" if report.passed else "FAIL",
        "profile": report.profile.name,
        "agreement": o.get("agreement"),
        "matched": o.get("matched"),
        "missed": o.get("missed"),
        "extra": o.get("extra"),
        "max_box_diff": o.get("max_box_diff"),
        "mean_iou": o.get("mean_iou"),
        "instances": (o.get("n_ref") or 0) + (o.get("n_cand") or 0),
        "judged": sum(1 for c in checks if c.get("judged")),
        "checks": len(checks),
        "ap50_gt_diff": (full.get("ap50_gt") or {}).get("diff"),
        "failures": list(report.failures),
        "notes": full.get("notes", []),
        "report": full,
    }


def _threads_used(bench: dict[str, Any]) -> str:
    """The intra-op threads in force (the asked number, or the backends' default and what it was)."""
    from cellseg_deploy.bench.report import threads_text

    return threads_text(bench)


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------
def _f(v: Any, digits: int = 4) -> str:
    return "n/a" if v is None else f"{float(v):.{digits}f}"


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    """The one table: a row per engine and precision (:data:`HEADERS`)."""
    out = []
    for row in result["rows"]:
        if row.get("skipped"):
            out.append([row["engine"], "-", "-", "skipped (see below)", *(["-"] * (len(HEADERS) - 4))])
            continue
        size = f"{row['model']['size_bytes'] / 1e6:.1f}"
        name = Path(row["model"]["path"]).name
        acc, par = row["accuracy"], row["parity"]
        speed, mem = row.get("speed") or {}, row.get("memory") or {}
        if par["verdict"] == "reference":
            verdict, agree, counts, box, iou = "reference", "1 (itself)", "-", "-", "-"
        else:
            verdict = f"{par['verdict']} ({par['profile']}, {par['instances']} inst.)"
            agree = _f(par["agreement"])
            counts = f"{par['matched']} / {par['missed']} / {par['extra']}"
            box, iou = _f(par["max_box_diff"], 2), _f(par["mean_iou"])
        sp = speed.get("speedup_p50")
        out.append(
            [
                row["engine"],
                name,
                size,
                _f(acc["AP50"]),
                _f(acc["AP"]),
                verdict,
                agree,
                counts,
                box,
                iou,
                _f(speed.get("p50_ms"), 1),
                "n/a" if sp is None else f"{sp:.2f}x",
                _f(mem.get("peak_rss_mb"), 0) if "peak_rss_mb" in mem else "n/a",
            ]
        )
    return out


def summary_text(result: dict[str, Any]) -> str:
    """What ``cellseg-deploy scorecard`` prints (and the demo at its end): the one table as aligned text,
    then one ``skipped ENGINE: why`` line per engine that could not run here."""
    from cellseg_deploy.tables import format_table

    lines = [format_table(table_rows(result), HEADERS)]
    lines += [f"skipped {label}: {reason}" for label, reason in result["skipped"].items()]
    return "\n".join(lines)


def markdown_report(result: dict[str, Any], chart: str | None = None) -> str:
    """``scorecard.md``: the table, then what it was measured on and every parity failure."""
    from cellseg_deploy.tables import markdown_table

    req, data, bench = result["request"], result["data"], result["bench"]
    md = [
        f"# Scorecard of `{Path(req['checkpoint']).name}`",
        "",
        markdown_table(table_rows(result), HEADERS),
        "",
        f"- accuracy and parity: split `{data['split']}` of `{data['root']}`, {data['images']} images, "
        f"{data['gt_instances']} ground-truth instances; COCOeval segm, cap {data['max_dets']} detections per "
        "image and category; each engine predicted the split once, and those instances were both scored and "
        "compared with torch's.",
        f"- parity: instances scoring >= {req['score_thresh']} must agree (same-class pairs need mask IoU >= "
        f"{req['min_iou']}); the tolerance profile is the engine's precision; a verdict needs "
        f"{req['min_instances']} instances; `agreement` is the F1 of the optimal matching (1 for identical).",
        f"- speed: {bench['workload']}; {req['warmup']} warm-up and {req['iters']} measured rounds, engines "
        f"interleaved, each in a process of its own; {bench['cpu']}; threads {bench['threads']}. `x torch (p50)`: torch's p50 over the "
        "engine's, same run. `peak RSS MB`: the engine alone in a fresh process.",
        f"- model files: exported once into `{req['cache_dir'] or Path(req['out_dir']) / 'models'}` and reused "
        "while the checkpoint is unchanged; size is the file (OpenVINO: .xml + .bin; a stage folder: every "
        "file in it, fp32 and fp16 graphs).",
        f"- benchmark report: `{bench['markdown']}`.",
    ]
    for label, reason in result.get("skipped", {}).items():
        md.append(f"- skipped {label}: {reason}")
    for row in result["rows"]:
        for failure in (row.get("parity") or {}).get("failures", []):
            md.append(f"- {row['engine']} parity: {failure}")
    for w in bench.get("warnings", []):
        md.append(f"- benchmark warning: {w}")
    if chart:
        md += ["", f"![accuracy against latency]({Path(chart).name})"]
    return "\n".join(md) + "\n"


def plot_accuracy_latency(result: dict[str, Any], path: Path) -> Path | None:
    """segm AP50 against p50 latency, one point per engine and precision (hollow: parity failed)."""
    from cellseg_deploy.plots import new_figure, save_png

    pts = [
        (r["engine"], r["speed"]["p50_ms"], r["accuracy"]["AP50"], r["parity"]["verdict"])
        for r in result["rows"]
        if not r.get("skipped") and r.get("speed") and r["accuracy"]["AP50"] is not None
    ]
    if not pts:
        return None
    fig = new_figure(6.4, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    colours = {"reference": "#444444", "PASS": "#1b9e77", "FAIL": "#d95f02"}
    for verdict, colour in colours.items():
        mine = [p for p in pts if p[3] == verdict]
        if mine:
            ax.scatter(
                [p[1] for p in mine],
                [p[2] for p in mine],
                s=55,
                color=colour if verdict != "FAIL" else "none",
                edgecolors=colour,
                linewidths=1.8,
                label={"reference": "torch (reference)", "PASS": "parity passed", "FAIL": "parity failed"}[
                    verdict
                ],
                zorder=3,
            )
    ys = [p[2] for p in pts]
    span = max(ys) - min(ys)
    pad = max(span * 0.25, 0.005)
    ax.set_ylim(min(ys) - pad, max(ys) + pad)  # the differences, not 0..1: bf16/int8 move AP50 by ~0.005
    xs = [p[1] for p in pts]
    ax.set_xscale("log")  # engines span 10x in latency; ratios read as distances
    lo, hi = min(xs) / 1.5, max(xs) * 2.2
    ax.set_xlim(lo, hi)
    ticks = [t * 10**k for k in range(-1, 6) for t in (1, 2, 5) if lo <= t * 10**k <= hi]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    _label_points(ax, [(p[0], p[1], p[2]) for p in pts])
    ax.set_xlabel("p50 end-to-end latency per image (ms, log scale)")
    ax.set_ylabel(f"segm AP50 ({result['data']['split']})")
    ax.set_title(
        f"accuracy against latency, {Path(result['request']['checkpoint']).name}\n"
        f"{result['bench']['cpu']}; threads {result['bench']['threads']}",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return save_png(fig, path)


def _label_points(ax: Any, points: list[tuple[str, float, float]]) -> None:
    """Name every point beside it; a label that would overlap an earlier one moves down a line (points of
    nearly equal latency and accuracy, e.g. fp32 engines that agree exactly, stay readable)."""
    fig = ax.figure
    line = 11.0 * fig.dpi / 72  # one label line, display pixels
    placed: list[tuple[float, float, float, float]] = []
    for name, x, y in sorted(points, key=lambda p: (-p[2], p[1])):
        px, py = ax.transData.transform((x, y))
        width = 5.2 * len(name) * fig.dpi / 72
        dy = 4.0
        for _ in range(len(points)):
            box = (
                px + 6,
                py + dy * fig.dpi / 72 - line / 2,
                px + 6 + width,
                py + dy * fig.dpi / 72 + line / 2,
            )
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                break
            dy -= 11.0
        placed.append(box)
        ax.annotate(
            name,
            (x, y),
            textcoords="offset points",
            xytext=(6, dy),
            fontsize=8,
            va="center",
            arrowprops={"arrowstyle": "-", "color": "0.6", "linewidth": 0.6} if dy != 4.0 else None,
        )


def write_scorecard(result: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write ``scorecard.json``, ``scorecard.md`` and ``accuracy_vs_latency.png`` into ``out_dir``."""
    from cellseg_deploy.io_utils import atomic_write_json, atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    chart = plot_accuracy_latency(result, out_dir / "accuracy_vs_latency.png")
    md = atomic_write_text(out_dir / "scorecard.md", markdown_report(result, str(chart) if chart else None))
    js = out_dir / "scorecard.json"
    result["outputs"] = {"json": str(js), "markdown": str(md), "chart": None if chart is None else str(chart)}
    atomic_write_json(js, result)
    return {"json": js, "markdown": md} | ({"chart": chart} if chart else {})
