"""The options several commands share, declared once so that each has one spelling, one meaning and one default.

Every command that takes one of these takes it from here (see "Command-line conventions" in the README):

- ``--seed N``: a seed; each command's help says what it seeds (the train/val split, synthetic images, ...).
- ``--device D``: ``cpu``, ``cuda`` or ``cuda:N``.
- ``--split S``: the images of a dataset, one of :data:`~cellseg_deploy.data.layout.SPLITS` (in that order).
- ``--val-fraction F``: share of ``train/`` held out as val (as in training).
- ``--limit N``: only the first N images.
- ``--precision P``: one of :data:`PRECISIONS`; inside an ``--engine`` list, ``engine:precision`` makes the
  same choice per engine.
- ``--threads N``: CPU threads of each runner.
- ``--progress/--no-progress``: progress bars on stderr.
- ``--json PATH``, ``--overwrite``, ``--max-pixels N``: the result as JSON, replacing outputs, the image limit.
- ``--verbose``/``-v``: tracebacks and debug logging, before or after the subcommand.

Each decorator adds one ``click.option``; the factories take the few things that differ between commands
(a default, the help's last words) and nothing that would make one spelling mean two things.
Renamed options keep their old spelling as a hidden alias (:func:`deprecated_alias`) that still works and
says once, on stderr, what to write instead.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import click
from click.core import ParameterSource

from cellseg_deploy.data.layout import DEFAULT_VAL_FRACTION, SPLITS

F = TypeVar("F", bound=Callable[..., Any])

# The precisions a runner may be asked for (each runner accepts a subset, see its ``precisions``); also the
# names of parity's tolerance profiles.
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8")


class Decorator(Protocol):
    """What the option factories return: a decorator that adds one option and keeps the function's type."""

    def __call__(self, func: F, /) -> F: ...


def seed_option(help: str = "Seed of the train/val split.", default: int | None = 0) -> Decorator:
    """``--seed N``; ``help`` says what it seeds (the train/val split unless told otherwise)."""
    return click.option("--seed", type=int, default=default, show_default=default is not None, help=help)


def device_option(
    help: str = "cpu, cuda or cuda:N.", default: str | None = "cpu", metavar: str | None = None
) -> Decorator:
    """``--device D``: where the model runs (``cpu``, ``cuda`` or ``cuda:N``)."""
    return click.option(
        "--device", default=default, show_default=default is not None, metavar=metavar, help=help
    )


def split_option(
    help: str = "Which images: all of train/, the seeded train or val split of train/ (as in training), or "
    "test (test_release/ with test_ground_truth.json).",
    default: str = "val",
) -> Decorator:
    """``--split S``: one of :data:`~cellseg_deploy.data.layout.SPLITS`, offered in that order by every command."""
    return click.option("--split", type=click.Choice(SPLITS), default=default, show_default=True, help=help)


def val_fraction_option(func: F) -> F:
    """``--val-fraction F`` in (0, 1): the share of ``train/`` held out as val, default the data layer's."""
    return click.option(
        "--val-fraction",
        type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
        default=DEFAULT_VAL_FRACTION,
        show_default=True,
        help="Fraction of train/ held out as val (as in training).",
    )(func)


def limit_option(help: str = "Use only the first N images.") -> Decorator:
    """``--limit N``: only the first N images (of the split, the folder, ...; ``help`` says of what)."""
    return click.option("--limit", type=click.IntRange(min=1), default=None, metavar="N", help=help)


def precision_option(
    help: str = "Runner precision (each runner accepts some of these).", default: str | None = "fp32"
) -> Decorator:
    """``--precision P``: one of :data:`PRECISIONS`."""
    return click.option(
        "--precision",
        type=click.Choice(PRECISIONS),
        default=default,
        show_default=default is not None,
        help=help,
    )


def threads_option(help: str = "CPU threads per runner. Default: the backend's own.") -> Decorator:
    """``--threads N`` (N >= 1): intra-op CPU threads of each runner."""
    return click.option("--threads", type=click.IntRange(min=1), default=None, metavar="N", help=help)


