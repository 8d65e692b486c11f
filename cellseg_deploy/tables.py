"""Tables for every layer: aligned text for terminals, GitHub Markdown for reports.

Both render a cell with :func:`format_cell`, so a number reads the same on the screen and in ``report.md``.
"""

from __future__ import annotations

from typing import Any


def format_cell(value: Any) -> str:
    """One table cell: floats with 4 decimals (1 decimal from 10 000 up, where 4 would only add noise)."""
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.1f}"
    return str(value)


def format_metric(value: float | None, digits: int = 4) -> str:
    """A score or AP in a log line or table: ``digits`` decimals, ``n/a`` where there is none (no ground
    truth, no detections)."""
    return "n/a" if value is None else f"{float(value):.{digits}f}"


def format_table(rows: list[list[Any]], headers: list[str]) -> str:
    """``rows`` as an aligned plain-text table (two spaces between columns, a dashed rule under the header)."""
    cells = [[format_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join([line, sep, *body])


def markdown_table(rows: list[list[Any]], headers: list[str]) -> str:
    """``rows`` as a GitHub Markdown table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(format_cell(v) for v in r) + " |" for r in rows]
    return "\n".join(out)
