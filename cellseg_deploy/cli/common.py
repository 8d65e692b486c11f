"""Conventions every command follows.

- ``--json PATH`` writes the command's machine-readable result (atomically).
- Exit codes: 0 success, 1 a check or gate failed (:class:`~cellseg_deploy.errors.CheckFailed`),
  2 bad usage or bad input (:class:`~cellseg_deploy.errors.UserError`, click usage errors).
- A user error is one line on stderr; ``--verbose`` (on the top-level group) adds the traceback.

Commands never call ``sys.exit`` themselves: they raise, and :func:`cellseg_deploy.cli.main.main` maps.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from cellseg_deploy.io_utils import atomic_write_json

F = TypeVar("F", bound=Callable[..., Any])


def json_option(func: F) -> F:
    """Add ``--json PATH``: where to write the command's machine-readable result."""
    return click.option(
        "--json",
        "json_path",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="Also write the result as JSON to this file.",
    )(func)


def write_json_result(json_path: Path | None, result: Any) -> None:
    """Write ``result`` to ``json_path`` if one was given (atomic)."""
    if json_path is not None:
        atomic_write_json(json_path, result)
        click.echo(f"wrote {json_path}", err=True)


def echo_table(rows: list[list[Any]], headers: list[str]) -> None:
    """Print a plain aligned text table to stdout."""
    click.echo(format_table(rows, headers))


def format_table(rows: list[list[Any]], headers: list[str]) -> str:
    """Format rows as an aligned text table (floats with 4 significant decimals)."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.1f}"
        return str(v)

    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join([line, sep, *body])


def markdown_table(rows: list[list[Any]], headers: list[str]) -> str:
    """Format rows as a GitHub Markdown table."""

    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(out)