def progress_option(default: bool = True) -> Decorator:
    """``--progress/--no-progress``: progress bars on stderr."""
    return click.option(
        "--progress/--no-progress", default=default, show_default=True, help="Show progress bars on stderr."
    )


def json_option(func: F) -> F:
    """Add ``--json PATH``: where to write the command's machine-readable result."""
    return click.option(
        "--json",
        "json_path",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="Also write the result as JSON to this file.",
    )(func)


def overwrite_option(func: F) -> F:
    """Add ``--overwrite``: replace outputs that already exist (without it they are refused before any work)."""
    return click.option(
        "--overwrite",
        is_flag=True,
        help="Replace outputs that already exist (without it an existing output stops the command before "
        "any work).",
    )(func)


def max_pixels_option(func: F) -> F:
    """Add ``--max-pixels N``: the largest image (height x width) read; larger ones are refused from the header."""
    return click.option(
        "--max-pixels",
        type=click.IntRange(min=1),
        default=None,
        metavar="N",
        help="Refuse images with more pixels (height x width) than this, before decoding them. "
        "[default: 25000000, i.e. 5000 x 5000]",
    )(func)


def deprecated_alias(old: str, new: str, dest: str, type: Any = None) -> Decorator:
    """Keep ``old`` working as a hidden, deprecated spelling of option ``new`` (parameter ``dest``).

    The alias takes the same ``type`` as ``new``; given alone it fills ``dest`` and prints one line on stderr
    naming the new spelling. Given together with ``new`` and a different value it is a usage error (which
    value was meant cannot be told); with the same value it is only warned about.
    """
    alias_dest = "_deprecated_" + old.lstrip("-").replace("-", "_")

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            value = kwargs.pop(alias_dest, None)
            if value is not None:
                ctx = click.get_current_context()
                given = ctx.get_parameter_source(dest) not in (None, ParameterSource.DEFAULT)
                if given and kwargs[dest] != value:
                    raise click.UsageError(
                        f"{old} is the deprecated spelling of {new}; give {new} only", ctx=ctx
                    )
                kwargs[dest] = value
                click.echo(f"warning: {old} is deprecated; use {new} (same meaning)", err=True)
            return func(*args, **kwargs)

        aliased = click.option(
            old, alias_dest, type=type, default=None, hidden=True, help=f"Deprecated spelling of {new}."
        )(wrapper)
        return cast(F, aliased)

    return decorate


# -- --verbose on every command -------------------------------------------------------------------------------

_VERBOSE = {"on": False}


def verbose_requested() -> bool:
    """Whether ``--verbose``/``-v`` was given, before or after the subcommand, in this invocation."""
    return _VERBOSE["on"]


def reset_verbose() -> None:
    """Forget an earlier invocation's ``--verbose`` (``main`` calls this first; tests call ``main`` often)."""
    _VERBOSE["on"] = False


def set_verbose(ctx: click.Context, _param: click.Parameter | None, value: bool) -> None:
    """The callback of every ``--verbose``: tracebacks for errors (see ``main``) and debug logging."""
    if not value:
        return
    _VERBOSE["on"] = True
    root = ctx.find_root()
    root.ensure_object(dict)
    root.obj["verbose"] = True
    logging.getLogger().setLevel(logging.DEBUG)


def verbose_param() -> click.Option:
    """A ``--verbose``/``-v`` option that sets the same flag as the top-level group's."""
    return click.Option(
        ["--verbose", "-v"],
        is_flag=True,
        expose_value=False,
        is_eager=True,
        callback=set_verbose,
        help="Show tracebacks for errors and debug logging (also accepted before the command).",
    )


def walk_commands(group: click.Group) -> Iterator[click.Command]:
    """Every command below ``group``, subgroups and their commands included (not ``group`` itself)."""
    for command in group.commands.values():
        yield command
        if isinstance(command, click.Group):
            yield from walk_commands(command)


def add_verbose_everywhere(group: click.Group) -> None:
    """Give every command below ``group`` its own ``--verbose`` (the README promises it for every command)."""
    for command in walk_commands(group):
        if not any(p.name == "verbose" for p in command.params):
            command.params.append(verbose_param())
