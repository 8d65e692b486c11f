"""``cellseg-deploy demo``: the whole pipeline on built-in synthetic data."""

from __future__ import annotations

from pathlib import Path

import click

from cellseg_deploy.cli.common import check_outputs, write_json_result
from cellseg_deploy.cli.options import json_option, overwrite_option, progress_option, seed_option


@click.command("demo")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs/demo"),
    show_default=True,
    help="Run folder: data, training run, models, benchmark and report.md go below it.",
)
@click.option(
    "--train", "n_train", type=int, default=48, show_default=True, help="Synthetic training images."
)
@click.option("--test", "n_test", type=int, default=8, show_default=True, help="Synthetic test images.")
@seed_option("Seed of the data (and of training via the recipe).")
@click.option(
    "--recipe",
    default="tiny_cpu",
    show_default=True,
    help="Training recipe: a named recipe (tiny_cpu, r50_fpn_plain, ...) or a YAML path.",
)
@click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key (repeatable)."
)
@click.option("--bench-iters", type=int, default=5, show_default=True, help="Measured benchmark rounds.")
@progress_option()
@json_option
@overwrite_option
def demo(
    out: Path,
    n_train: int,
    n_test: int,
    seed: int,
    recipe: str,
    overrides: tuple[str, ...],
    bench_iters: int,
    progress: bool,
    json_path: Path | None,
    overwrite: bool,
) -> None:
    """Synthesise data, train the tiny model, export, check parity and AP of every backend, benchmark, predict.

    Writes OUT/report.md with the tables and plots; nothing is downloaded. Exit code 1 if a parity check fails.
    An OUT that already holds files (an earlier demo) is refused before any work unless --overwrite is given.

    \b
    Example:
        cellseg-deploy demo --out runs/demo
    """
    check_outputs({"--out": out, "--json": json_path}, overwrite=overwrite, folders=("--out",))
    from cellseg_deploy.demo import DemoConfig, run_demo
    from cellseg_deploy.errors import CheckFailed

    result = run_demo(
        DemoConfig(
            out=out,
            n_train=n_train,
            n_test=n_test,
            seed=seed,
            recipe=recipe,
            overrides=overrides,
            bench_iters=bench_iters,
            progress=progress,
        ),
        echo=click.echo,
    )
    click.echo("")
    click.echo(result.scorecard_text)  # the scorecard's own table, then what was skipped and why
    click.echo(f"\nreport: {result.report}")
    write_json_result(
        json_path, {"report": str(result.report), "summary": result.summary_rows, "steps_s": result.steps}
    )
    if not result.all_parity_passed:
        raise CheckFailed("a parity check failed; see the report")
