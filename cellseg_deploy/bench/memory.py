"""Peak memory and latency of one engine alone, measured in a fresh process.

The latency measurement keeps every engine loaded in one process (so they can be interleaved), which makes
the process's memory high-water mark a mix of all of them, and lets the engines slow each other down (the
thread pools of the other runtimes, caches, memory bandwidth). Here each engine runs alone in a new Python
process (``python -m cellseg_deploy.bench.memory``) that imports what the engine needs, records its resident
set size (RSS), loads the engine, runs the same pipeline as the benchmark (decode, infer, post-process) over
the workload (``warmup`` untimed passes, then ``rounds`` timed ones), and reports:

- ``baseline_rss_mb``: RSS after imports, before the model is loaded (interpreter + libraries);
- ``loaded_rss_mb``: RSS after the model is loaded;
- ``peak_rss_mb``: the process's RSS high-water mark (:func:`peak_rss_mb`) from the baseline on (the mark
  is reset there where Linux allows, see ``peak_since``): the interpreter and imports included;
- ``peak_over_baseline_mb``: ``peak_rss_mb - baseline_rss_mb``, the memory the model and inference added;
- on CUDA, ``cuda_torch_peak_allocated_mb`` (``torch.cuda.max_memory_allocated``: torch's caching allocator
  only, so it covers the torch runner and not ONNX Runtime or TensorRT allocations) and
  ``cuda_device_used_peak_over_baseline_mb`` (device-wide used memory from ``cudaMemGetInfo``, sampled
  after every call, minus its value before loading: every allocator and the CUDA context of this process,
  but also any change made by other processes on the same GPU meanwhile);
- ``alone_latency``: ``n``, ``p50_ms`` and ``mean_ms`` of the timed calls (host wall clock, one call = one
  benchmark sample: decode + infer + post-process, device synchronised at the end), which the benchmark sets
  beside the same engine's latency in the interleaved run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MARKER = "CELLSEG_BENCH_MEMORY "


def peak_rss_mb() -> float:
    """This process's RSS high-water mark in MiB.

    Linux: ``VmHWM`` from ``/proc/self/status``, which belongs to the current address space (it starts again
    at ``exec``, and :func:`reset_peak_rss` can restart it). Elsewhere ``getrusage(RUSAGE_SELF).ru_maxrss``,
    which on Linux would also carry the parent's RSS at ``fork`` over the ``exec`` of a child process.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10
    except (OSError, ValueError, IndexError):
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def reset_peak_rss() -> bool:
    """Restart the RSS high-water mark at the current RSS (Linux ``clear_refs`` 5); False when unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def measure_memory(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one engine over the workload in *this* process and report its memory (see the module docstring).

    ``spec`` keys: ``engine`` (runner name), ``label`` (optional, for the report), ``model_path``, ``device``, ``precision``, ``threads``, ``batch``,
    ``options``, ``image_paths`` (list of TIFF paths), ``rounds`` (timed passes over the images), ``warmup``
    (untimed passes before them; optional, default 0), ``post``
    (:class:`~cellseg_deploy.postprocess.PostprocessConfig` fields).
    """
    import numpy as np
    import psutil

    from cellseg_deploy.backends import get_runner_class
    from cellseg_deploy.data.io import read_image
    from cellseg_deploy.postprocess import PostprocessConfig, postprocess

    get_runner_class(spec["engine"])  # imports the backend module
    device: str = spec["device"]
    cuda = device.startswith("cuda")
    torch: Any = None
    device_base = 0
    if cuda:
        import torch

        torch.cuda.init()
        free, total = torch.cuda.mem_get_info(device)
        device_base = total - free
        torch.cuda.reset_peak_memory_stats(device)
    proc = psutil.Process()
    baseline = proc.memory_info().rss / 2**20
    peak_reset = reset_peak_rss()
    post = PostprocessConfig(**spec["post"])
    paths = [Path(p) for p in spec["image_paths"]]
    batch = int(spec["batch"])
    device_peak = 0
    runner = runner_from_spec(spec)
    with runner:
        loaded = proc.memory_info().rss / 2**20
        calls = 0
        warmup = int(spec.get("warmup", 0))
        timed_s: list[float] = []
        for r in range(warmup + int(spec["rounds"])):
            for start in range(0, len(paths), batch):
                t0 = time.perf_counter()
                images = [read_image(p) for p in paths[start : start + batch]]
                dets = [runner.infer(images[0])] if len(images) == 1 else runner.infer_batch(images)
                for det in dets:
                    postprocess(det, post)
                if cuda:
                    torch.cuda.synchronize(device)
                if r >= warmup:
                    timed_s.append(time.perf_counter() - t0)
                calls += 1
                if cuda:
                    free, total = torch.cuda.mem_get_info(device)
                    device_peak = max(device_peak, total - free)
    out: dict[str, Any] = {
        "engine": spec.get("label", spec["engine"]),
        "pid": os.getpid(),
        "calls": calls,
        "baseline_rss_mb": round(baseline, 1),
        "loaded_rss_mb": round(loaded, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_since": "baseline (high-water mark reset after imports)" if peak_reset else "process start",
    }
    out["peak_over_baseline_mb"] = round(out["peak_rss_mb"] - baseline, 1)
    out["alone_latency"] = {
        "n": len(timed_s),
        "p50_ms": round(float(np.median(timed_s)) * 1e3, 4),
        "mean_ms": round(float(np.mean(timed_s)) * 1e3, 4),
    }
    if cuda:
        out["cuda_torch_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        out["cuda_device_used_peak_over_baseline_mb"] = round((device_peak - device_base) / 2**20, 1)
    return out


def runner_from_spec(spec: dict[str, Any], **options: Any) -> Any:
    """The (not yet loaded) runner a probe's ``spec`` names, with ``options`` over the spec's own."""
    from cellseg_deploy.backends import create_runner

    return create_runner(
        spec["engine"],
        spec["model_path"],
        device=spec["device"],
        precision=spec["precision"],
        threads=spec["threads"],
        options={**(spec.get("options") or {}), **options},
    )


def probe_memory(spec: dict[str, Any], timeout_s: float = 1800.0) -> dict[str, Any]:
    """Run :func:`measure_memory` for ``spec`` in a fresh Python process and return its report.

    Failures do not raise: the report then holds ``"error"`` (one line) so the latency results survive.
    """
    return run_fresh("cellseg_deploy.bench.memory", MARKER, spec, timeout_s, "memory probe")


def run_fresh(module: str, marker: str, spec: dict[str, Any], timeout_s: float, what: str) -> dict[str, Any]:
    """``python -m module`` with ``spec`` as JSON on stdin; its report is the stdout line after ``marker``.

    Failures do not raise: the report then holds ``"error"`` (one line, naming ``what`` failed).
    """
    cmd = [sys.executable, "-m", module]
    try:
        proc = subprocess.run(
            cmd, input=json.dumps(spec), capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        return {
            "engine": spec.get("label", spec["engine"]),
            "error": f"{what} timed out after {timeout_s:.0f} s",
        }
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(marker):
            result: dict[str, Any] = json.loads(line[len(marker) :])
            return result
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
    return {
        "engine": spec.get("label", spec["engine"]),
        "error": f"{what} exited with code {proc.returncode}: {tail}",
    }


def _main() -> int:
    spec = json.loads(sys.stdin.read())
    result = measure_memory(spec)
    sys.stdout.write(MARKER + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
