"""The GPU acceptance check: everything the project runs on an NVIDIA GPU, in one command and one report.

    python benchmarks/gpu_check.py --out runs/gpu-check             # on a machine with an NVIDIA GPU
    python benchmarks/gpu_check.py --out runs/gpu-check --dry-run   # the same orchestration on the CPU

Steps (each one passes, fails or is skipped with the reason; later steps use earlier results):

1. ``pytest -m gpu tests/gpu`` (in a subprocess; the dry run only collects them).
2. Train the tiny recipe for a few steps with AMP on CUDA, on a small synthetic dataset.
3. Export the stage graphs (fp32 + fp16) of that checkpoint.
4. With TensorRT: build fp32 and fp16 engines, then check their parity and segm AP50 against PyTorch on the
   synthetic validation split (``cellseg_deploy.evaluation.parity.run_parity``).
5. Benchmark ``torch``, ``staged-torch:fp16``, ``trt`` and ``trt:fp16`` on untrained tiny models at
   512 px / 150 cells and 800 px / 500 cells (without TensorRT: ``torch`` and ``staged-torch:fp16``).

Without TensorRT, the steps that need it are skipped and the report says why
(:func:`cellseg_deploy.backends.tensorrt.build.trt_unavailable_reason`). The report (``report.md`` +
``report.json``) names the GPU, the versions and every step's outcome and seconds; the exit code is 1 when a
step failed. ``--dry-run`` runs every step on the CPU with the smallest settings (the tiny model, a few
images, one benchmark round at small sizes), so the orchestration is tested in CI (``tests/test_gpu_check.py``,
which also installs the TensorRT test double so that the TensorRT steps run). Budget on one data-centre GPU:
under 10 minutes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

BENCH_CASES: tuple[tuple[int, int], ...] = ((512, 150), (800, 500))
DRY_BENCH_CASES: tuple[tuple[int, int], ...] = ((128, 10),)
PARITY_SCORE = 0.1
"""Parity compares detections scoring at least this: the briefly trained model scores few cells at 0.5."""


@dataclass
class Step:
    """One step of the check: ``status`` is ``passed``, ``failed`` or ``skipped`` (with ``detail`` saying why)."""

    name: str
    status: str = "skipped"
    seconds: float = 0.0
    detail: str = ""
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    """What the check runs with: the device, the sizes, and whether TensorRT is there."""

    device: str
    dry_run: bool
    out: Path
    trt_reason: str | None
    train_steps: int
    bench_cases: tuple[tuple[int, int], ...]
    bench_iters: int
    bench_warmup: int

    @property
    def has_trt(self) -> bool:
        return self.trt_reason is None


def make_plan(out: Path, *, dry_run: bool, device: str = "cuda") -> Plan:
    """The settings for a real run (``device``, AMP, the issue's benchmark sizes) or a dry one (the CPU)."""
    from cellseg_deploy.backends.tensorrt.build import trt_unavailable_reason

    return Plan(
        device="cpu" if dry_run else device,
        dry_run=dry_run,
        out=out,
        trt_reason=trt_unavailable_reason(),
        train_steps=6 if dry_run else 300,
        bench_cases=DRY_BENCH_CASES if dry_run else BENCH_CASES,
        bench_iters=1 if dry_run else 20,
        bench_warmup=0 if dry_run else 3,
    )


def _run(step: Step, func: Callable[[], str]) -> Step:
    t0 = time.perf_counter()
    try:
        step.detail = func() or ""
        step.status = "passed"
    except Exception as exc:  # a failed step is reported, and the others still run
        step.status = "failed"
        step.detail = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]
        step.data["traceback"] = traceback.format_exc(limit=6)
    step.seconds = round(time.perf_counter() - t0, 2)
    return step


