"""Entry point of ``cellseg-deploy``: the top-level group, error mapping and command registration.

Each command group lives in its own module (``cli/data.py``, ``cli/train.py``, ...) and is added here.
Heavy libraries are imported inside the commands, so ``--help`` stays fast.
"""

from __future__ import annotations

import logging
import sys
import traceback

import click

from cellseg_deploy import __version__
from cellseg_deploy.cli.options import add_verbose_everywhere, reset_verbose, set_verbose, verbose_requested
from cellseg_deploy.errors import CheckFailed, UserError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="cellseg-deploy")
@click.option(
    "--verbose",
    "-v",
    is_flag=True,
    callback=set_verbose,
    help="Show tracebacks for errors and debug logging (also accepted after the command).",
)
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """Train, export, verify and benchmark a Mask R-CNN for cell instance segmentation.

    \b
    Example (the whole pipeline on synthetic data, nothing downloaded):
        cellseg-deploy demo --out runs/demo
    """
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")
    if verbose:  # basicConfig leaves an already configured root logger's level alone
        logging.getLogger().setLevel(logging.DEBUG)


def _register() -> None:
    """Add every command; each import is cheap (heavy imports happen inside the commands)."""
    from cellseg_deploy.cli.bench import bench
    from cellseg_deploy.cli.data import data
    from cellseg_deploy.cli.demo import demo
    from cellseg_deploy.cli.evaluate import eval_cmd, predict_cmd
    from cellseg_deploy.cli.export import export_cmd
    from cellseg_deploy.cli.parity import parity_cmd
    from cellseg_deploy.cli.retune import retune_cmd
    from cellseg_deploy.cli.scorecard import scorecard_cmd
    from cellseg_deploy.cli.train import train_cmd

    commands = (
        data,
        train_cmd,
        retune_cmd,
        export_cmd,
        parity_cmd,
        eval_cmd,
        predict_cmd,
        bench,
        scorecard_cmd,
        demo,
    )
    for command in commands:
        cli.add_command(command)
    add_verbose_everywhere(cli)  # --verbose after the subcommand too: `cellseg-deploy eval ... --verbose`


_register()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; map user errors to one stderr line and exit 2, failed checks to exit 1."""
    reset_verbose()
    root = logging.getLogger()
    level = root.level
    try:
        return _run(argv)
    finally:  # --verbose lasts one invocation (tests call main in-process, one after another)
        root.setLevel(level)
        reset_verbose()


def _run(argv: list[str] | None) -> int:
    try:
        cli.main(args=argv, prog_name="cellseg-deploy", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:  # usage errors: one line and where the help is
        click.echo(f"error: {usage_line(exc)}", err=True)
        return 2
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except CheckFailed as exc:
        if verbose_requested():
            traceback.print_exc()
        click.echo(f"FAILED: {exc}", err=True)
        return CheckFailed.exit_code
    except UserError as exc:
        if verbose_requested():
            traceback.print_exc()
        click.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except OSError as exc:  # the file system said no (a full disk, a folder gone read-only): one line
        if verbose_requested():
            traceback.print_exc()
        where = f"{exc.filename}: " if exc.filename else ""
        click.echo(f"error: {where}{exc.strerror or exc}", err=True)
        return 2
    return 0


def usage_line(exc: click.ClickException) -> str:
    """A click error as one line that ends with the command's ``--help`` hint."""
    message = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    command = ctx.command_path if ctx is not None else "cellseg-deploy"
    return f"{message} (see '{command} --help')"


if __name__ == "__main__":
    sys.exit(main())
