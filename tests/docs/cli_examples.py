"""Find every ``cellseg-deploy ...`` example in the docs and the ``--help`` texts, and check it against the
live click command tree without running it.

An example is a command line that starts with ``cellseg-deploy``: a line of a fenced code block (``$ `` and
``\\`` continuations allowed), an inline code span with arguments, or a line of a command's ``Examples:``
block. :func:`check_example` parses it with the command's own click parser, which knows every option and how
many values it takes, then checks that required options and arguments are there and that values of typed
options (choices, integers, floats, ranges) convert. Paths are not opened.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click

PROG = "cellseg-deploy"
SHELL_STOPS = {"|", "||", "&&", ";", ">", ">>", "2>&1", "&", "..."}
"""Tokens after which a line is shell, not arguments (a pipe, a redirection, an ellipsis of the docs)."""

_PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$")
"""A value written as a metavar (``N``, ``PATH``, ``ROOT``): stands for any value, not converted."""
_FENCE = re.compile(r"^\s*(```|~~~)")


@dataclass(frozen=True)
class Example:
    """One example: where it is (``file:line`` or ``--help of CMD``), its text, and whether it is an inline
    code span of prose (see :func:`check_example` for what that allows)."""

    where: str
    text: str
    inline: bool = False


def _join_continuations(lines: list[tuple[int, str]]) -> Iterator[tuple[int, str]]:
    buf: list[str] = []
    start = 0
    for number, line in lines:
        if not buf:
            start = number
        stripped = line.rstrip()
        if stripped.endswith("\\"):
            buf.append(stripped[:-1])
            continue
        buf.append(stripped)
        yield start, " ".join(s.strip() for s in buf)
        buf = []
    if buf:
        yield start, " ".join(s.strip() for s in buf)


_ENV_PREFIX = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)+")
_CHAIN = re.compile(r"\s(?:&&|\|\||;)\s")


def _command_line(text: str) -> str | None:
    """The ``cellseg-deploy`` command of a shell line: after a prompt, ``VAR=value`` prefixes and a
    ``.venv/bin/`` path; the first such command of a chain (``a && cellseg-deploy ...``)."""
    for part in _CHAIN.split(text.strip()):
        part = part.strip()
        if part.startswith("$ "):
            part = part[2:].strip()
        part = _ENV_PREFIX.sub("", part)
        if part.startswith(".venv/bin/"):
            part = part[len(".venv/bin/") :]
        if part.startswith(PROG + " ") or part == PROG:
            return part
    return None


def markdown_examples(path: Path, root: Path) -> list[Example]:
    """Every ``cellseg-deploy`` command line of a Markdown file (code blocks and inline code with arguments)."""
    rel = path.relative_to(root)
    out: list[Example] = []
    in_block = False
    block: list[tuple[int, str]] = []
    paragraph: list[tuple[int, str]] = []

    def flush_paragraph() -> None:
        # Inline code may wrap onto the next line: look for spans in the paragraph as one text.
        if paragraph:
            text = "\n".join(line for _, line in paragraph)
            for match in re.finditer(r"`([^`]*)`", text):
                span = " ".join(match.group(1).split())
                cmd = _command_line(span) if PROG in span else None
                if cmd:
                    line_no = paragraph[0][0] + text.count("\n", 0, match.start())
                    out.append(Example(f"{rel}:{line_no}", cmd, inline=True))
            paragraph.clear()

    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if _FENCE.match(line):
            if in_block:
                for start, joined in _join_continuations(block):
                    cmd = _command_line(joined)
                    if cmd:
                        out.append(Example(f"{rel}:{start}", cmd))
                block = []
            else:
                flush_paragraph()
            in_block = not in_block
            continue
        if in_block:
            block.append((number, line))
        elif line.strip():
            paragraph.append((number, line))
        else:
            flush_paragraph()
    flush_paragraph()
    return out


def help_examples(group: click.Group) -> list[Example]:
    """The command lines of every command's help text (its ``Examples:`` / ``Example`` block)."""
    out: list[Example] = []

    def walk(cmd: click.Command, path: list[str]) -> None:
        lines = (cmd.help or "").splitlines()
        for _number, joined in _join_continuations(list(enumerate(lines, start=1))):
            line = _command_line(joined)
            if line:
                out.append(Example(f"--help of {' '.join(path)}", line))
        if isinstance(cmd, click.Group):
            for name, sub in sorted(cmd.commands.items()):
                walk(sub, [*path, name])

    walk(group, [PROG])
    return out


