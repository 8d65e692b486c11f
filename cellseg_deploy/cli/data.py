"""``cellseg-deploy data``: synthesise, check and convert datasets."""

from __future__ import annotations

from pathlib import Path

import click

from cellseg_deploy.cli.common import check_outputs, write_json_result
from cellseg_deploy.cli.options import (
    json_option,
    overwrite_option,
    progress_option,
    seed_option,
    split_option,
    val_fraction_option,
)


@click.group()
def data() -> None:
    """Make, validate and convert datasets in the competition layout.

    \b
    Example:
        cellseg-deploy data synth data/synth
        cellseg-deploy data check data/synth
        cellseg-deploy data to-coco data/synth --out data/synth/all.json
    """


@data.command("synth")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--train", "n_train", type=int, default=48, show_default=True, help="Training images.")
@click.option(
    "--test", "n_test", type=int, default=8, show_default=True, help="Test images (with COCO ground truth)."
)
@click.option("--min-size", type=int, default=160, show_default=True, help="Smallest image side (px).")
@click.option("--max-size", type=int, default=320, show_default=True, help="Largest image side (px).")
@click.option("--min-cells", type=int, default=15, show_default=True, help="Fewest cells per image.")
@click.option("--max-cells", type=int, default=80, show_default=True, help="Most cells per image (density).")
@click.option(
    "--extremes/--no-extremes",
    default=False,
    show_default=True,
    help="Add a ~40 px image, a 1100x1300 dense image and one whose IDs pass 255.",
)
@seed_option("Random seed; the same seed gives the same bytes.")
@progress_option()
@json_option
@overwrite_option
def synth(
    out: Path,
    n_train: int,
    n_test: int,
    min_size: int,
    max_size: int,
    min_cells: int,
    max_cells: int,
    extremes: bool,
    seed: int,
    progress: bool,
    json_path: Path | None,
    overwrite: bool,
) -> None:
    """Write synthetic microscopy in the exact competition format to OUT.

    train/<uuid>/image.tif (RGBA LZW) + classK.tif (float64 IDs), test_release/, the test id map and the
    test ground truth as COCO (test_ground_truth.json). The same options and seed give the same bytes. An
    OUT that holds files is refused unless --overwrite is given, and even then it must not hold another
    dataset (its files would mix in). The defaults make a small set that a tiny CPU model learns quickly.

    \b
    Example:
        cellseg-deploy data synth data/synth --train 48 --test 8 --seed 0
        cellseg-deploy data synth data/hard --extremes --max-cells 300
    """
    check_outputs({"OUT": out, "--json": json_path}, overwrite=overwrite, folders=("OUT",))
    from cellseg_deploy.data.synth import SynthConfig, describe, make_synthetic_dataset

    config = SynthConfig(
        n_train=n_train,
        n_test=n_test,
        min_size=min_size,
        max_size=max_size,
        min_cells=min_cells,
        max_cells=max_cells,
        seed=seed,
        extremes=extremes,
    )
    summary = make_synthetic_dataset(out, config, progress=progress)
    click.echo(describe(summary))
    write_json_result(json_path, summary.to_dict())


@data.command("check")
@click.argument("root", type=click.Path(path_type=Path))
@json_option
@overwrite_option
def check(root: Path, json_path: Path | None, overwrite: bool) -> None:
    """Validate the dataset at ROOT and print its statistics; exit 1 if it has defects.

    Each defect is one line on stderr naming the file: missing or unreadable image.tif, corrupt or
    truncated TIFF, a mask whose shape differs from its image, non-integer / negative / NaN IDs, a class
    file outside class1..class4, an empty train folder, a test id map that does not match test_release/.
    Nothing is modified.

    \b
    Example:
        cellseg-deploy data check data/synth --json check.json
    """
    check_outputs({"--json": json_path}, overwrite=overwrite)
    from cellseg_deploy.data.check import check_dataset
    from cellseg_deploy.errors import CheckFailed

    report = check_dataset(root)
    click.echo(report.text())
    for line in report.defects:
        click.echo(f"defect: {line}", err=True)
    write_json_result(json_path, report.to_dict())
    if report.defects:
        raise CheckFailed(f"{len(report.defects)} defect(s) in {root}")


@data.command("to-coco")
@click.argument("root", type=click.Path(path_type=Path))
@click.option(
    "--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="COCO JSON to write."
)
@split_option(
    "all = every training image; train/val = the seeded split; test = the synthetic test ground truth.",
    default="all",
)
@val_fraction_option
@seed_option()
@progress_option()
@overwrite_option
def to_coco(
    root: Path, out: Path, split: str, val_fraction: float, seed: int, progress: bool, overwrite: bool
) -> None:
    """Write COCO instance annotations (RLE masks at full size) of a dataset split.

    Training images get image id = 1-based index among all sorted train/ folders (the same in every
    split) and carry "sample_id"; test images keep the ids of test_image_name_to_ids.json. An empty split
    is an error (exit 2), as in 'eval'.

    \b
    Example:
        cellseg-deploy data to-coco data/synth --out data/synth/val.json --split val
    """
    check_outputs({"--out": out}, overwrite=overwrite)
    from cellseg_deploy.cli.common import write_json_file
    from cellseg_deploy.data.coco import dataset_to_coco, require_images

    gt = dataset_to_coco(root, split, val_fraction=val_fraction, seed=seed, progress=progress)
    require_images(gt, root, split, val_fraction)
    write_json_file(out, gt, what="--out", indent=None)
    click.echo(f"wrote {out}: {len(gt['images'])} images, {len(gt['annotations'])} instances ({split})")
