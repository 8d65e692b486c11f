"""Runners: one interface (:class:`Runner`) for every backend, and the registry behind ``--engine``."""

from cellseg_deploy.backends.base import Runner, check_image
from cellseg_deploy.backends.registry import (
    create_runner,
    get_runner_class,
    list_runners,
    parse_engines,
    register_runner,
)

__all__ = [
    "Runner",
    "check_image",
    "create_runner",
    "get_runner_class",
    "list_runners",
    "parse_engines",
    "register_runner",
]