def run_check(plan: Plan) -> dict[str, Any]:
    """Run every step of the check under ``plan`` and write ``report.json`` / ``report.md`` into ``plan.out``."""
    from cellseg_deploy.bench.environment import gpu_info

    plan.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    steps: list[Step] = []
    state: dict[str, Any] = {}

    steps.append(_run(Step("pytest -m gpu"), lambda: _pytest_gpu(plan, steps[-1] if steps else None)))
    train = _run(
        Step("train tiny (AMP)" if not plan.dry_run else "train tiny (fp32, CPU)"),
        lambda: _train(plan, state),
    )
    steps.append(train)
    export = Step("export stages")
    steps.append(export if "checkpoint" not in state else _run(export, lambda: _export(plan, state)))
    if "checkpoint" not in state:
        export.detail = "no checkpoint (training failed)"
    for precision in ("fp32", "fp16"):
        step = Step(f"trt {precision}: engines, parity, AP50")
        if not plan.has_trt:
            step.detail = f"skipped: {plan.trt_reason}"
        elif "stages" not in state:
            step.detail = "skipped: no stage folder (export failed)"
        else:
            _run(step, lambda p=precision, s=step: _trt_parity(plan, state, p, s))
        steps.append(step)
    engines = ["torch", "staged-torch:fp16"] + (["trt", "trt:fp16"] if plan.has_trt else [])
    for size, cells in plan.bench_cases:
        step = Step(f"bench {size} px / {cells} cells: {','.join(engines)}")
        _run(step, lambda s=size, c=cells, st=step: _bench(plan, engines, s, c, st))
        if not plan.has_trt:
            step.data["skipped_engines"] = {"trt": plan.trt_reason, "trt:fp16": plan.trt_reason}
        steps.append(step)

    report = {
        "format": "cellseg-deploy/gpu-check/1",
        "dry_run": plan.dry_run,
        "device": plan.device,
        "gpu": gpu_info("cuda" if not plan.dry_run else plan.device) or {"name": "none (dry run on the CPU)"},
        "tensorrt": None if not plan.has_trt else _trt_version(),
        "tensorrt_unavailable": plan.trt_reason,
        "passed": all(s.status != "failed" for s in steps),
        "seconds": round(time.perf_counter() - t0, 1),
        "steps": [asdict(s) for s in steps],
    }
    write_report(plan.out, report)
    return report


def _trt_version() -> str:
    import tensorrt as trt

    return str(trt.__version__)


def _pytest_gpu(plan: Plan, _previous: Step | None) -> str:
    args = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-q", "-rs", "-p", "no:cacheprovider"]
    if plan.dry_run:
        args.append("--collect-only")
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=420)
    tail = [line for line in proc.stdout.splitlines() if line.strip()][-1:] or ["(no output)"]
    if proc.returncode not in (0, 5):  # 5: nothing collected
        raise RuntimeError(f"pytest -m gpu exited {proc.returncode}: {tail[0]}")
    return tail[0]


