"""Learning-rate schedules: warm-up, step, cosine, plateau, and their resumable state."""

from __future__ import annotations

import pytest

from cellseg_deploy.training.recipe import ScheduleSettings
from cellseg_deploy.training.schedule import LRSchedule


def test_warmup_is_linear_from_the_factor_to_one() -> None:
    s = LRSchedule(ScheduleSettings(name="constant", warmup_steps=10, warmup_factor=0.1), 5, 100)
    assert s.factor(0) == pytest.approx(0.1)
    assert s.factor(5) == pytest.approx(0.55)
    assert s.factor(10) == s.factor(99) == 1.0


def test_step_schedule_lowers_after_the_milestone_epochs() -> None:
    s = LRSchedule(ScheduleSettings(name="step", milestones=(2, 3), gamma=0.1), 4, 20)
    assert [s.factor(i) for i in (0, 7, 8, 11, 12, 19)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_cosine_runs_from_one_to_the_floor_after_warmup() -> None:
    s = LRSchedule(ScheduleSettings(name="cosine", warmup_steps=10, min_factor=0.05), 10, 110)
    assert s.factor(10) == pytest.approx(1.0)
    assert s.factor(60) == pytest.approx(0.05 + 0.95 * 0.5)
    assert s.factor(110) == pytest.approx(0.05)
    assert all(s.factor(i) >= s.factor(i + 1) for i in range(10, 120))


def test_plateau_lowers_after_patience_and_resumes_from_its_state() -> None:
    s = LRSchedule(ScheduleSettings(name="plateau", patience=2, gamma=0.5), 10, 100)
    assert [s.observe(v) for v in (0.1, 0.2, 0.2, 0.15)] == [False, False, False, True]
    assert s.factor(50) == 0.5
    again = LRSchedule(ScheduleSettings(name="plateau", patience=2, gamma=0.5), 10, 100)
    again.load_state_dict(s.state_dict())
    assert again.factor(50) == 0.5
    assert again.observe(0.1) is False and again.observe(0.1) is True
    assert again.factor(0) == 0.25


def test_time_aware_cosine_follows_the_clock_only_when_it_leads() -> None:
    settings = ScheduleSettings(name="cosine", warmup_steps=0, time_aware=True)
    s = LRSchedule(settings, 10, 100)
    plain = LRSchedule(ScheduleSettings(name="cosine", warmup_steps=0), 10, 100)
    assert s.factor(50, time_fraction=0.2) == plain.factor(50)  # the steps lead: the schedule is unchanged
    assert s.factor(20, time_fraction=0.5) == pytest.approx(plain.factor(50))  # the clock leads
    assert s.factor(20, time_fraction=1.5) == pytest.approx(0.0)
