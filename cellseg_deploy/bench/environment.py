"""What a benchmark ran on: hardware, threads, operating system and library versions.

Every field is a plain JSON value. Nothing here imports a heavy backend that is not already loaded:
library versions come from the installed package metadata, and GPU details from torch only when the
benchmark runs on CUDA (torch is then loaded anyway).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil

from cellseg_deploy import __version__
from cellseg_deploy.cpu import cpu_flags, vector_instructions

# Import name -> distribution names that may provide it (first installed one wins).
_DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "torchvision": ("torchvision",),
    "numpy": ("numpy",),
    "onnx": ("onnx",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino"),
    "tensorrt": ("tensorrt", "tensorrt-cu13", "tensorrt-cu12"),
    "openvino": ("openvino",),
    "cv2": ("opencv-python-headless", "opencv-python", "opencv-contrib-python"),
    "pycocotools": ("pycocotools",),
    "tifffile": ("tifffile",),
    "imagecodecs": ("imagecodecs",),
}


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux, else :func:`platform.processor`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_versions() -> dict[str, str | None]:
    """Installed version of each library that shapes the numbers; ``None`` when it is not installed.

    A version is reported only when the module is also importable (metadata alone can be stale).
    """
    out: dict[str, str | None] = {"python": platform.python_version(), "cellseg_deploy": __version__}
    for module, dists in _DISTRIBUTIONS.items():
        version = None
        if importlib.util.find_spec(module) is not None:
            for dist in dists:
                try:
                    version = importlib.metadata.version(dist)
                    break
                except importlib.metadata.PackageNotFoundError:
                    continue
        out[module] = version
    return out


def thread_settings() -> dict[str, Any]:
    """Thread counts in force now: environment variables and those of already-loaded libraries."""
    out: dict[str, Any] = {
        name: os.environ.get(name) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        out["torch_intra_op"] = int(torch.get_num_threads())
        out["torch_inter_op"] = int(torch.get_num_interop_threads())
    cv2 = sys.modules.get("cv2")
    if cv2 is not None:
        out["opencv"] = int(cv2.getNumThreads())
    return out


def gpu_info(device: str) -> dict[str, Any] | None:
    """Name, compute capability, memory, driver and CUDA versions of ``device``; ``None`` on the CPU."""
    if not device.startswith("cuda"):
        return None
    import torch

    if not torch.cuda.is_available():
        return {"available": False}
    index = torch.device(device).index or 0
    props = torch.cuda.get_device_properties(index)
    major, minor = torch.cuda.get_device_capability(index)
    return {
        "available": True,
        "index": index,
        "name": torch.cuda.get_device_name(index),
        "compute_capability": f"{major}.{minor}",
        "memory_total_mb": round(props.total_memory / 2**20, 1),
        "multiprocessors": int(props.multi_processor_count),
        "driver": _nvidia_driver_version(),
        "cuda_runtime_torch": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }


def _nvidia_driver_version() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def load_average() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages (Unix), ``None`` elsewhere."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def git_commit(start: Path | None = None) -> str | None:
    """The source tree's commit (with ``-dirty`` when it has changes); ``None`` when the package does not run
    from a git checkout (installed from a wheel: ``versions["cellseg_deploy"]`` names the release then).

    A package imported from ``site-packages`` of a virtual environment that happens to sit inside some git
    checkout must not report that checkout's commit, so the root must hold this package's own
    ``pyproject.toml`` and ``.git``."""
    root = start or Path(__file__).resolve().parents[2]
    if start is None and not ((root / ".git").exists() and (root / "pyproject.toml").is_file()):
        return None
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty else sha


def capture_environment(device: str = "cpu", threads: int | None = None) -> dict[str, Any]:
    """Everything about the machine and software a reader needs to interpret the numbers.

    Args:
        device: the device the benchmark runs on (``"cpu"`` or ``"cuda[:N]"``).
        threads: the ``--threads`` value the runners were given (``None``: each backend's default).

    Returns:
        ``{"cpu": {...}, "memory_total_mb", "threads": {...}, "gpu": {...} | None, "os", "versions": {...},
        "git_commit", "load_average"}``.
    """
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu": {
            "model": cpu_model(),
            "logical_cores": os.cpu_count(),
            "physical_cores": psutil.cpu_count(logical=False),
            "usable_cores": affinity,
            "architecture": platform.machine(),
            # the marketing name does not tell an AVX2-only CPU from one with AVX-512 VNNI or AMX
            "instructions": vector_instructions(cpu_flags()),
        },
        "memory_total_mb": round(psutil.virtual_memory().total / 2**20, 1),
        "threads": {"requested": threads, **thread_settings()},
        "gpu": gpu_info(device),
        "os": platform.platform(),
        "versions": package_versions(),
        "git_commit": git_commit(),
        "load_average": load_average(),
    }
