"""Benchmark reports: the printed table, Markdown, JSON and PNG plots, all from the result dict.

Every function here reads only the JSON-ready result of :func:`~cellseg_deploy.bench.runner_bench.run_benchmark`
(optionally with ``"sweeps"`` from :func:`~cellseg_deploy.bench.sweep.run_sweep`), so a report can be
regenerated from a saved ``bench.json`` without rerunning anything (:func:`write_report`).

Plots (matplotlib's Agg canvas, no global pyplot state):

- ``latency_distribution.png``: box plot of end-to-end latency per engine (whiskers 5th-95th percentile,
  mean marked).
- ``stage_breakdown.png``: mean time per stage, stacked, per engine.
- ``latency_vs_cells.png``: mean latency against cells (a ``cells`` sweep), or against detections per image
  when the workload's images differ in it.
- ``latency_vs_size.png``: mean latency against the image side (a ``size`` sweep), or against
  ``sqrt(H * W)`` when the workload's images differ in size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cellseg_deploy.bench.runner_bench import STAGES
from cellseg_deploy.cli.common import format_table, markdown_table
from cellseg_deploy.io_utils import atomic_write_json, atomic_write_text
from cellseg_deploy.plots import new_figure, save_png

STAGE_ORDER: tuple[str, ...] = STAGES

MAIN_HEADERS = [
    "engine",
    "device",
    "precision",
    "threads",
    "n",
    "mean ms",
    "std",
    "p50",
    "p90",
    "p99",
    "min",
    "max",
    "img/s",
    "x torch",
    "dets/img",
    "peak RSS MB",
    "+model MB",
]
STAGE_HEADERS = ["engine", *[f"{s} ms" for s in STAGE_ORDER], "total ms"]


def _num(v: Any, digits: int = 2) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


PROVENANCE_MARKS = {"mismatch": " [other model]", "unverified": " [unverified model]"}
"""Marks after an engine's name whose ``--model-for`` file was not shown to come from ``--model``."""


def main_rows(result: dict[str, Any]) -> list[list[Any]]:
    """One row per engine: latency statistics, throughput, speed-up over torch, detections and memory.

    An engine whose model was benchmarked with ``--allow-mismatch`` is marked after its name; detections per
    image that differ from the reference's (:func:`~cellseg_deploy.bench.runner_bench.detections_differ`)
    carry a ``*``."""
    from cellseg_deploy.bench.runner_bench import detections_differ

    differ = detections_differ(result)
    rows = []
    for name, e in result["engines"].items():
        lat = e["latency"]
        sp = e.get("speedup_vs_torch")
        mem = e.get("memory") or {}
        info = e.get("info") or {}
        mark = PROVENANCE_MARKS.get((e.get("model") or {}).get("provenance", ""), "")
        dets = _num(e["detections_per_image"]["mean"], 1) + (" *" if name in differ else "")
        rows.append(
            [
                name + mark,
                info.get("device", "?"),
                info.get("precision", "?"),
                _num(info.get("threads")),
                lat["n"],
                _num(lat["mean_ms"]),
                _num(lat["std_ms"]),
                _num(lat["p50_ms"]),
                _num(lat["p90_ms"]),
                _num(lat["p99_ms"]),
                _num(lat["min_ms"]),
                _num(lat["max_ms"]),
                _num(lat["throughput_ips"]),
                _num(sp["mean"]) if sp and sp.get("mean") is not None else "n/a",
                dets,
                _num(mem.get("peak_rss_mb"), 1),
                _num(mem.get("peak_over_baseline_mb"), 1),
            ]
        )
    return rows


def stage_rows(result: dict[str, Any]) -> list[list[Any]]:
    """One row per engine: mean milliseconds per stage and the mean total."""
    rows = []
    for name, e in result["engines"].items():
        means = e["stage_mean_ms"]
        rows.append([name, *[_num(means.get(s, 0.0)) for s in STAGE_ORDER], _num(e["latency"]["mean_ms"])])
    return rows


