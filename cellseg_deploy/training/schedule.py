"""Learning-rate schedules as a pure function of the optimizer step (plus the plateau state).

The loop sets every parameter group's learning rate to ``base_lr * schedule.factor(step)`` before each
optimizer step. Keeping the schedule a function of the step (rather than a stateful torch scheduler stepped
in lock-step) makes resuming exact: the only state is the plateau factor and its counters
(:meth:`LRSchedule.state_dict`).
"""

from __future__ import annotations

import math
from typing import Any

from cellseg_deploy.training.recipe import ScheduleSettings


class LRSchedule:
    """Warm-up followed by ``constant``, ``step``, ``cosine`` or ``plateau``.

    Args:
        settings: the recipe's schedule section.
        steps_per_epoch: optimizer steps in one epoch (per process).
        total_steps: optimizer steps of the whole run (the cosine's length).
    """

    def __init__(self, settings: ScheduleSettings, steps_per_epoch: int, total_steps: int) -> None:
        self.settings = settings
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.total_steps = max(1, total_steps)
        self.plateau_factor = 1.0
        self.best: float | None = None
        self.bad = 0

    def factor(self, step: int, time_fraction: float = 0.0) -> float:
        """The learning-rate multiplier for the optimizer step with 0-based index ``step``.

        ``time_fraction`` (elapsed time / time limit; used when ``time_aware``): the cosine is evaluated at
        ``max(step, time_fraction * total_steps)``, so it moves on when the clock is further along than the
        steps (and never before: on a machine fast enough for the planned steps nothing changes).
        """
        s = self.settings
        warm = 1.0
        if step < s.warmup_steps:
            warm = s.warmup_factor + (1.0 - s.warmup_factor) * step / s.warmup_steps
        if s.name == "constant":
            main = 1.0
        elif s.name == "step":
            done_epochs = step // self.steps_per_epoch
            main = s.gamma ** sum(1 for m in s.milestones if m <= done_epochs)
        elif s.name == "cosine":
            span = max(1, self.total_steps - s.warmup_steps)
            where = max(step, time_fraction * self.total_steps) if s.time_aware else step
            progress = min(1.0, max(0.0, (where - s.warmup_steps) / span))
            main = s.min_factor + (1.0 - s.min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        else:  # plateau
            main = self.plateau_factor
        return warm * main

    def observe(self, metric: float, min_delta: float = 0.0) -> bool:
        """Feed a validation metric (higher is better; a gain of at most ``min_delta`` is no gain); returns
        True when ``plateau`` lowered the rate."""
        if self.best is None or metric > self.best + min_delta:
            self.best = metric
            self.bad = 0
            return False
        self.bad += 1
        if self.settings.name == "plateau" and self.bad >= self.settings.patience:
            self.plateau_factor *= self.settings.gamma
            self.bad = 0
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        """Plain values only (``weights_only``-loadable)."""
        return {"plateau_factor": float(self.plateau_factor), "best": self.best, "bad": int(self.bad)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.plateau_factor = float(state["plateau_factor"])
        self.best = None if state["best"] is None else float(state["best"])
        self.bad = int(state["bad"])
