"""Conventions every command follows.

- ``--json PATH`` writes the command's machine-readable result (atomically).
- Exit codes: 0 success, 1 a check or gate failed (:class:`~cellseg_deploy.errors.CheckFailed`),
  2 bad usage or bad input (:class:`~cellseg_deploy.errors.UserError`, click usage errors).
- A user error is one line on stderr; ``--verbose`` (before or after the subcommand) adds the traceback.
- Shared options (``--seed``, ``--device``, ``--split``, ``--limit``, ...) are declared once, in
  :mod:`cellseg_deploy.cli.options`.
- Outputs are checked before any work (:func:`check_outputs`): each path a command will write must be
  writable, and an existing output is refused unless ``--overwrite`` is given (then one line says it is
  replaced). A write that still fails at the end keeps the finished result elsewhere and says where.

Commands never call ``sys.exit`` themselves: they raise, and :func:`cellseg_deploy.cli.main.main` maps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

# The shared option decorators live in cli/options.py; these names stay importable from here.
from cellseg_deploy.cli.options import F as F
from cellseg_deploy.cli.options import json_option as json_option
from cellseg_deploy.cli.options import max_pixels_option as max_pixels_option
from cellseg_deploy.cli.options import overwrite_option as overwrite_option
from cellseg_deploy.io_utils import OutputError, atomic_write_json, check_output, rescue_path
from cellseg_deploy.tables import format_table


def check_outputs(
    outputs: dict[str, Path | None],
    *,
    overwrite: bool,
    folders: tuple[str, ...] = (),
    may_exist: tuple[str, ...] = (),
    hint: str | None = None,
) -> None:
    """Check every output a command will write, before any work (see :func:`~cellseg_deploy.io_utils.check_output`).

    Call it first thing in a command, before loading a model or reading data, so a path that cannot be
    written costs the user seconds, not a whole run.

    Args:
        outputs: ``{"--out": path, "--json": path, ...}``; ``None`` values (options not given) are skipped.
        overwrite: the command's ``--overwrite``.
        folders: the keys whose paths are folders.
        may_exist: the keys whose existing contents the command handles itself (only writability is checked).
        hint: what the refusal of an existing output advises (default: ``--overwrite`` or another path).

    Raises:
        OutputError: the first path that cannot be written or already exists (one line, exit 2).
    """
    notes = []
    extra = {"hint": hint} if hint else {}
    for what, path in outputs.items():
        if path is None:
            continue
        note = check_output(
            path, what=what, folder=what in folders, overwrite=overwrite, may_exist=what in may_exist, **extra
        )
        if note:
            notes.append(note)
    for note in notes:
        click.echo(note, err=True)


def write_json_result(json_path: Path | None, result: Any) -> None:
    """Write ``result`` to ``json_path`` if one was given (atomic, see :func:`write_json_file`)."""
    if json_path is not None:
        write_json_file(json_path, result, what="--json")
        click.echo(f"wrote {json_path}", err=True)


def write_json_file(path: Path, obj: Any, *, what: str, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically; keep it elsewhere if that fails at this last step.

    If the write fails (the folder became read-only, the disk is full), the finished result goes to a fresh
    file in the system's temporary folder instead and :class:`OutputError` names it, in one line.
    """
    try:
        return atomic_write_json(path, obj, indent=indent)
    except OutputError:
        raise  # the finished file was kept beside path; the message says where
    except OSError as exc:
        kept = atomic_write_json(rescue_path(path), obj, indent=indent)
        raise OutputError(
            f"cannot write {what} {path} ({exc.strerror or exc}); the result is kept in {kept}"
        ) from exc


def echo_table(rows: list[list[Any]], headers: list[str]) -> None:
    """Print a plain aligned text table to stdout."""
    click.echo(format_table(rows, headers))
