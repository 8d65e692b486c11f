"""The runner registry: the names behind ``--engine`` and their "expected one of ..." error.

Runner modules register themselves with :func:`register_runner`; the registry imports them lazily by name
(:data:`_RUNNER_MODULES`) so that an optional backend that is not installed costs nothing until asked for.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from cellseg_deploy.backends.base import Runner
from cellseg_deploy.errors import UserError

_RUNNER_MODULES: dict[str, str] = {
    "torch": "cellseg_deploy.backends.pytorch.runner",
    "staged-onnx": "cellseg_deploy.backends.staged.runner",
    "trt": "cellseg_deploy.backends.tensorrt.runner",
    "staged-torch": "cellseg_deploy.backends.staged.runner",
    "onnx": "cellseg_deploy.backends.onnxrt.runner",
    "openvino": "cellseg_deploy.backends.openvino.runner",
}
"""Runner name -> module that defines it (imported on first use). Add new backends here."""

_REGISTERED: dict[str, type[Runner]] = {}


def register_runner(cls: type[Runner]) -> type[Runner]:
    """Class decorator: make a runner available under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTERED[cls.name] = cls
    return cls


def list_runners() -> list[str]:
    """Every runner name, registered or known by module, sorted."""
    return sorted(set(_RUNNER_MODULES) | set(_REGISTERED))


def get_runner_class(name: str) -> type[Runner]:
    """The runner class for ``name``; unknown names raise :class:`UserError` listing the choices."""
    if name not in _REGISTERED:
        module = _RUNNER_MODULES.get(name)
        if module is None:
            raise UserError(f"unknown engine {name!r}; expected one of {', '.join(list_runners())}")
        importlib.import_module(module)
    return _REGISTERED[name]


def create_runner(name: str, model_path: str | Path, **kwargs: Any) -> Runner:
    """Instantiate runner ``name`` for ``model_path`` (not loaded yet: use it as a context manager)."""
    return get_runner_class(name)(model_path, **kwargs)


def parse_engines(spec: str) -> list[str]:
    """``"torch,onnx"`` -> ``["torch", "onnx"]``, each checked against the registry."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise UserError("no engine given; expected one or more of " + ", ".join(list_runners()))
    for n in names:
        get_runner_class(n)
    return names


EXPORT_FORMATS: tuple[str, ...] = ("onnx", "staged", "trt", "openvino-int8")
"""Formats of ``cellseg-deploy export --format``."""
