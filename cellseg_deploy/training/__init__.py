"""Training: recipes, the loop (AMP, schedules, validation, resume), augmentation, data and DDP set-up.

Public face::

    from cellseg_deploy.training import load_recipe, train
    recipe = load_recipe("tiny_cpu", ["optim.lr=0.01"])
    result = train(recipe, Path("data/synth"), Path("runs/tiny"))

Heavy modules import lazily, so importing this package stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cellseg_deploy.training.recipe import Recipe, list_recipes, load_recipe

if TYPE_CHECKING:
    from cellseg_deploy.training.loop import TrainResult, train

__all__ = ["Recipe", "TrainResult", "list_recipes", "load_recipe", "train"]


def __getattr__(name: str) -> Any:
    if name in ("train", "TrainResult"):
        from cellseg_deploy.training import loop

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
