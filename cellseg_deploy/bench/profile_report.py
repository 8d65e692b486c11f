"""The per-layer profile in the benchmark's reports: tables by model part, the slowest layers, a PNG.

Reads only ``engines[e].profile`` of a benchmark result (:mod:`cellseg_deploy.bench.profile`), so it works on
a saved ``bench.json`` too. ``layer_profile.png``: stacked horizontal bars of each profiled engine's layer
time per call by model part.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cellseg_deploy.bench.profile import PART_ORDER, precision_shares
from cellseg_deploy.plots import stacked_bars

TOP_LAYERS = 10
"""Slowest layers listed per engine in the Markdown report (all of them are in the JSON)."""


def profiled(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{engine: profile summary}`` of the engines that have one (not skipped, no error)."""
    out = {}
    for name, entry in result["engines"].items():
        profile = entry.get("profile") or {}
        if "parts" in profile:
            out[name] = profile
    return out


def part_rows(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Headers and rows of the table by part: one row per part, per engine ``ms (share)``."""
    profiles = profiled(result)
    names = list(profiles)
    headers = ["part", *names]
    rows = []
    for part in PART_ORDER:
        if not any(part in p["parts"] for p in profiles.values()):
            continue
        row: list[Any] = [part]
        for name in names:
            entry = profiles[name]["parts"].get(part)
            row.append("-" if entry is None else f"{entry['ms']:.1f} ({100 * entry['share']:.0f} %)")
        rows.append(row)
    rows.append(["all layers, ms per call", *[f"{profiles[n]['layer_ms_per_call']:.1f}" for n in names]])
    return headers, rows


def precision_lines(result: dict[str, Any]) -> list[str]:
    """Per engine, the share of its layer time in each precision the layers ran in."""
    lines = []
    for name, profile in profiled(result).items():
        shares = ", ".join(f"{k} {100 * v:.0f} %" for k, v in precision_shares(profile).items() if v >= 0.005)
        lines.append(f"{name} ({profile.get('execution_precision')}): {shares}")
    return lines


def top_layer_rows(profile: dict[str, Any], n: int = TOP_LAYERS) -> list[list[Any]]:
    """The ``n`` slowest layers: name, part, op, kernel, precision, ms per call."""
    return [
        [layer["name"], layer["part"], layer["op"], layer["kernel"], layer["precision"], f"{layer['ms']:.2f}"]
        for layer in profile["layers"][:n]
    ]


TOP_HEADERS = ["layer", "part", "op", "kernel", "precision", "ms"]


def plot_profile(result: dict[str, Any], path: Path) -> Path:
    """Stacked bars of each profiled engine's layer time per call by model part."""
    profiles = profiled(result)
    names = list(profiles)
    segments = []
    for i, part in enumerate(PART_ORDER):
        widths = [float(profiles[n]["parts"].get(part, {}).get("ms", 0.0)) for n in names]
        if any(widths):
            segments.append((part, f"C{i}", widths))
    return stacked_bars(
        names,
        segments,
        xlabel="layer time per call (ms, the runtime's profiler; alone in a fresh process)",
        title="per-layer profile by model part",
        path=path,
    )
