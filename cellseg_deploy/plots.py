"""PNG figures without global pyplot state: matplotlib's Agg canvas, written atomically.

Used by the benchmark reports, the training curves and the benchmark scripts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cellseg_deploy.io_utils import atomic_write_with


def new_figure(width: float = 7.0, height: float = 4.2, dpi: int = 110) -> Any:
    """A matplotlib ``Figure`` on its own Agg canvas; ``width``/``height`` in inches."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Any, path: Path, *, tight: bool = True) -> Path:
    """Lay ``fig`` out tightly (unless ``tight`` is false: axes placed by hand) and write it to ``path`` as PNG
    (temporary file, then rename)."""
    if tight:
        fig.tight_layout()
    return atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png"))


def stacked_bars(
    names: list[str],
    segments: list[tuple[str, str, list[float]]],
    *,
    xlabel: str,
    title: str,
    path: Path,
    totals: list[float] | None = None,
) -> Path:
    """Horizontal stacked bars, one per name (the first on top), each ended by its total in ms, the legend
    beside; ``segments``: ``(label, colour, width per name)`` in stacking order; ``totals``: the numbers
    written at the bar ends (default: the bar lengths). Written to ``path``."""
    fig = new_figure(8.6, max(2.4, 0.42 * len(names) + 1.5))
    ax = fig.add_subplot(1, 1, 1)
    left = [0.0] * len(names)
    for label, colour, widths in segments:
        ax.barh(names, widths, left=left, label=label, color=colour, height=0.65)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    for i, width in enumerate(left):
        total = width if totals is None else totals[i]
        ax.annotate(f"{total:.0f} ms", (width, i), textcoords="offset points", xytext=(4, -3), fontsize=7)
    ax.set_xlim(0, max(left) * 1.12 if left and max(left) > 0 else 1.0)
    ax.set_ylim(len(names) - 0.5, -0.5)  # first name on top, no empty band below the last bar
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.tick_params(axis="y", labelsize=8)
    return save_png(fig, path)


def add_learning_rate(ax: Any, steps: list[float], lrs: list[float]) -> Any:
    """Draw the learning rate against ``steps`` on a second y axis of ``ax`` (dashed grey, named on that
    axis, so no second legend competes with ``ax``'s); returns that axis. Used by the training curves: a loss
    that stalls or jumps reads differently once the schedule beside it is visible."""
    twin = ax.twinx()
    twin.plot(steps, lrs, color="0.45", linestyle="--", linewidth=1.0)
    twin.set_ylabel("learning rate (grey dashed)", color="0.35")
    twin.tick_params(axis="y", labelcolor="0.35", labelsize=7)
    twin.set_ylim(bottom=0)
    return twin
