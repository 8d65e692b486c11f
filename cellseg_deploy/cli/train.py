"""``cellseg-deploy train``: a thin command over :func:`cellseg_deploy.training.train`."""

from __future__ import annotations

from pathlib import Path

import click

from cellseg_deploy.cli.common import check_outputs, write_json_result
from cellseg_deploy.cli.options import device_option, json_option, progress_option, seed_option
from cellseg_deploy.tables import format_metric


@click.command("train")
@click.option(
    "--data",
    "data_root",
    required=True,
    type=click.Path(path_type=Path),
    help="Dataset root in the competition layout (train/<id>/image.tif + classK.tif).",
)
@click.option(
    "--recipe",
    default="tiny_cpu",
    show_default=True,
    metavar="PATH|NAME",
    help="Recipe YAML, or the name of one shipped with the package (tiny_cpu, r50_fpn_plain, ...; linked from train/ in a checkout).",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Run folder: last.pt, best.pt, metrics.jsonl, curves.png, recipe.yaml.",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override any recipe key (repeatable), e.g. --set optim.lr=0.01 --set train.epochs=5.",
)
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last.pt (mid-epoch too).")
@click.option("--overwrite", is_flag=True, help="Start a new run in an --out that already holds one.")
@device_option("Shortcut for --set train.device=...", default=None, metavar="cpu|cuda|cuda:N")
@click.option(
    "--pretrained",
    # modeling.builder.PRETRAINED_CHOICES, spelled out so --help does not import torch (a test keeps them equal)
    type=click.Choice(["none", "coco", "imagenet"]),
    default=None,
    help="torchvision weights to start from (downloads; offline use --init or --pretrained-backbone).",
)
@click.option(
    "--init",
    "init_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Local whole-model weights (.pt checkpoint or torchvision .pth) to start from.",
)
@click.option(
    "--pretrained-backbone",
    type=click.Path(path_type=Path),
    default=None,
    help="Local ImageNet backbone state dict (e.g. resnet50-*.pth) to start from.",
)
@seed_option("Shortcut for --set seed=N.", default=None)
@progress_option()
@json_option
def train_cmd(
    data_root: Path,
    recipe: str,
    out_dir: Path,
    overrides: tuple[str, ...],
    resume: bool,
    overwrite: bool,
    device: str | None,
    pretrained: str | None,
    init_path: Path | None,
    pretrained_backbone: Path | None,
    seed: int | None,
    progress: bool,
    json_path: Path | None,
) -> None:
    """Train a Mask R-CNN from a recipe; keep the best checkpoint by validation segm AP50.

    Validation uses the same inference and COCO evaluation as 'eval --split val', so the AP50 printed here
    is the AP50 'eval' reports on best.pt. Multi-process (DDP): launch with torchrun, gloo on CPU and
    nccl on CUDA.

    \b
    Examples:
        cellseg-deploy data synth data/synth
        cellseg-deploy train --data data/synth --recipe tiny_cpu --out runs/tiny
        cellseg-deploy train --data data/synth --out runs/tiny --set optim.lr=0.01 --set train.epochs=5
        cellseg-deploy train --data data/synth --out runs/tiny --resume
        torchrun --nproc_per_node 2 -m cellseg_deploy.cli.main train --data data/synth --out runs/ddp
    """
    # Writability first (the run folder's contents follow train's own rule: --resume or --overwrite).
    check_outputs(
        {"--out": out_dir, "--json": json_path},
        overwrite=overwrite or resume,
        folders=("--out",),
        may_exist=("--out",),
    )
    from cellseg_deploy.training import load_recipe, train

    sets = list(overrides)
    if device is not None:
        sets.append(f"train.device={device}")
    if seed is not None:
        sets.append(f"seed={seed}")
    if pretrained is not None:
        sets.append(f"weights.pretrained={pretrained}")
    if init_path is not None:
        sets.append(f"weights.init={_yaml_str(init_path)}")
    if pretrained_backbone is not None:
        sets.append(f"weights.pretrained_backbone={_yaml_str(pretrained_backbone)}")
    resolved = load_recipe(recipe, sets)
    result = train(resolved, data_root, out_dir, resume=resume, progress=progress, overwrite=overwrite)
    if result.rank != 0:  # under torchrun, rank 0 reports
        return
    m = result.best_metrics
    click.echo(
        f"{result.stop_reason}: {result.epochs} epochs, {result.steps} steps, {result.seconds:.1f} s; "
        f"best segm AP50 {format_metric(m.get('segm_AP50'))} (AP {format_metric(m.get('segm_AP'))}, "
        f"AP75 {format_metric(m.get('segm_AP75'))}) at epoch {m.get('epoch', '-')}, max_dets {m.get('max_dets', '-')}"
    )
    click.echo(f"best: {result.best_checkpoint}")
    click.echo(f"last: {result.last_checkpoint}")
    write_json_result(json_path, result.to_dict())


def _yaml_str(path: Path) -> str:
    """A path as a quoted YAML string (so ``--set`` parsing keeps it a string)."""
    return "'" + str(path).replace("'", "''") + "'"
