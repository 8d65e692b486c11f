"""One spelling per option across commands: shared choices, deprecated aliases, ``--verbose`` in both places.

The command tree is read from the live CLI (no command runs) except where a command is run in-process to see
what it prints: the aliases' warning, the usage error of two spellings given with different values, and the
traceback of ``--verbose`` given after the subcommand.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from cellseg_deploy.cli.main import cli
from cellseg_deploy.cli.options import PRECISIONS, deprecated_alias, limit_option
from cellseg_deploy.data.layout import DEFAULT_VAL_FRACTION, SPLITS
from tests.cli.conftest import Result


def _leaf_commands(group: click.Group, path: str = "") -> Iterator[tuple[str, click.Command]]:
    for name, command in sorted(group.commands.items()):
        full = f"{path} {name}".strip()
        if isinstance(command, click.Group):
            yield from _leaf_commands(command, full)
        else:
            yield full, command


def _option(command: click.Command, name: str) -> click.Option | None:
    for param in command.params:
        if isinstance(param, click.Option) and name in param.opts and not param.hidden:
            return param
    return None


def _with(name: str) -> dict[str, click.Option]:
    found = {path: _option(cmd, name) for path, cmd in _leaf_commands(cli)}
    return {path: opt for path, opt in found.items() if opt is not None}


def test_every_split_option_offers_the_data_layers_splits_in_one_order() -> None:
    splits = _with("--split")
    assert set(splits) >= {"eval", "parity", "scorecard", "data to-coco"}, sorted(splits)
    for path, option in splits.items():
        assert isinstance(option.type, click.Choice), path
        assert tuple(option.type.choices) == SPLITS, (path, option.type.choices)


def test_every_val_fraction_has_the_one_default_and_range() -> None:
    fractions = _with("--val-fraction")
    assert set(fractions) >= {"eval", "parity", "scorecard", "data to-coco"}, sorted(fractions)
    for path, option in fractions.items():
        assert option.default == DEFAULT_VAL_FRACTION, path
        assert isinstance(option.type, click.FloatRange) and option.type.min_open and option.type.max_open, (
            path
        )


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("--limit", {"parity", "bench", "scorecard"}),
        ("--threads", {"eval", "predict", "parity", "bench", "scorecard"}),
        ("--precision", {"eval", "predict", "parity", "bench"}),
        ("--device", {"train", "eval", "predict", "parity", "bench", "scorecard"}),
        ("--seed", {"train", "eval", "parity", "bench", "scorecard", "demo", "data synth", "data to-coco"}),
    ],
)
def test_a_shared_option_has_one_type_everywhere(name: str, expected: set[str]) -> None:
    options = _with(name)
    assert set(options) >= expected, sorted(options)
    kinds = {path: (type(o.type).__name__, getattr(o.type, "min", None)) for path, o in options.items()}
    assert len(set(kinds.values())) == 1, kinds
    if name == "--precision":
        for path, option in options.items():
            assert tuple(option.type.choices) == PRECISIONS, path  # type: ignore[attr-defined]


def test_pretrained_offers_the_builders_choices() -> None:
    """The CLI spells the choices out (importing the builder would load torch for ``--help``); this keeps them one list."""
    from cellseg_deploy.modeling.builder import PRETRAINED_CHOICES

    options = _with("--pretrained")
    assert options, "no command takes --pretrained"
    for path, option in options.items():
        assert tuple(option.type.choices) == PRETRAINED_CHOICES, path  # type: ignore[attr-defined]


def test_progress_is_on_every_command_that_shows_bars() -> None:
    progress = {path for path, cmd in _leaf_commands(cli) if _option(cmd, "--progress") is not None}
    expected = {
        "bench",
        "data synth",
        "data to-coco",
        "demo",
        "eval",
        "parity",
        "predict",
        "scorecard",
        "train",
    }
    assert progress >= expected, sorted(expected - progress)
    for path in progress:
        option = _option(dict(_leaf_commands(cli))[path], "--progress")
        assert option is not None and option.secondary_opts == ["--no-progress"], path


def test_images_means_one_thing_only() -> None:
    """``--images`` was "first N" in parity and "how many synthetic" in bench: now neither shows it."""
    assert not _with("--images")
    assert _option(dict(_leaf_commands(cli))["bench"], "--synthetic-images") is not None


def test_every_command_takes_verbose() -> None:
    missing = [path for path, cmd in _leaf_commands(cli) if _option(cmd, "--verbose") is None]
    assert not missing, missing


# -- the alias mechanism on a small command of its own ----------------------------------------------------


@click.command()
@limit_option()
@deprecated_alias("--images", "--limit", "limit", type=click.IntRange(min=1))
def _toy(limit: int | None) -> None:
    click.echo(f"limit={limit}")


@pytest.mark.parametrize(
    ("args", "code", "out", "warned"),
    [
        (["--limit", "3"], 0, "limit=3", False),
        (["--images", "3"], 0, "limit=3", True),
        (["--images", "3", "--limit", "3"], 0, "limit=3", True),
        ([], 0, "limit=None", False),
    ],
)
def test_the_alias_fills_the_new_option_and_warns_once(
    args: list[str], code: int, out: str, warned: bool
) -> None:
    result = CliRunner().invoke(_toy, args)
    assert result.exit_code == code, result.output
    assert result.stdout.strip() == out
    warnings = [line for line in result.stderr.splitlines() if "deprecated" in line]
    assert warnings == (["warning: --images is deprecated; use --limit (same meaning)"] if warned else [])


def test_the_alias_and_the_new_spelling_with_different_values_is_a_usage_error() -> None:
    result = CliRunner().invoke(_toy, ["--images", "3", "--limit", "4"])
    assert result.exit_code == 2
    assert "--images is the deprecated spelling of --limit; give --limit only" in result.stderr


def test_the_alias_converts_like_the_new_option() -> None:
    result = CliRunner().invoke(_toy, ["--images", "0"])
    assert result.exit_code == 2 and "--images" in result.stderr


def test_an_alias_is_hidden_from_help() -> None:
    assert "--images" not in CliRunner().invoke(_toy, ["--help"]).stdout


# -- the real commands ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["parity", "c.pt", "--candidate", "m.onnx", "--data", "d", "--images", "2", "--limit", "3"],
            "--images is the deprecated spelling of --limit; give --limit only",
        ),
        (
            [
                "parity",
                "c.pt",
                "--candidate",
                "m.onnx",
                "--data",
                "d",
                "--profile",
                "fp16",
                "--precision",
                "int8",
            ],
            "--profile is the deprecated spelling of --precision; give --precision only",
        ),
        (
            ["bench", "--untrained", "tiny", "--images", "2", "--synthetic-images", "3"],
            "--images is the deprecated spelling of --synthetic-images; give --synthetic-images only",
        ),
    ],
)
def test_two_spellings_that_disagree_stop_before_any_work(
    cli: Callable[..., Result], argv: list[str], message: str
) -> None:
    result = cli(*argv)
    assert result.code == 2, result.err
    assert result.err_lines[-1].startswith(f"error: {message}"), result.err_lines


def test_parity_aliases_warn_and_reach_the_run(cli: Callable[..., Result], tmp_path: Path) -> None:
    """The old spellings reach the command: the run gets as far as the missing dataset, after one warning each."""
    missing = tmp_path / "no-such-data"
    result = cli(
        "parity",
        "c.pt",
        "--candidate",
        "m.onnx",
        "--data",
        str(missing),
        "--images",
        "2",
        "--profile",
        "fp16",
    )
    assert result.code == 2
    assert "warning: --images is deprecated; use --limit (same meaning)" in result.err_lines
    assert "warning: --profile is deprecated; use --precision (same meaning)" in result.err_lines
    assert sum("deprecated" in line for line in result.err_lines) == 2


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_before_or_after_the_command_shows_the_traceback(
    cli: Callable[..., Result], tmp_path: Path, where: str
) -> None:
    missing = str(tmp_path / "no-such-data")
    argv = ["-v", "data", "check", missing] if where == "before" else ["data", "check", missing, "--verbose"]
    result = cli(*argv)
    assert result.code == 2
    assert "Traceback (most recent call last)" in result.err
    assert result.err_lines[-1].startswith("error: ")


def test_verbose_after_a_command_with_options_shows_the_traceback(
    cli: Callable[..., Result], tmp_path: Path
) -> None:
    result = cli("data", "to-coco", str(tmp_path / "no-such-data"), "--out", str(tmp_path / "a.json"), "-v")
    assert result.code == 2 and "Traceback (most recent call last)" in result.err


def test_without_verbose_there_is_no_traceback(cli: Callable[..., Result], tmp_path: Path) -> None:
    first = cli("data", "check", str(tmp_path / "x"), "--verbose")
    assert "Traceback" in first.err
    result = cli("data", "check", str(tmp_path / "no-such-data"))  # the earlier --verbose does not linger
    assert result.code == 2 and "Traceback" not in result.err and len(result.err_lines) == 1


def test_verbose_lasts_one_invocation(cli: Callable[..., Result], tmp_path: Path) -> None:
    root = logging.getLogger()
    before = root.level
    cli("data", "check", str(tmp_path / "no-such-data"), "-v")
    assert root.level == before  # the debug level of --verbose does not leak into the next command
