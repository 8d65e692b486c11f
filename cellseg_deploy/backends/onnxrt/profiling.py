"""ONNX Runtime's profiler output, read into :class:`~cellseg_deploy.structures.LayerTime`.

A session made with ``SessionOptions.enable_profiling = True`` records a Chrome-trace JSON list of events
until ``InferenceSession.end_profiling()`` writes it and returns its path. The events used here (as documented
in ONNX Runtime's performance-tuning guide and read from its output, ONNX Runtime 1.31):

- ``{"cat": "Session", "name": "model_run", "ts": us, "dur": us}``: one per ``run`` call;
- ``{"cat": "Node", "name": "<node>_kernel_time", "ts": us, "dur": us, "args": {"op_name", "provider",
  "output_type_shape": [{"float": [dims]}, ...]}}``: one per node executed, inside its run's window (nodes of
  ``If`` branches included).

Profiling cannot be restarted within a session, so the warm-up calls are in the file too: the events are
split into calls by the ``model_run`` windows and the caller drops what it does not want.

Node names are those of the ONNX file (``/backbone/body/...`` after the torchvision modules), with ``fused ``
before the first node of a fusion; nodes the exporter named by type alone (``NonMaxSuppression_2141``,
``If_2114``) get their graph neighbours' names from the ONNX file (:func:`graph_origins`), and the layout
reorders ONNX Runtime inserts (``ReorderInput_token_88``) the names of the nodes executed next to them.
"""

from __future__ import annotations

import bisect
from dataclasses import replace
from typing import Any

from cellseg_deploy.structures import LayerTime

ELEMENT_PRECISIONS: dict[str, str] = {
    "float": "fp32",
    "float16": "fp16",
    "bfloat16": "bf16",
    "double": "fp64",
    "int8": "int8",
    "uint8": "int8",
    "int32": "int32",
    "int64": "int64",
    "bool": "bool",
}
"""ONNX Runtime's element type names in ``output_type_shape`` -> the precision words of the rest of the tool."""

KERNEL_SUFFIX = "_kernel_time"
FUSED_PREFIX = "fused "
NEIGHBOUR_DEPTH = 3
"""How many nodes away :func:`graph_origins` looks for named neighbours."""


def graph_origins(model: Any) -> dict[str, tuple[str, ...]]:
    """For every node of an ``onnx.ModelProto`` (``If`` branches included): the names of its consumers, then of
    its producers, up to :data:`NEIGHBOUR_DEPTH` nodes away, nearest first; a branch's nodes end with the
    origin of the ``If`` that holds them."""
    origins: dict[str, tuple[str, ...]] = {}
    _graph_origins(model.graph, (), origins)
    return origins


def _graph_origins(graph: Any, outer: tuple[str, ...], origins: dict[str, tuple[str, ...]]) -> None:
    producer: dict[str, Any] = {}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.output:
            producer[name] = node
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in graph.node:
        down = _walk(node, lambda n: [c for o in n.output for c in consumers.get(o, [])])
        up = _walk(node, lambda n: [producer[i] for i in n.input if i in producer])
        origins[node.name] = tuple(dict.fromkeys([*down, *up, *outer]))
        for attribute in node.attribute:
            if attribute.HasField("g"):
                _graph_origins(attribute.g, (node.name, *origins[node.name]), origins)


def _walk(node: Any, step: Any) -> list[str]:
    names: list[str] = []
    seen = {node.name}
    frontier = [node]
    for _ in range(NEIGHBOUR_DEPTH):
        following = []
        for current in frontier:
            for n in step(current):
                if n.name in seen or n.op_type == "Constant":
                    continue
                seen.add(n.name)
                following.append(n)
                names.append(n.name)
        frontier = following
    return names


def calls_from_trace(
    events: list[dict[str, Any]], origins: dict[str, tuple[str, ...]] | None = None
) -> list[list[LayerTime]]:
    """The profiler's events, one list of node times per ``model_run``, in the order the runs happened.

    ``origins``: :func:`graph_origins` of the ONNX file, for the nodes whose own name says nothing.
    """
    origins = origins or {}
    runs = sorted(
        (int(e["ts"]), int(e["ts"]) + int(e["dur"]))
        for e in events
        if e.get("cat") == "Session" and e.get("name") == "model_run"
    )
    calls: list[list[LayerTime]] = [[] for _ in runs]
    starts = [start for start, _ in runs]
    for event in events:
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith(KERNEL_SUFFIX):
            continue
        ts = int(event["ts"])
        index = _run_of(ts, starts)
        if index is None or ts > runs[index][1]:
            continue  # outside every run (session initialisation)
        args = event.get("args", {})
        name = str(event["name"])[: -len(KERNEL_SUFFIX)]
        node = name.removeprefix(FUSED_PREFIX)
        calls[index].append(
            LayerTime(
                name=name,
                op=str(args.get("op_name", "")),
                kernel=str(args.get("provider", "")),
                precision=_output_precision(args),
                ms=int(event["dur"]) / 1e3,
                origin=tuple(dict.fromkeys((node, *origins.get(node, ())))),
            )
        )
    return [_with_execution_neighbours(call) for call in calls]


def _with_execution_neighbours(call: list[LayerTime]) -> list[LayerTime]:
    """Add to each layer's origin the names of the layers executed after and before it (a reorder that ONNX
    Runtime inserted belongs with the node it feeds or follows)."""
    out = []
    for i, layer in enumerate(call):
        after = [call[i + 1].origin[0]] if i + 1 < len(call) else []
        before = [call[i - 1].origin[0]] if i > 0 else []
        out.append(replace(layer, origin=tuple(dict.fromkeys((*layer.origin, *after, *before)))))
    return out


def _run_of(ts: int, starts: list[int]) -> int | None:
    index = bisect.bisect_right(starts, ts) - 1
    return index if index >= 0 else None


def _output_precision(args: dict[str, Any]) -> str:
    outputs = args.get("output_type_shape") or []
    if not outputs or not isinstance(outputs[0], dict) or not outputs[0]:
        return "unknown"
    element = next(iter(outputs[0]))
    return ELEMENT_PRECISIONS.get(element, element)