def sweep_rows(sweep: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Headers and rows of a sweep: one row per point and engine."""
    label = "cells" if sweep["sweep"] == "cells" else "image side px"
    headers = [
        label,
        "engine",
        "image",
        "dets/img",
        "mean ms",
        "p50 ms",
        "network ms",
        "paste+rle ms",
        "x torch",
    ]
    rows = []
    for p in sweep["points"]:
        for name, e in p["engines"].items():
            sp = e.get("speedup_vs_torch")
            rows.append(
                [
                    p["value"],
                    name,
                    f"{p['height']}x{p['width']}",
                    _num(e["detections_per_image"]["mean"], 1),
                    _num(e["latency"]["mean_ms"]),
                    _num(e["latency"]["p50_ms"]),
                    _num(e["stage_mean_ms"]["network"]),
                    _num(e["stage_mean_ms"]["paste"] + e["stage_mean_ms"]["rle"]),
                    _num(sp["mean"]) if sp and sp.get("mean") is not None else "n/a",
                ]
            )
    return headers, rows


def _env_lines(result: dict[str, Any]) -> list[str]:
    env = result["environment"]
    cpu = env["cpu"]
    v = env["versions"]
    gpu = env.get("gpu")
    lines = [
        f"CPU: {cpu['model']} ({cpu['usable_cores']} usable / {cpu['logical_cores']} logical cores), "
        f"{env['memory_total_mb'] / 1024:.1f} GiB RAM; OS: {env['os']}",
        "threads: " + ", ".join(f"{k}={val}" for k, val in env["threads"].items() if val is not None),
        "versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val is not None),
        f"load average before/after: {env.get('load_average')} / {result.get('load_average_after')}",
    ]
    if gpu:
        lines.insert(
            1,
            "GPU: "
            + (
                f"{gpu['name']} (compute {gpu['compute_capability']}, driver {gpu['driver']}, "
                f"CUDA {gpu['cuda_runtime_torch']}, {gpu['memory_total_mb']:.0f} MB)"
                if gpu.get("available")
                else "asked for, not available"
            ),
        )
    return lines


def _workload_line(result: dict[str, Any]) -> str:
    w = result["workload"]
    s = result["settings"]
    amount = (
        f"{s['iters']} rounds"
        if s["iters"] is not None
        else f"{s['seconds']} s ({result['rounds_measured']} rounds)"
    )
    return (
        f"workload: {w['description']}; {len(w['images'])} image(s); warm-up {s['warmup']} round(s), "
        f"measured {amount}; batch {s['batch']}; latency {result['latency_unit']}"
    )


def format_text_report(result: dict[str, Any]) -> str:
    """The report printed by ``cellseg-deploy bench``: settings, latency table, stage table, warnings."""
    parts = [
        _workload_line(result),
        *(_env_lines(result)),
        "",
        format_table(main_rows(result), MAIN_HEADERS),
        "",
        "mean time per stage (they add up to the total):",
        format_table(stage_rows(result), STAGE_HEADERS),
    ]
    for kind, sweep in (result.get("sweeps") or {}).items():
        headers, rows = sweep_rows(sweep)
        parts += ["", f"sweep over {kind}:", format_table(rows, headers)]
    for model_line in _model_lines(result):
        parts.append(model_line)
    for w in result.get("warnings", []):
        parts.append(f"WARNING: {w}")
    return "\n".join(parts)


def _model_lines(result: dict[str, Any]) -> list[str]:
    out = []
    for name, e in result["engines"].items():
        m = e["model"]
        checked = {
            "verified": "; exported from --model (provenance checked)",
            "mismatch": "; NOT exported from --model (--allow-mismatch)",
            "unverified": "; records no source checkpoint (--allow-mismatch)",
        }.get(m.get("provenance", ""), "")
        out.append(f"model {name}: {m['path']} ({m['source']}: {m['note']}{checked})")
    return out


def markdown_report(result: dict[str, Any], plots: list[str] | None = None) -> str:
    """The whole report as Markdown: what was measured, environment, tables, definitions, warnings, plots."""
    s = result["settings"]
    md = [
        "# cellseg-deploy benchmark",
        "",
        f"Created {result['created']} with `cellseg-deploy` {result['environment']['versions'].get('cellseg_deploy')}"
        f" (commit `{result['environment'].get('git_commit')}`).",
        "",
        "## What was measured",
        "",
        f"- {_workload_line(result)}.",
        f"- engines {', '.join(s['engines'])} on `{s['device']}`, precision `{s['precision']}`, threads "
        f"`{s['threads'] if s['threads'] is not None else 'backend default'}`.",
        f"- timing: {result['timing_method']}.",
        f"- post-processing (the same for every engine): {s['post']}.",
        "- CUDA graphs: "
        + ", ".join(f"{n} {'on' if e.get('cuda_graphs') else 'off'}" for n, e in result["engines"].items())
        + ".",
    ]
    md += [f"- {line}." for line in _model_lines(result)]
    if result.get("models_note"):
        md.append(f"- models: {result['models_note']}.")
    md += ["", "## Environment", ""] + [f"- {line}" for line in _env_lines(result)]
    md += [
        "",
        "## End-to-end latency",
        "",
        markdown_table(main_rows(result), MAIN_HEADERS),
        "",
        "`x torch`: torch's mean latency divided by this engine's (same run). `peak RSS MB`: the engine alone in a "
        "fresh process (interpreter and libraries included); `+model MB`: that peak minus the process's RSS before "
        f"the model loaded. The latency process itself peaked at {result.get('process_peak_rss_mb')} MB with every "
        "engine loaded.",
        "",
        "## Time per stage (mean ms)",
        "",
        markdown_table(stage_rows(result), STAGE_HEADERS),
    ]
    for kind, sweep in (result.get("sweeps") or {}).items():
        headers, rows = sweep_rows(sweep)
        md += [
            "",
            f"## Sweep over {kind}",
            "",
            sweep.get("description", ""),
            "",
            markdown_table(rows, headers),
        ]
        notes = sorted({w for p in sweep["points"] for w in p.get("warnings", [])})
        md += [""] + [f"- warning (some points): {w}" for w in notes] if notes else []
    md += ["", "## Definitions", ""] + [f"- `{k}`: {v}" for k, v in result["definitions"].items()]
    if result.get("warnings"):
        md += ["", "## Warnings", ""] + [f"- {w}" for w in result["warnings"]]
    if plots:
        md += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(md) + "\n"


# ----------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------
def _subtitle(result: dict[str, Any]) -> str:
    env = result["environment"]
    dev = env["gpu"]["name"] if env.get("gpu") and env["gpu"].get("available") else env["cpu"]["model"]
    return f"{dev}; threads {result['settings']['threads'] or 'default'}; {result['latency_unit']}"


def plot_distribution(result: dict[str, Any], path: Path) -> Path:
    """Box plot of the end-to-end latency samples per engine."""
    names = list(result["engines"])
    data = [result["engines"][n]["samples_ms"] for n in names]
    fig = new_figure(max(4.0, 1.6 * len(names) + 2), 4.2)
    ax = fig.add_subplot(1, 1, 1)
    ax.boxplot(data, whis=(5, 95), showmeans=True, tick_labels=names)
    ax.set_ylabel("end-to-end latency (ms)")
    ax.set_ylim(bottom=0)
    ax.set_title("latency distribution per engine\n" + _subtitle(result), fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    return save_png(fig, path)


def plot_stages(result: dict[str, Any], path: Path) -> Path:
    """Stacked horizontal bars of the mean time per stage, per engine."""
    names = list(result["engines"])
    fig = new_figure(7.5, max(2.8, 0.7 * len(names) + 2.0))
    ax = fig.add_subplot(1, 1, 1)
    left = [0.0] * len(names)
    for stage in STAGE_ORDER:
        widths = [result["engines"][n]["stage_mean_ms"].get(stage, 0.0) for n in names]
        ax.barh(names, widths, left=left, label=stage)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.set_xlabel("mean time (ms)")
    ax.set_title("where the time goes\n" + _subtitle(result), fontsize=9)
    ax.legend(
        fontsize=8, ncol=len(STAGE_ORDER), loc="upper center", bbox_to_anchor=(0.5, -0.3), frameon=False
    )
    ax.invert_yaxis()
    return save_png(fig, path)


def _xy_lines(
    result: dict[str, Any], kind: str
) -> tuple[dict[str, tuple[list[float], list[float], list[float]]], str]:
    """Per engine ``(x, mean ms, std ms)`` for ``kind`` in ``cells``/``size``, and the x label."""
    sweep = (result.get("sweeps") or {}).get(kind)
    lines: dict[str, tuple[list[float], list[float], list[float]]] = {}
    if sweep is not None:
        label = (
            "cells in the image (detections = cells for --untrained models)"
            if kind == "cells"
            else "image side (px)"
        )
        for p in sweep["points"]:
            for name, e in p["engines"].items():
                xs, ys, es = lines.setdefault(name, ([], [], []))
                xs.append(float(p["value"]))
                ys.append(e["latency"]["mean_ms"])
                es.append(e["latency"]["std_ms"])
        return lines, label
    label = "detections per image" if kind == "cells" else "image side, sqrt(H x W) (px)"
    for name, e in result["engines"].items():
        pts = sorted(
            (
                float(pi["detections"]) if kind == "cells" else (pi["height"] * pi["width"]) ** 0.5,
                pi["latency"]["mean_ms"],
                pi["latency"]["std_ms"],
            )
            for pi in e.get("per_image", [])
        )
        lines[name] = ([p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts])
    return lines, label


def can_plot_against(result: dict[str, Any], kind: str) -> bool:
    """True when there is a sweep of ``kind`` or the workload's images differ in it (at least two x values)."""
    lines, _ = _xy_lines(result, kind)
    return any(len(set(xs)) >= 2 for xs, _, _ in lines.values())


def plot_against(result: dict[str, Any], kind: str, path: Path) -> Path:
    """Mean end-to-end latency (error bars: one standard deviation) against cells or image size."""
    lines, label = _xy_lines(result, kind)
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    for name, (xs, ys, es) in lines.items():
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=name)
    ax.set_xlabel(label)
    ax.set_ylabel("mean end-to-end latency (ms)")
    ax.set_ylim(bottom=0)
    ax.set_title(
        f"latency vs {'cells' if kind == 'cells' else 'image size'}\n" + _subtitle(result), fontsize=9
    )
    ax.grid(alpha=0.3)
    ax.legend()
    return save_png(fig, path)


