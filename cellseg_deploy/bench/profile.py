"""Per-layer profile of one engine, by model part, measured alone in a fresh process.

``cellseg-deploy bench --profile`` runs, after the latency phase, each engine whose runner can time its
layers (:attr:`~cellseg_deploy.backends.base.Runner.layer_profiling`: ``openvino`` at every precision, ``onnx``)
in a new Python process (``python -m cellseg_deploy.bench.profile``) with the runtime's own profiler on
(runner option ``profile=true``): ``warmup`` untimed passes over the workload, then ``rounds`` profiled ones.
The profiler's cost lands in every call, so these calls are never the benchmark's latency samples.

Every layer is placed in a part of Mask R-CNN by the torchvision module path in its name (the ONNX export
names each node after the module that made it: ``/backbone/body/layer1/...``, ``/roi_heads/mask_head/...``);
layers the runtime made itself are placed by the names in :attr:`~cellseg_deploy.structures.LayerTime.origin`
(for OpenVINO the original nodes fused into a layer, then its neighbours). The parts, in pipeline order
(:data:`MODEL_PARTS`):

- ``preprocess``: the export's input conversion (HWC uint8 to CHW float) and torchvision's transform
  (normalise, resize, pad); the export's few output gathers at its root are counted here too;
- ``backbone`` (ResNet body), ``fpn``, ``rpn_head`` (RPN convolutions and anchors);
- ``proposals_nms``: decoding the RPN's boxes, top-k and NMS of the proposals;
- ``roi_align``: the box and mask heads' multi-scale RoIAlign with its level assignment;
- ``box_head`` (fc6, fc7, predictor), ``detections_nms`` (scores, box decoding and per-class NMS of the
  detections), ``mask_head`` (the four convolutions, the transposed convolution and the logits);
- ``unattributed``: layers no name places (reported, never spread over the others).

The summary gives per part the mean milliseconds per call (the sum of its layers' times), its share of all
layer time, its layer count and the milliseconds by the precision each layer actually ran in
(``precision_ms``); and every layer with its mean time, part, kernel and precision (``layers``, slowest first).
Layer times add up to less than the call's wall time: the runtime's own overhead between layers is not in any.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from cellseg_deploy.bench.memory import run_fresh, runner_from_spec
from cellseg_deploy.structures import LayerTime

MARKER = "CELLSEG_BENCH_PROFILE "

MODEL_PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("preprocess", ("/transform/",)),
    ("backbone", ("/backbone/body/",)),
    ("fpn", ("/backbone/fpn/",)),
    ("rpn_head", ("/rpn/head/", "/rpn/anchor_generator/")),
    ("proposals_nms", ("/rpn/",)),
    ("roi_align", ("/roi_heads/box_roi_pool/", "/roi_heads/mask_roi_pool/")),
    ("box_head", ("/roi_heads/box_head/", "/roi_heads/box_predictor/")),
    ("mask_head", ("/roi_heads/mask_head/", "/roi_heads/mask_predictor/")),
    ("detections_nms", ("/roi_heads/",)),
)
"""Part name -> module-path prefixes, most specific first within a module (``/rpn/head/`` before ``/rpn/``)."""

UNATTRIBUTED = "unattributed"

PART_ORDER: tuple[str, ...] = (
    "preprocess",
    "backbone",
    "fpn",
    "rpn_head",
    "proposals_nms",
    "roi_align",
    "box_head",
    "detections_nms",
    "mask_head",
    UNATTRIBUTED,
)
"""The parts in pipeline order, for tables and plots."""


def part_of_name(name: str) -> str | None:
    """The model part of one node name, or ``None`` when the name says nothing (a runtime-made name)."""
    for part, prefixes in MODEL_PARTS:
        if any(name.startswith(prefix) for prefix in prefixes):
            return part
    if name.startswith("/") and name.count("/") == 1:  # the export wrapper's own nodes: /Cast, /Div
        return "preprocess"
    return None


def model_part(layer: LayerTime) -> str:
    """The part of a layer: that of the first name in its name and origin that places it."""
    for name in (layer.name, *layer.origin):
        part = part_of_name(name)
        if part is not None:
            return part
    return UNATTRIBUTED


def summarise(calls: list[list[LayerTime]]) -> dict[str, Any]:
    """Mean per call of the profiled ``calls`` (each the layers that ran in one call): by part and by layer.

    Raises:
        ValueError: no call, or calls without any layer (nothing was profiled: an empty profile is no result).
    """
    if not calls or not any(calls):
        raise ValueError("no profiled layer: the profile has no call with layers")
    n = len(calls)
    layer_ms: dict[str, float] = defaultdict(float)
    first: dict[str, LayerTime] = {}
    for call in calls:
        for layer in call:
            layer_ms[layer.name] += layer.ms
            first.setdefault(layer.name, layer)
    total = sum(layer_ms.values()) / n
    parts: dict[str, dict[str, Any]] = {}
    layers = []
    for name, ms in sorted(layer_ms.items(), key=lambda kv: -kv[1]):
        layer = first[name]
        part = model_part(layer)
        mean = ms / n
        entry = parts.setdefault(part, {"ms": 0.0, "layers": 0, "precision_ms": defaultdict(float)})
        entry["ms"] += mean
        entry["layers"] += 1
        entry["precision_ms"][layer.precision] += mean
        layers.append(
            {
                "name": name,
                "part": part,
                "op": layer.op,
                "kernel": layer.kernel,
                "precision": layer.precision,
                "ms": round(mean, 4),
            }
        )
    ordered = {}
    for part in PART_ORDER:
        if part in parts:
            entry = parts[part]
            ordered[part] = {
                "ms": round(entry["ms"], 3),
                "share": round(entry["ms"] / total, 4) if total > 0 else 0.0,
                "layers": entry["layers"],
                "precision_ms": {
                    k: round(v, 3) for k, v in sorted(entry["precision_ms"].items(), key=lambda kv: -kv[1])
                },
            }
    return {"calls": n, "layer_ms_per_call": round(total, 3), "parts": ordered, "layers": layers}


def precision_shares(summary: dict[str, Any]) -> dict[str, float]:
    """Share of all layer time by the precision the layers ran in (``{"int8": 0.7, "fp32": 0.3}``)."""
    ms: dict[str, float] = defaultdict(float)
    for part in summary["parts"].values():
        for precision, value in part["precision_ms"].items():
            ms[precision] += value
    total = sum(ms.values())
    return {k: v / total for k, v in sorted(ms.items(), key=lambda kv: -kv[1])} if total > 0 else {}


def profile_engine(spec: dict[str, Any]) -> dict[str, Any]:
    """Profile one engine in *this* process (see the module docstring) and return its summary.

    ``spec``: the memory probe's keys (:func:`~cellseg_deploy.bench.memory.measure_memory`): ``engine``,
    ``label``, ``model_path``, ``device``, ``precision``, ``threads``, ``options``, ``image_paths``,
    ``rounds``, ``warmup``.
    """
    from cellseg_deploy.data.io import read_image

    images = [read_image(Path(p)) for p in spec["image_paths"]]
    warmup = int(spec.get("warmup", 0))
    runner = runner_from_spec(spec, profile=True)
    with runner:
        for _ in range(warmup + int(spec["rounds"])):
            for image in images:
                runner.infer(image)
        calls = runner.layer_profile()
        info = runner.info()
    measured = calls[warmup * len(images) :]
    summary = summarise(measured)
    summary["engine"] = spec.get("label", spec["engine"])
    summary["execution_precision"] = info.get("execution_precision", info.get("precision"))
    return summary


def probe_profile(spec: dict[str, Any], timeout_s: float = 1800.0) -> dict[str, Any]:
    """:func:`profile_engine` in a fresh Python process; failures come back as ``{"error": one line}``."""
    return run_fresh("cellseg_deploy.bench.profile", MARKER, spec, timeout_s, "profile")


def _main() -> int:
    spec = json.loads(sys.stdin.read())
    try:
        result = profile_engine(spec)
    except ValueError as exc:
        result = {"engine": spec.get("label", spec["engine"]), "error": str(exc)}
    sys.stdout.write(MARKER + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