def _train(plan: Plan, state: dict[str, Any]) -> str:
    from cellseg_deploy.data.synth import SynthConfig, make_synthetic_dataset
    from cellseg_deploy.training import load_recipe, train

    data = plan.out / "data"
    if not (data / "train").is_dir():
        make_synthetic_dataset(
            data, SynthConfig(n_train=8, n_test=2, min_size=128, max_size=192, seed=0), progress=False
        )
    epochs = max(1, plan.train_steps // 6)
    overrides = [
        f"train.device={plan.device}",
        f"train.precision={'fp32' if plan.dry_run else 'amp'}",
        "train.batch_size=1",
        f"train.epochs={epochs}",
        "train.deterministic=false",
        "train.checkpoint_every_steps=0",
        "train.time_limit_min=0",
        "schedule.warmup_steps=2",
        "schedule.time_aware=false",
        f"val.every_epochs={epochs}",
        "model.min_size=160",
        "model.max_size=320",
    ]
    result = train(load_recipe("tiny_cpu", overrides), data, plan.out / "train", progress=False)
    checkpoint = result.best_checkpoint or getattr(result, "last_checkpoint", None)
    if checkpoint is None:
        raise RuntimeError("training wrote no checkpoint")
    state["checkpoint"], state["data"] = Path(checkpoint), data
    return f"{epochs} epochs of 6 images on {plan.device}: {checkpoint}"


def _export(plan: Plan, state: dict[str, Any]) -> str:
    from cellseg_deploy.backends.staged.export import export_staged

    result = export_staged(state["checkpoint"], plan.out / "stages", fp16=True)
    state["stages"] = result.out_dir
    return f"fp32 + fp16 stage graphs in {result.seconds:.1f} s"


def _trt_parity(plan: Plan, state: dict[str, Any], precision: str, step: Step) -> str:
    from cellseg_deploy.backends.tensorrt.build import build_engines
    from cellseg_deploy.evaluation.parity import run_parity

    built = build_engines(state["stages"], fp16=precision == "fp16", workspace_gib=2)
    report = run_parity(
        state["checkpoint"],
        state["stages"],
        "trt",
        state["data"],
        profile=precision,
        device="cuda" if not plan.dry_run else "cpu",
        candidate_device="cuda",
        candidate_precision=precision,
        score_thresh=PARITY_SCORE,
        min_instances=1 if plan.dry_run else 20,
        progress=False,
    )
    step.data.update(build_seconds=round(built.seconds, 1), passed=report.passed, ap50=report.ap50_gt)
    step.data["failures"] = list(getattr(report, "failures", []))[:5]
    if not report.passed:
        raise RuntimeError(f"parity failed: {step.data['failures']}")
    return f"engines in {built.seconds:.1f} s; parity passed; segm AP50 {report.ap50_gt}"


def _bench(plan: Plan, engines: list[str], size: int, cells: int, step: Step) -> str:
    """One benchmark of ``engines`` on an untrained tiny model (``cells`` detections at ``size`` px). On a GPU
    every engine runs on it, interleaved in one run; the dry run puts the CPU engines on the CPU and the
    TensorRT ones on the (test double's) GPU, in two runs."""
    from cellseg_deploy.bench.api import BenchRequest, run_bench
    from cellseg_deploy.bench.runner_bench import BenchSettings

    if plan.dry_run:
        groups = [(plan.device, [e for e in engines if not e.startswith("trt")])]
        groups.append(("cuda", [e for e in engines if e.startswith("trt")]))
    else:
        groups = [(plan.device, engines)]
    p50: dict[str, float] = {}
    for index, (device, group) in enumerate(g for g in groups if g[1]):
        settings = BenchSettings(
            engines=tuple(group),
            warmup=plan.bench_warmup,
            iters=plan.bench_iters,
            device=device,
            memory=False,
            runner_options={"trt": {"rebuild": True}},
            progress=False,
            # a dry run's TensorRT is the test double, which exists in this process only
            isolation="shared" if plan.dry_run else "process",
        )
        out = plan.out / f"bench-{size}-{cells}" / (f"run{index}" if len(groups) > 1 else "")
        request = BenchRequest(
            settings=settings,
            untrained="tiny",
            untrained_min_size=size,
            imgsz=size,
            cells=cells,
            out_dir=out,
            cache_dir=plan.out / "bench-cache",
        )
        result = run_bench(request)
        p50.update({name: e["latency"]["p50_ms"] for name, e in result["engines"].items()})
        step.data.setdefault("reports", []).append(str(out / "bench.md"))
    step.data["p50_ms"] = p50
    return ", ".join(f"{k} {v:.1f} ms" for k, v in p50.items())


def write_report(out: Path, report: dict[str, Any]) -> None:
    """``report.json`` and ``report.md`` in ``out`` (atomic writes)."""
    from cellseg_deploy.io_utils import atomic_write_json, atomic_write_text

    atomic_write_json(out / "report.json", report)
    gpu = report["gpu"]
    lines = [
        "# GPU acceptance check" + (" (dry run on the CPU)" if report["dry_run"] else ""),
        "",
        f"- GPU: {gpu.get('name', 'unknown')}"
        + (f" (compute capability {gpu['compute_capability']})" if gpu.get("compute_capability") else ""),
        f"- TensorRT: {report['tensorrt'] or 'not used: ' + str(report['tensorrt_unavailable'])}",
        f"- result: {'passed' if report['passed'] else 'FAILED'} in {report['seconds']} s",
        "",
        "| step | status | seconds | detail |",
        "|---|---|---|---|",
    ]
    for s in report["steps"]:
        detail = str(s["detail"]).replace("|", "/").replace("\n", " ")
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']} | {detail} |")
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/gpu-check"), help="report folder")
    parser.add_argument("--device", default="cuda", help="the GPU (cuda or cuda:N)")
    parser.add_argument("--dry-run", action="store_true", help="run the orchestration on the CPU, tiny sizes")
    args = parser.parse_args(argv)
    report = run_check(make_plan(args.out, dry_run=args.dry_run, device=args.device))
    for s in report["steps"]:
        print(f"{s['status']:>7}  {s['name']}  ({s['seconds']} s)  {s['detail']}")
    print(f"report: {args.out / 'report.md'}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
