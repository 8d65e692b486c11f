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
