"""OpenVINO's per-layer performance counters, read into :class:`~cellseg_deploy.structures.LayerTime`.

A model compiled with ``PERF_COUNT=YES`` times every layer of its runtime graph in each inference;
``InferRequest.get_profiling_info()`` returns, for the last inference, one ``ProfilingInfo`` per layer with
``node_name``, ``node_type``, ``exec_type`` (the kernel, ending in the precision it ran in: ``jit_avx2_I8``,
``brgconv_avx512_amx_bf16``, ``ref_any_f32``), ``real_time`` (a ``timedelta``) and ``status`` (``EXECUTED``,
``NOT_RUN``, ``OPTIMIZED_OUT``). Names as read in OpenVINO's Python API reference (``openvino.ProfilingInfo``)
and checked against OpenVINO 2026.4 on the CPU plugin.

The runtime graph (``CompiledModel.get_runtime_model()``) names each layer after one of the original nodes it
fused, and lists all of them in the rt_info entry ``originalLayersNames`` (comma-separated). Layers the plugin
made itself (reorders, the quantise steps of an int8 IR, some transposed convolutions) have names such as
``FakeQuantize_91523``: :func:`runtime_origins` adds the names of their neighbours so the layer can still be
placed in the model.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from cellseg_deploy.structures import LayerTime

KERNEL_PRECISIONS: dict[str, str] = {
    "i8": "int8",
    "u8": "int8",
    "bf16": "bf16",
    "f16": "fp16",
    "f32": "fp32",
    "i32": "int32",
    "i64": "int64",
    "boolean": "bool",
}
"""The precision suffix of an ``exec_type`` (lower-cased) -> the precision words of the rest of the tool."""

NEIGHBOUR_DEPTH = 3
"""How many layers away :func:`runtime_origins` looks for a named neighbour of a layer the plugin made."""


def kernel_precision(exec_type: str) -> str:
    """The precision in an OpenVINO kernel name: ``jit_avx2_I8`` -> ``int8``, ``brgconv_avx512_f32`` ->
    ``fp32``; ``unknown`` when the name ends in none (``undef``)."""
    suffix = exec_type.rsplit("_", 1)[-1].lower()
    return KERNEL_PRECISIONS.get(suffix, "unknown")


def runtime_origins(runtime_model: Any) -> dict[str, tuple[str, ...]]:
    """For each layer of ``CompiledModel.get_runtime_model()``: its name, the original nodes fused into it,
    then the names of its consumers and producers up to :data:`NEIGHBOUR_DEPTH` layers away (constants left
    out), nearest first."""
    origins: dict[str, tuple[str, ...]] = {}
    for op in runtime_model.get_ordered_ops():
        name = op.get_friendly_name()
        own = [name, *_original_names(op)]
        near = _neighbour_names(op, consumers=True) + _neighbour_names(op, consumers=False)
        origins[name] = tuple(dict.fromkeys(own + near))
    return origins


def layer_times(profiling_info: Iterable[Any], origins: dict[str, tuple[str, ...]]) -> list[LayerTime]:
    """The layers that ran in the last inference (``InferRequest.get_profiling_info()``), in graph order."""
    out = []
    for record in profiling_info:
        if str(record.status).rsplit(".", 1)[-1] != "EXECUTED":
            continue
        name = str(record.node_name)
        out.append(
            LayerTime(
                name=name,
                op=str(record.node_type),
                kernel=str(record.exec_type),
                precision=kernel_precision(str(record.exec_type)),
                ms=record.real_time.total_seconds() * 1e3,
                origin=origins.get(name, (name,)),
            )
        )
    return out


def _original_names(op: Any) -> list[str]:
    text = _rt_text(op, "originalLayersNames") or ""
    return [n for n in text.split(",") if n]


def _neighbour_names(op: Any, *, consumers: bool) -> list[str]:
    names: list[str] = []
    frontier = [op]
    seen = {op.get_friendly_name()}  # the Python wrappers of one node differ from call to call: go by name
    for _ in range(NEIGHBOUR_DEPTH):
        following = []
        for node in frontier:
            if consumers:
                nexts = [t.get_node() for o in node.outputs() for t in o.get_target_inputs()]
            else:
                nexts = [i.get_source_output().get_node() for i in node.inputs()]
            for n in nexts:
                name = n.get_friendly_name()
                if name in seen or _layer_type(n) in ("Const", "Input", "Output"):
                    continue
                seen.add(name)
                following.append(n)
                names.append(name)
                names.extend(_original_names(n))
        frontier = following
    return names


def _rt_text(op: Any, key: str) -> str | None:
    info = op.get_rt_info()
    if key not in info:
        return None
    value = info[key]
    return str(value.astype(str)) if hasattr(value, "astype") else str(value)


def _layer_type(op: Any) -> str | None:
    return _rt_text(op, "layerType")