def write_plots(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write every plot that the result supports into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [
        plot_distribution(result, out_dir / "latency_distribution.png"),
        plot_stages(result, out_dir / "stage_breakdown.png"),
    ]
    for kind in ("cells", "size"):
        if can_plot_against(result, kind):
            paths.append(plot_against(result, kind, out_dir / f"latency_vs_{kind}.png"))
    return paths


def write_report(result: dict[str, Any], out_dir: Path, stem: str = "bench") -> dict[str, Any]:
    """Write ``<stem>.json``, ``<stem>.md`` and the plots into ``out_dir`` (atomically).

    Sets ``result["outputs"]`` to the written paths (so the JSON lists them) and returns
    ``{"json": Path, "markdown": Path, "plots": [Path, ...]}``.
    """
    plots = write_plots(result, out_dir)
    md_path = atomic_write_text(out_dir / f"{stem}.md", markdown_report(result, [str(p) for p in plots]))
    json_path = out_dir / f"{stem}.json"
    result["outputs"] = {"json": str(json_path), "markdown": str(md_path), "plots": [str(p) for p in plots]}
    atomic_write_json(json_path, result)
    return {"json": json_path, "markdown": md_path, "plots": plots}


def load_result(path: Path) -> dict[str, Any]:
    """Read a saved benchmark JSON."""
    data: dict[str, Any] = json.loads(Path(path).read_text())
    return data
