"""Backends: one interface (:class:`Runner`) for every runner, and the registry of formats and engines."""

from cellseg_deploy.backends.base import Runner, check_image
from cellseg_deploy.backends.registry import (
    EXPORT_FORMATS,
    FORMATS,
    Format,
    create_runner,
    engine_for_path,
    get_format,
    get_runner_class,
    list_runners,
    register_runner,
)

__all__ = [
    "EXPORT_FORMATS",
    "FORMATS",
    "Format",
    "Runner",
    "check_image",
    "create_runner",
    "engine_for_path",
    "get_format",
    "get_runner_class",
    "list_runners",
    "register_runner",
]
