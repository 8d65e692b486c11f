"""Accuracy of every CPU path of one trained model, side by side: the accuracy half of the CPU fast path.

The speed suite (``run_suite.py``) measures untrained models whose detection count is fixed; this script takes
a *trained* checkpoint and measures what each CPU engine makes of it: COCO segm AP50 (and AP, bbox AP50)
against the ground truth, the difference to PyTorch eager fp32, and the ``parity`` verdict of the fast
paths with their own tolerance profile (``bf16``, ``int8``). Engines: ``torch`` (eager fp32, the reference),
``onnx`` (ONNX Runtime fp32), ``openvino`` (fp32), ``openvino:bf16`` and ``openvino:int8`` (each where
installed).

Cases (each its own data; the model's input size follows the images, so cells keep their trained scale):

- ``val``: the checkpoint as trained, on the validation split of ``--data`` (the split training held out).
- ``512-150``: synthetic 512 x 512 images with 140 to 160 cells each (the fast path's headline speed case);
  the checkpoint's ``min_size`` set to 512.
- ``800-dense``: synthetic 800 x 800 images with 500 to 560 cells each (the dense speed case);
  ``min_size`` 800.

The synthetic cases write ``test_release/`` with COCO ground truth (scored with ``--split test``) and a
training split from which the int8 IR is calibrated (never the scored images). ``val`` calibrates on the
training split of ``--data``. Exports are the normal ones: ``export_onnx`` (checked against PyTorch) and
``export_openvino_int8``.

Usage::

    python benchmarks/cpu_accuracy.py --checkpoint runs/r50/best.pt --data data/synth --out benchmarks/cpu-accuracy
    python benchmarks/cpu_accuracy.py --checkpoint runs/tiny/best.pt --data data/synth --out runs/acc --cases val
    python benchmarks/cpu_accuracy.py --checkpoint runs/r50/best.pt --data data/synth --proposals 300 --out runs/acc-p300
    python benchmarks/cpu_accuracy.py --plot-only --out benchmarks/cpu-accuracy   # redraw ap50.png from summary.json

Writes ``OUT/summary.json`` (every evaluation and parity report), ``OUT/summary.md`` (the tables) and
``OUT/ap50.png``. Exit code 0 when every fast path (bf16, int8) of every case keeps its segm AP50 within
``--max-ap50-diff`` (0.01) of PyTorch's and passes parity; 1 otherwise; 2 on unusable inputs.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cellseg_deploy.bench.environment import capture_environment
from cellseg_deploy.bench.runner_bench import split_label
from cellseg_deploy.errors import UserError
from cellseg_deploy.io_utils import atomic_write_json, atomic_write_text
from cellseg_deploy.plots import new_figure, save_png
from cellseg_deploy.tables import markdown_table

ENGINES = ("torch", "onnx", "openvino", "openvino:bf16", "openvino:int8")
FAST_PATHS = ("openvino:bf16", "openvino:int8")
MAX_AP50_DIFF = 0.01


@dataclass(frozen=True)
class Case:
    """One accuracy case.

    Attributes:
        name: short name (folder and table row).
        side: synthetic image side in pixels; ``None``: the validation split of ``--data``.
        cells: (fewest, most) cells per synthetic image.
        test_images: scored synthetic images.
        calib_images: synthetic training images written for int8 calibration (16 are used).
        max_dets: COCOeval's cap per image and category (dense images need more than COCO's 100).
    """

    name: str
    side: int | None = None
    cells: tuple[int, int] = (0, 0)
    test_images: int = 0
    calib_images: int = 20
    max_dets: int = 100

    def describe(self) -> str:
        if self.side is None:
            return "the validation split of --data, at the model's own input size"
        return (
            f"{self.test_images} synthetic {self.side}x{self.side} images, {self.cells[0]}-{self.cells[1]} "
            f"cells each, min_size {self.side}"
        )


CASES = (
    Case("val"),
    Case("512-150", side=512, cells=(140, 160), test_images=8, max_dets=300),
    Case("800-dense", side=800, cells=(500, 560), test_images=4, max_dets=1000),
)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sized_checkpoint(checkpoint: Path, out: Path, side: int) -> Path:
    """Write ``checkpoint`` with its input resizing set for ``side`` x ``side`` images (``min_size = side``,
    ``max_size = 2 * side``): the weights are unchanged; only where the image is resized to moves, so a
    ``side`` px image runs at scale 1. The source's SHA-256 goes into ``model.extra["sized_from"]``; an
    ``out`` already holding exactly that config is kept."""
    from cellseg_deploy.io_utils import sha256_file
    from cellseg_deploy.modeling import load_checkpoint, save_checkpoint

    ck = load_checkpoint(checkpoint)
    extra = {**ck.model_config.extra, "sized_from": sha256_file(checkpoint)}
    config = replace(ck.model_config, min_size=side, max_size=2 * side, extra=extra)
    config.validate()
    if out.is_file() and load_checkpoint(out).model_config == config:
        return out
    save_checkpoint(out, ck.build_model(), config, recipe=ck.recipe, epoch=ck.epoch, metrics=ck.metrics)
    return out


def case_data(case: Case, data: Path, cache: Path, seed: int) -> tuple[Path, str]:
    """The dataset root of ``case`` and the split to score (synthetic sets are written once into ``cache``)."""
    if case.side is None:
        return data, "val"
    from cellseg_deploy.data.synth import SynthConfig, make_synthetic_dataset

    root = cache / case.name / "data"
    config = SynthConfig(
        n_train=case.calib_images,
        n_test=case.test_images,
        min_size=case.side,
        max_size=case.side,
        min_cells=case.cells[0],
        max_cells=case.cells[1],
        seed=seed,
    )
    if not (root / "test_ground_truth.json").is_file():
        log(f"[{case.name}] writing the synthetic set: {case.describe()}")
        make_synthetic_dataset(root, config)
    return root, "test"


def export_models(
    checkpoint: Path, folder: Path, calib_data: Path, engines: tuple[str, ...]
) -> dict[str, Path]:
    """Engine label -> model file: the checkpoint for torch, one checked ONNX export for every other engine,
    and that ONNX file quantised (calibrated on ``calib_data``'s training split) for int8. Files in ``folder``
    are reused only when made from this checkpoint (the ONNX metadata's ``source_sha256``) and from this ONNX
    file (the int8 IR's ``onnx_sha256``)."""
    from cellseg_deploy.backends.metadata import read_onnx_metadata
    from cellseg_deploy.backends.onnxrt.export import export_onnx
    from cellseg_deploy.io_utils import sha256_file

    onnx_path = folder / "model.onnx"
    xml_path = folder / "model.int8.xml"
    labels = [(label, *split_label(label)) for label in engines]
    if any(runner != "torch" for _, runner, _ in labels) and not (
        onnx_path.is_file() and read_onnx_metadata(onnx_path).get("source_sha256") == sha256_file(checkpoint)
    ):
        log(f"exporting {onnx_path}")
        export_onnx(checkpoint, onnx_path)
    models: dict[str, Path] = {}
    for label, runner, precision in labels:
        if runner == "torch":
            models[label] = checkpoint
        elif precision == "int8":
            if not _quantised_from(xml_path, onnx_path):
                from cellseg_deploy.backends.openvino.int8 import calibration_images, quantize_onnx

                log(f"quantising {onnx_path} -> {xml_path} (calibrated on {calib_data})")
                images, source = calibration_images(calib_data)
                quantize_onnx(onnx_path, xml_path, images, source=source)
            models[label] = xml_path
        else:
            models[label] = onnx_path
    return models


def _quantised_from(xml_path: Path, onnx_path: Path) -> bool:
    """Whether ``xml_path`` is an int8 IR made from exactly ``onnx_path``."""
    if not xml_path.is_file():
        return False
    import openvino as ov

    from cellseg_deploy.backends.openvino.ir import read_quantisation
    from cellseg_deploy.io_utils import sha256_file

    record = read_quantisation(ov.Core().read_model(str(xml_path)))
    return record is not None and record.get("onnx_sha256") == sha256_file(onnx_path)


def evaluate_engines(
    models: dict[str, Path], root: Path, split: str, max_dets: int, threads: int | None
) -> dict[str, dict[str, Any]]:
    """``cellseg-deploy eval`` of each engine on the same images: label -> EvalResult dict."""
    from cellseg_deploy.evaluation.predict import evaluate_model

    out: dict[str, dict[str, Any]] = {}
    for label, model in models.items():
        runner, precision = split_label(label)
        log(f"eval {label} ({model.name}) on {root} split {split}")
        result = evaluate_model(
            model, runner, root, split, max_dets=max_dets, precision=precision or "fp32", threads=threads
        )
        out[label] = result.to_dict()
    return out


def parity_checks(
    checkpoint: Path, models: dict[str, Path], root: Path, split: str, threads: int | None
) -> dict[str, dict[str, Any]]:
    """``cellseg-deploy parity`` of each fast path against PyTorch fp32, with its own tolerance profile."""
    from cellseg_deploy.evaluation.parity import run_parity

    out: dict[str, dict[str, Any]] = {}
    for label in FAST_PATHS:
        if label not in models:
            continue
        runner, precision = split_label(label)
        assert precision is not None
        log(f"parity {label} --profile {precision} on {root} split {split}")
        report = run_parity(
            checkpoint,
            models[label],
            runner,
            root,
            split=split,
            profile=precision,
            candidate_precision=precision,
            threads=threads,
        )
        out[label] = report.to_dict()
    return out


def case_rows(result: dict[str, Any], max_diff: float) -> list[dict[str, Any]]:
    """One row per engine: AP figures, the AP50 difference to torch and the verdicts (fast paths).

    ``within`` is ``None`` (not judged) when the case has fewer ground-truth cells than
    :func:`~cellseg_deploy.evaluation.parity.min_gt_for_ap_gate` asks for ``max_diff``: one flipped cell
    would then move AP50 by more than half the limit, and the difference would measure noise."""
    from cellseg_deploy.evaluation.parity import min_gt_for_ap_gate

    evals = result["eval"]
    ref = evals["torch"]["metrics"]["segm"]["AP50"]
    n_gt = int(sum(evals["torch"]["num_gt"].values()))
    judged = n_gt >= min_gt_for_ap_gate(max_diff)
    rows = []
    for label, ev in evals.items():
        segm, bbox = ev["metrics"]["segm"], ev["metrics"].get("bbox", {})
        diff = segm["AP50"] - ref
        parity = result["parity"].get(label)
        rows.append(
            {
                "engine": label,
                "segm_AP50": segm["AP50"],
                "segm_AP50_diff": diff,
                "within": abs(diff) <= max_diff if judged else None,
                "n_gt": n_gt,
                "segm_AP": segm["AP"],
                "bbox_AP50": bbox.get("AP50"),
                "detections": segm["num_detections"],
                "seconds": ev["info"]["seconds"],
                "parity": None if parity is None else parity["passed"],
                "parity_failures": None if parity is None else parity["failures"],
            }
        )
    return rows


def passed(cases: dict[str, dict[str, Any]]) -> bool:
    """Every fast path of every case: AP50 within the limit (where judged) and parity passed, and at least
    one of the two judged for every fast path (a row that judged nothing is not a pass)."""
    rows = [row for c in cases.values() for row in c["rows"] if row["engine"] in FAST_PATHS]
    return all(
        row["within"] is not False
        and row["parity"] is not False
        and (row["within"] is not None or row["parity"] is not None)
        for row in rows
    )


def _proposals_line(summary: dict[str, Any]) -> str:
    """The RPN proposal setting every engine ran with (summaries from before the option say nothing)."""
    if "proposals" not in summary:
        return "RPN proposals per image: the checkpoint's own."
    how = "retuned with --proposals" if summary["retuned"] else "the checkpoint's own"
    return (
        f"RPN proposals per image: {summary['proposals']} after NMS, {summary['pre_nms_top_n']} per level "
        f"before it ({how}; every engine, PyTorch included)."
    )


def write_markdown(summary: dict[str, Any], path: Path) -> Path:
    from cellseg_deploy.evaluation.parity import min_gt_for_ap_gate

    env = summary["environment"]
    lines = [
        "# CPU paths: accuracy of one trained model",
        "",
        f"Made by `{summary['command']}` on {summary['created']} ({summary['seconds']:.0f} s).",
        f"Checkpoint: `{summary['checkpoint']}` (arch `{summary['arch']}`, sha256 {summary['checkpoint_sha256'][:12]}).",
        _proposals_line(summary),
        f"Machine: {env['cpu']['model']}, {env['cpu']['usable_cores']} usable cores; threads per runner "
        f"{summary['threads'] or 'default'}.",
        "",
        f"`diff`: segm AP50 minus PyTorch eager fp32's on the same images. `within`: |diff| <= "
        f"{summary['max_ap50_diff']}, judged only on cases with at least "
        f"{min_gt_for_ap_gate(summary['max_ap50_diff'])} ground-truth cells (one flipped cell then moves AP50 "
        "by at most half the limit; n/a below that). `parity`: `cellseg-deploy parity` against PyTorch fp32 with the engine's "
        "precision profile (fast paths only). Verdict: "
        + ("**passed**" if summary["passed"] else "**failed**")
        + " (every fast path within and parity passed).",
    ]
    headers = [
        "engine",
        "segm AP50",
        "diff",
        "within",
        "segm AP",
        "bbox AP50",
        "detections",
        "eval s",
        "parity",
    ]
    for name, case in summary["cases"].items():
        first = next(iter(case["eval"].values()))
        lines += [
            "",
            f"## {name}: {case['description']}",
            "",
            f"{first['num_images']} images, {sum(first['num_gt'].values())} ground-truth cells; data "
            f"`{case['data']}` split `{case['split']}`; COCOeval cap {case['max_dets']} per image and class.",
            "",
        ]
        rows = [
            [
                r["engine"],
                r["segm_AP50"],
                f"{r['segm_AP50_diff']:+.4f}",
                {True: "yes", False: "NO", None: "n/a"}[r["within"]],
                r["segm_AP"],
                r["bbox_AP50"],
                r["detections"],
                f"{r['seconds']:.1f}",
                {None: "-", True: "passed", False: "FAILED"}[r["parity"]],
            ]
            for r in case["rows"]
        ]
        lines.append(markdown_table(rows, headers))
        for r in case["rows"]:
            for failure in r["parity_failures"] or []:
                lines.append(f"- parity {r['engine']}: {failure}")
    return atomic_write_text(path, "\n".join(lines) + "\n")


def plot_ap50(summary: dict[str, Any], path: Path) -> Path:
    """One panel per case: each engine's segm AP50 minus torch's (bars, value on each), the gate's band
    +-``max_ap50_diff`` shaded, torch's own AP50 in the panel title. An axis around the differences, not
    0..1, so a difference of 0.006 is as visible as the gate that judges it."""
    from matplotlib.patches import Patch

    cases = list(summary["cases"])
    limit = float(summary["max_ap50_diff"])
    diffs = [r["segm_AP50_diff"] for c in cases for r in summary["cases"][c]["rows"]]
    span = max(limit, *(abs(d) for d in diffs)) * 1.35
    fig = new_figure(max(5.5, 3.0 * len(cases) + 1.0), 3.9)
    axes = [fig.add_subplot(1, len(cases), i + 1) for i in range(len(cases))]
    for ax, case in zip(axes, cases, strict=True):
        rows = summary["cases"][case]["rows"]
        ref = next(r["segm_AP50"] for r in rows if r["engine"] == "torch")
        names = [r["engine"] for r in rows]
        values = [r["segm_AP50_diff"] for r in rows]
        colours = [
            "#999999" if r["within"] is None else ("#1b9e77" if r["within"] else "#d95f02") for r in rows
        ]
        ax.axhspan(-limit, limit, color="#1b9e77", alpha=0.10, zorder=0)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.bar(range(len(rows)), values, 0.6, color=colours, zorder=2)
        for i, v in enumerate(values):
            ax.annotate(
                f"{v:+.4f}",
                (i, v),
                textcoords="offset points",
                xytext=(0, 3 if v >= 0 else -10),
                ha="center",
                fontsize=7,
            )
        ax.set_xticks(range(len(rows)), names, rotation=35, ha="right", fontsize=7.5)
        ax.set_ylim(-span, span)
        ax.set_title(f"{case}: torch AP50 {ref:.4f}", fontsize=8.5)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("segm AP50 - torch's")
    handles = [
        Patch(color="#1b9e77", alpha=0.25, label=f"gate: within +-{limit:g}"),
        Patch(color="#1b9e77", label="within"),
        Patch(color="#d95f02", label="outside"),
        Patch(color="#999999", label="not judged (too few cells)"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=7.5, frameon=False)
    fig.suptitle(f"segm AP50 of every CPU engine against PyTorch fp32 ({summary['arch']})", fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return save_png(fig, path, tight=False)


def replot(out: Path) -> int:
    """``--plot-only``: :func:`plot_ap50` of ``out/summary.json`` into ``out/ap50.png``; exit code 0, or 2
    when there is no readable summary."""
    source = out / "summary.json"
    try:
        summary = json.loads(source.read_text())
        written = plot_ap50(summary, out / "ap50.png")
    except (OSError, ValueError, KeyError) as exc:
        log(f"error: cannot redraw from {source} ({exc}); run the benchmark first")
        return 2
    log(f"wrote {written} from {source}")
    return 0


def run(
    checkpoint: Path,
    data: Path,
    out: Path,
    cache: Path,
    cases: tuple[Case, ...],
    engines: tuple[str, ...],
    *,
    threads: int | None = None,
    max_diff: float = MAX_AP50_DIFF,
    seed: int = 0,
    proposals: int | None = None,
    command: str = "",
) -> dict[str, Any]:
    """Run every case and write ``out/summary.{json,md}`` and ``out/ap50.png``; returns the summary.

    ``proposals``: retune the checkpoint to that many RPN proposals per image first (``cellseg-deploy
    retune``), so every engine, the reference included, runs the model with the setting; its exports go to
    their own cache folder.
    """
    from cellseg_deploy.io_utils import sha256_file
    from cellseg_deploy.modeling import load_checkpoint
    from cellseg_deploy.modeling.retune import retuned_copy

    if "torch" not in engines:
        raise UserError("the engines must include torch: it is the reference every difference is taken to")
    t0 = time.perf_counter()
    source = checkpoint
    if proposals is not None:
        cache = cache / f"proposals-{proposals}"
        cache.mkdir(parents=True, exist_ok=True)
        checkpoint = retuned_copy(source, cache, proposals)
    config = load_checkpoint(checkpoint).model_config
    arch = config.arch
    environment = capture_environment("cpu", threads)
    results: dict[str, dict[str, Any]] = {}
    for case in cases:
        folder = cache / case.name
        folder.mkdir(parents=True, exist_ok=True)
        root, split = case_data(case, data, cache, seed)
        ckpt = (
            checkpoint if case.side is None else sized_checkpoint(checkpoint, folder / "model.pt", case.side)
        )
        models = export_models(ckpt, folder, root, engines)
        result: dict[str, Any] = {
            "description": case.describe(),
            "data": str(root),
            "split": split,
            "max_dets": case.max_dets,
            "checkpoint": str(ckpt),
            "eval": evaluate_engines(models, root, split, case.max_dets, threads),
        }
        result["parity"] = parity_checks(ckpt, models, root, split, threads)
        result["rows"] = case_rows(result, max_diff)
        results[case.name] = result
    summary = {
        "schema": "cellseg-deploy/cpu-accuracy/1",
        "command": command,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - t0, 1),
        "checkpoint": str(source),
        "checkpoint_sha256": sha256_file(source),
        "arch": arch,
        "proposals": config.rpn_post_nms_top_n_test,
        "pre_nms_top_n": config.rpn_pre_nms_top_n_test,
        "retuned": proposals is not None,
        "threads": threads,
        "max_ap50_diff": max_diff,
        "environment": environment,
        "cases": results,
    }
    summary["passed"] = passed(results)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "summary.json", summary)
    write_markdown(summary, out / "summary.md")
    plot_ap50(summary, out / "ap50.png")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Accuracy of every CPU engine on one trained model.")
    p.add_argument("--checkpoint", type=Path, help="trained cellseg-deploy checkpoint (.pt); required to run")
    p.add_argument(
        "--data", type=Path, help="its dataset root (the val case and its calibration); required to run"
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/cpu-accuracy"), help="results folder")
    p.add_argument(
        "--cache", type=Path, default=Path("runs/cpu-accuracy-cache"), help="exports and synthetic sets"
    )
    p.add_argument("--cases", default=",".join(c.name for c in CASES), help="comma-separated case names")
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated engine labels (torch first)")
    p.add_argument("--threads", type=int, default=None, help="threads per runner (default: each runner's)")
    p.add_argument("--max-ap50-diff", type=float, default=MAX_AP50_DIFF)
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic sets")
    p.add_argument(
        "--proposals",
        type=int,
        default=None,
        help="RPN proposals per image for every engine (the checkpoint retuned first); default: its own",
    )
    p.add_argument(
        "--plot-only",
        action="store_true",
        help="redraw OUT/ap50.png from OUT/summary.json (a finished run) without running anything",
    )
    args = p.parse_args(argv)
    if args.plot_only:
        return replot(args.out)
    if args.checkpoint is None or args.data is None:
        p.error("--checkpoint and --data are required (unless --plot-only)")
    by_name = {c.name: c for c in CASES}
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in by_name]
    engines = tuple(e.strip() for e in args.engines.split(",") if e.strip())
    try:
        if unknown:
            raise UserError(f"unknown case(s) {unknown}; choose from {list(by_name)}")
        from cellseg_deploy.backends import get_runner_class

        available: list[str] = []
        for e in engines:
            reason = get_runner_class(split_label(e)[0]).unavailable_reason()
            if reason is None:
                available.append(e)
            else:
                log(f"skipping {e}: {reason}")
        summary = run(
            args.checkpoint,
            args.data,
            args.out,
            args.cache,
            tuple(by_name[n] for n in names),
            tuple(available),
            threads=args.threads,
            max_diff=args.max_ap50_diff,
            seed=args.seed,
            proposals=args.proposals,
            command="python benchmarks/cpu_accuracy.py "
            + " ".join(argv if argv is not None else sys.argv[1:]),
        )
    except UserError as exc:
        log(f"error: {exc}")
        return 2
    log((args.out / "summary.md").read_text())
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