def _tokens(text: str) -> list[str]:
    """Words of a command line, synopsis notation undone: ``[--opt N]`` -> ``--opt N``, ``a|b`` -> ``a``, an
    ellipsis after an option -> a placeholder value; shell after the command (pipes, redirections) dropped."""
    tokens = shlex.split(text, comments=True)
    out: list[str] = []
    for tok in tokens:
        if tok == "..." and out and out[-1].startswith("--") and "=" not in out[-1]:
            out.append("VALUE")
            continue
        if tok in SHELL_STOPS or tok.startswith((">", "2>")):
            break
        tok = tok.strip("[]")
        if "|" in tok and not tok.startswith("|"):
            tok = tok.split("|")[0]
        if tok:
            out.append(tok)
    return out


def check_example(group: click.Group, text: str, *, inline: bool = False) -> list[str]:
    """Problems of one example against the command tree (empty: it fits).

    Checks: every word before the options names a (sub)command; every option exists, is not a hidden
    (deprecated) spelling, and has its values;
    no extra arguments; every required option and argument is given; values of choice / int / float options
    convert. A bare group (``cellseg-deploy data``) or the program alone is a reference, not checked further.

    ``inline`` (a code span in prose): the command alone (```cellseg-deploy parity```) is a reference to it,
    and the command with one option and no argument (```cellseg-deploy bench --untrained```) a mention of
    that option: the command and the option must exist (and a given value convert), but the rest of a full
    command line is not asked for. Anything longer is an example like any other.
    """
    try:
        tokens = _tokens(text)
    except ValueError as exc:
        return [f"cannot split into words: {exc}"]
    if not tokens or tokens[0] != PROG:
        return [f"does not start with {PROG}"]
    args = tokens[1:]
    cmd: click.Command = group
    path = [PROG]
    ctx = click.Context(group, info_name=PROG)
    # Options of the top-level group (--verbose) may come first.
    while args and args[0] in ("-v", "--verbose"):
        args = args[1:]
    while isinstance(cmd, click.Group):
        if not args or args[0] in ("-h", "--help", "--version"):
            return []
        name = args[0]
        sub = cmd.get_command(ctx, name)
        if sub is None:
            return [f"{' '.join(path)} has no command {name!r} (commands: {', '.join(sorted(cmd.commands))})"]
        cmd, path, args = sub, [*path, name], args[1:]
        ctx = click.Context(cmd, info_name=name, parent=ctx)
    if any(a in ("-h", "--help") for a in args):
        return []
    if inline and not args:
        return []
    if (
        inline
        and args[0].startswith("-")
        and (len(args) == 1 or (len(args) == 2 and not args[1].startswith("-")))
    ):
        return _check_mention(cmd, ctx, path, args)
    parser = cmd.make_parser(ctx)
    try:
        opts, leftover, _order = parser.parse_args(args=list(args))
    except click.UsageError as exc:
        return [f"{' '.join(path)}: {exc.format_message()}"]
    problems: list[str] = []
    if leftover:
        problems.append(f"{' '.join(path)}: unexpected extra argument(s) {leftover}")
    for param in cmd.params:
        value = opts.get(param.name) if param.name else None
        given = value is not None and value != ()
        if given and isinstance(param, click.Option) and param.hidden:
            problems.append(f"{' '.join(path)}: {param.opts[0]}: {param.help or 'a hidden option'}")
        if param.required and not given:
            what = "argument" if isinstance(param, click.Argument) else "option"
            problems.append(f"{' '.join(path)}: required {what} {param.human_readable_name} is missing")
        if given and isinstance(
            param.type, click.Choice | click.types.IntParamType | click.types.FloatParamType
        ):
            values = value if isinstance(value, list | tuple) else [value]
            for v in values:
                if isinstance(v, bool) or (isinstance(v, str) and _PLACEHOLDER.match(v)):
                    continue
                try:
                    param.type.convert(v, param, ctx)
                except click.BadParameter as exc:
                    problems.append(f"{' '.join(path)}: {param.human_readable_name}: {exc.format_message()}")
    return problems


def _check_mention(cmd: click.Command, ctx: click.Context, path: list[str], args: list[str]) -> list[str]:
    """An option named in prose (``--opt`` or ``--opt VALUE``): it must exist, and a value must convert."""
    name, _, inline_value = args[0].partition("=")
    value = inline_value or (args[1] if len(args) == 2 else None)
    for param in cmd.params:
        if isinstance(param, click.Option) and name in (*param.opts, *param.secondary_opts):
            if param.hidden:
                return [f"{' '.join(path)}: {name}: {param.help or 'a hidden option'}"]
            if (
                value is not None
                and not _PLACEHOLDER.match(value)
                and isinstance(
                    param.type, click.Choice | click.types.IntParamType | click.types.FloatParamType
                )
            ):
                try:
                    param.type.convert(value, param, ctx)
                except click.BadParameter as exc:
                    return [f"{' '.join(path)}: {name}: {exc.format_message()}"]
            return []
    return [f"{' '.join(path)}: no such option: {name}"]
