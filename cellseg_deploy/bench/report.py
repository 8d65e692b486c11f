"""Benchmark reports: the printed table, Markdown, JSON and PNG plots, all from the result dict.

Every function here reads only the JSON-ready result of :func:`~cellseg_deploy.bench.runner_bench.run_benchmark`
(optionally with ``"sweeps"`` from :func:`~cellseg_deploy.bench.sweep.run_sweep`), so a report can be
regenerated from a saved ``bench.json`` without rerunning anything (:func:`write_report`).

Plots (matplotlib's Agg canvas, no global pyplot state):

- ``latency_distribution.png``: box plot of end-to-end latency per engine (whiskers 5th-95th percentile,
  median and mean in the legend); the axis is clipped above the far-out outliers, and the samples above it
  are counted, so one outlier cannot flatten the boxes.
- ``stage_breakdown.png``: mean time per stage, stacked, per engine, with readable stage names (a staged
  runner's FP32 host steps shown as such).
- ``layer_profile.png``: with ``--profile``, each profiled engine's layer time by model part
  (:mod:`cellseg_deploy.bench.profile_report`).
- ``latency_vs_cells.png`` / ``latency_vs_size.png``: mean latency against the swept cells / image side;
  written only for a ``cells`` / ``size`` sweep (an ordinary run's images are not a sweep).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cellseg_deploy.bench.profile_report import (
    TOP_HEADERS,
    part_rows,
    plot_profile,
    precision_lines,
    profiled,
    top_layer_rows,
)
from cellseg_deploy.bench.sample import STAGES
from cellseg_deploy.io_utils import atomic_write_json, atomic_write_text
from cellseg_deploy.plots import new_figure, save_png, stacked_bars
from cellseg_deploy.tables import format_table, markdown_table

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
    "run/alone",
    "dets/img",
    "peak RSS MB",
    "+model MB",
]
STAGE_HEADERS = ["engine", *[f"{s} ms" for s in STAGES], "total ms"]


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
                _num((e.get("alone") or {}).get("run_over_alone")),
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
        rows.append([name, *[_num(means.get(s, 0.0)) for s in STAGES], _num(e["latency"]["mean_ms"])])
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


def instructions_text(cpu: dict[str, Any]) -> str:
    """``; AVX2, AVX-512`` for the CPU line; empty for results written before the field existed or off Linux."""
    names = cpu.get("instructions")
    return "; " + ", ".join(names) if names else ""


def _env_lines(result: dict[str, Any]) -> list[str]:
    env = result["environment"]
    cpu = env["cpu"]
    v = env["versions"]
    gpu = env.get("gpu")
    lines = [
        f"CPU: {cpu['model']} ({cpu['usable_cores']} usable / {cpu['logical_cores']} logical cores"
        f"{instructions_text(cpu)}), "
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
    mode = ""
    if s.get("mode") == "throughput":  # bench --mode throughput (cellseg_deploy.bench.runner_bench)
        mode = (
            f"; mode throughput (host workers {s['workers']}, concurrency {s['concurrency']}): images/s on the "
            "wall clock of the measured passes"
        )
    return (
        f"workload: {w['description']}; {len(w['images'])} image(s); warm-up {s['warmup']} round(s), "
        f"measured {amount}; batch {s['batch']}; latency {result['latency_unit']}{mode}"
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
    if profiled(result):
        headers, rows = part_rows(result)
        parts += ["", "per-layer profile, ms per call by model part (share of layer time):"]
        parts += [format_table(rows, headers), *(f"precision: {line}" for line in precision_lines(result))]
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


def _run_memory_text(result: dict[str, Any]) -> str:
    peaks = {n: e.get("run_process_peak_rss_mb") for n, e in result["engines"].items()}
    if any(v is not None for v in peaks.values()):
        listed = ", ".join(f"{n} {v} MB" for n, v in peaks.items())
        return f"Each engine ran in its own process in the run; their peaks: {listed}."
    return f"The latency process itself peaked at {result.get('process_peak_rss_mb')} MB with every engine loaded."


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
        "`x torch`: torch's mean latency divided by this engine's (same run). `run/alone`: the engine's p50 in this "
        "run over its p50 alone in a fresh process (same images and rounds; above 1: slowed by the other engines). "
        "`peak RSS MB`: the engine alone in a "
        "fresh process (interpreter and libraries included); `+model MB`: that peak minus the process's RSS before "
        f"the model loaded. {_run_memory_text(result)}",
        "",
        "## Time per stage (mean ms)",
        "",
        markdown_table(stage_rows(result), STAGE_HEADERS),
    ]
    if profiled(result):
        headers, rows = part_rows(result)
        md += [
            "",
            "## Per-layer profile",
            "",
            "Each engine alone in a fresh process with its runtime's profiler on (OpenVINO's performance counters, "
            "ONNX Runtime's profiler), after the timed runs; the profiler's cost is in none of the times above. "
            "Mean ms per call by model part (share of all layer time); layer times leave out the runtime's "
            "overhead between layers.",
            "",
            markdown_table(rows, headers),
            "",
            *(f"- precision the layers ran in, {line}" for line in precision_lines(result)),
        ]
        for name, profile in profiled(result).items():
            md += ["", f"Slowest layers of {name}:", "", markdown_table(top_layer_rows(profile), TOP_HEADERS)]
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
STAGE_LABELS: dict[str, str] = {
    "decode": "decode TIFF",
    "preprocess": "preprocess",
    "network": "network",
    "host_steps": "staged host steps (RPN post, box post, mask post)",
    "infer_other": "output conversion / copies",
    "paste": "mask paste",
    "rle": "RLE encode",
    "other": "other (selection, Python)",
}
"""Readable names of the stages in the plots (``host_steps`` is carved out of ``infer_other``)."""

HOST_STEPS: tuple[str, ...] = ("rpn_post", "box_post", "mask_post")
"""Substages of a staged runner that are its FP32 host steps (inside ``infer_other``)."""


def threads_text(result: dict[str, Any]) -> str:
    """The intra-op threads the runners used: the asked number, or the default that was in force."""
    env = result["environment"]
    asked = result["settings"].get("threads")
    if asked is not None:
        return str(asked)
    reported = {(e.get("info") or {}).get("threads") for e in result["engines"].values()} - {None}
    if len(reported) == 1:
        return f"{next(iter(reported))} (backend default)"
    torch_threads = (env.get("threads") or {}).get("torch_intra_op")
    cores = env["cpu"].get("usable_cores")
    return f"backend default: torch {torch_threads}, {cores} usable cores"


def _subtitle(result: dict[str, Any]) -> str:
    env = result["environment"]
    dev = env["gpu"]["name"] if env.get("gpu") and env["gpu"].get("available") else env["cpu"]["model"]
    return f"{dev}; threads {threads_text(result)}; {result['latency_unit']}"


def distribution_top(samples: list[Any]) -> float:
    """Top of the latency axis (ms), from one array of sample latencies per engine.

    10 % above the largest sample that is not a far-out outlier of its engine (above ``Q3 + 3 IQR + 5 %`` of
    the median, Tukey's far-out fence with a floor for very tight runs). Quartiles, unlike a 95th percentile
    of a few samples, do not move with one extreme value."""
    import numpy as np

    tops = []
    for d in samples:
        arr = np.asarray(d, np.float64)
        if not len(arr):
            continue
        q1, q3, med = np.percentile(arr, [25, 75, 50])
        fence = q3 + 3.0 * (q3 - q1) + 0.05 * med
        tops.append(float(arr[arr <= fence].max()))
    return 1.1 * max(tops)


def plot_distribution(result: dict[str, Any], path: Path) -> Path:
    """Box plot of the end-to-end latency samples per engine (box: quartiles, whiskers: 5th-95th percentile).

    The axis ends above the largest sample that is not a far-out outlier (:func:`distribution_top`); samples
    beyond it are drawn as triangles on the top edge and counted in the legend, with the largest value."""
    import numpy as np
    from matplotlib.lines import Line2D

    names = list(result["engines"])
    data = [np.asarray(result["engines"][n]["samples_ms"], dtype=np.float64) for n in names]
    top = distribution_top(data)
    fig = new_figure(max(5.0, 1.3 * len(names) + 2.5), 4.4)
    ax = fig.add_subplot(1, 1, 1)
    ax.boxplot(
        data,
        whis=(5, 95),
        showmeans=True,
        tick_labels=names,
        medianprops={"color": "#d95f02", "linewidth": 1.6},
        meanprops={
            "marker": "D",
            "markerfacecolor": "#1b9e77",
            "markeredgecolor": "#1b9e77",
            "markersize": 5,
        },
        flierprops={"marker": "o", "markersize": 3, "alpha": 0.6},
    )
    clipped = 0
    largest = 0.0
    for i, d in enumerate(data, start=1):
        above = d[d > top]
        if len(above):
            clipped += len(above)
            largest = max(largest, float(above.max()))
            ax.plot([i], [top * 0.985], marker="^", color="#7570b3", markersize=7, clip_on=False)
            ax.annotate(
                f"{len(above)}", (i, top * 0.985), textcoords="offset points", xytext=(6, -4), fontsize=7
            )
    ax.set_ylim(0, top)
    handles = [
        Line2D([], [], color="#d95f02", linewidth=1.6, label="median"),
        Line2D([], [], marker="D", linestyle="", color="#1b9e77", markersize=5, label="mean"),
        Line2D(
            [],
            [],
            marker="s",
            linestyle="",
            markerfacecolor="none",
            color="black",
            label="box: quartiles, whiskers: p5-p95",
        ),
    ]
    if clipped:
        handles.append(
            Line2D(
                [],
                [],
                marker="^",
                linestyle="",
                color="#7570b3",
                markersize=7,
                label=f"{clipped} sample(s) above the axis (largest {largest:.0f} ms)",
            )
        )
    ax.legend(handles=handles, fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_ylabel("end-to-end latency (ms)")
    n = min(len(d) for d in data)
    ax.set_title(f"latency distribution per engine ({n} samples each)\n" + _subtitle(result), fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.tick_params(axis="x", labelsize=8, rotation=20)
    return save_png(fig, path)


def stage_segments(entry: dict[str, Any]) -> dict[str, float]:
    """Mean ms per plotted stage of one engine: :data:`STAGES` with a staged runner's host steps
    (:data:`HOST_STEPS` substages) taken out of ``infer_other`` and shown as ``host_steps``."""
    means = dict(entry["stage_mean_ms"])
    sub = entry.get("substages") or {}
    host = sum(float(sub[k]["mean_ms"]) for k in HOST_STEPS if k in sub)
    host = min(host, float(means.get("infer_other", 0.0)))
    out: dict[str, float] = {}
    for stage in STAGES:
        if stage == "infer_other":
            out["host_steps"] = host
            out["infer_other"] = float(means.get("infer_other", 0.0)) - host
        else:
            out[stage] = float(means.get(stage, 0.0))
    return out


def plot_stages(result: dict[str, Any], path: Path) -> Path:
    """Stacked horizontal bars of the mean time per stage, per engine (readable stage names, legend beside)."""
    names = list(result["engines"])
    segments = {n: stage_segments(result["engines"][n]) for n in names}
    totals = {n: sum(v.values()) for n, v in segments.items()}
    # Stages under 0.5 % of every engine's total are invisible bars: leave them out of the legend too.
    shown = [k for k in STAGE_LABELS if any(segments[n][k] > 0.005 * max(totals[n], 1e-9) for n in names)]
    colours = {k: f"C{i}" for i, k in enumerate(STAGE_LABELS)}
    return stacked_bars(
        names,
        [(STAGE_LABELS[k], colours[k], [segments[n][k] for n in names]) for k in shown],
        xlabel="mean time per image (ms)",
        title="where the time goes\n" + _subtitle(result),
        path=path,
        totals=[totals[n] for n in names],  # every stage, the ones too small to draw too
    )


def _xy_lines(
    result: dict[str, Any], kind: str
) -> tuple[dict[str, tuple[list[float], list[float], list[float]]], str]:
    """Per engine ``(x, mean ms, std ms)`` of the ``kind`` sweep (``cells``/``size``), and the x label.

    Only a sweep gives such a line: the images of an ordinary run differ in many ways at once (size, cells,
    content), so joining them would draw noise as a trend. No sweep: no lines."""
    sweep = (result.get("sweeps") or {}).get(kind)
    lines: dict[str, tuple[list[float], list[float], list[float]]] = {}
    label = (
        "cells in the image (detections = cells for --untrained models)"
        if kind == "cells"
        else "image side (px)"
    )
    if sweep is None:
        return lines, label
    for p in sweep["points"]:
        for name, e in p["engines"].items():
            xs, ys, es = lines.setdefault(name, ([], [], []))
            xs.append(float(p["value"]))
            ys.append(e["latency"]["mean_ms"])
            es.append(e["latency"]["std_ms"])
    return lines, label


def can_plot_against(result: dict[str, Any], kind: str) -> bool:
    """True when the result holds a sweep of ``kind`` with at least two points."""
    lines, _ = _xy_lines(result, kind)
    return any(len(set(xs)) >= 2 for xs, _, _ in lines.values())


def plot_against(result: dict[str, Any], kind: str, path: Path) -> Path:
    """Mean end-to-end latency (error bars: one standard deviation) against the swept cells or image size."""
    lines, label = _xy_lines(result, kind)
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    for name, (xs, ys, es) in lines.items():
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=name)
    ax.set_xlabel(label)
    ax.set_ylabel("mean end-to-end latency (ms)")
    ax.set_ylim(bottom=0)
    ax.set_title(
        f"latency vs {'cells' if kind == 'cells' else 'image size'} (sweep)\n" + _subtitle(result), fontsize=9
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, path)


def write_plots(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write every plot that the result supports into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [
        plot_distribution(result, out_dir / "latency_distribution.png"),
        plot_stages(result, out_dir / "stage_breakdown.png"),
    ]
    if profiled(result):
        paths.append(plot_profile(result, out_dir / "layer_profile.png"))
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
