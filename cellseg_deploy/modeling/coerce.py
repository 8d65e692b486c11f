"""Settings read from YAML or JSON, converted to a dataclass field's annotated type (one converter for the
model config, the training recipe and checkpoints).

YAML gives lists where a field holds a tuple, ints where it holds a float, and (PyYAML, YAML 1.1) a *string*
for a float written without a dot (``1e-3``); :func:`coerce` turns each into the annotated type, or raises a
one-line :class:`~cellseg_deploy.errors.ConfigError` naming the key and what it expected.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Sequence
from typing import Any, Union

from cellseg_deploy.errors import ConfigError

_PLURALS: dict[Any, str] = {int: "integers", float: "numbers", bool: "true/false values", str: "strings"}


def type_name(tp: Any) -> str:
    """``tp`` in words, for error messages (``int | None`` -> ``"an integer or null"``)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_PLURALS.get(args[0], type_name(args[0]))}"
        return f"a list of {len(args)} {_PLURALS.get(args[0], type_name(args[0]))}"
    if origin is dict or tp is dict:
        return "a mapping"
    return {
        int: "an integer",
        float: "a number",
        bool: "true/false",
        str: "a string",
        type(None): "null",
    }.get(tp, str(tp))


def coerce(key: str, value: Any, tp: Any, choices: Sequence[str] = ()) -> Any:
    """``value`` converted to the annotated type ``tp`` (``X | None``, ``tuple[X, ...]``, ``tuple[X, Y]``,
    ``dict``, ``bool``, ``int``, ``float``, ``str``); ``choices``: the allowed strings, if limited.

    Raises:
        ConfigError: ``value`` does not fit ``tp`` (or is not one of ``choices``), naming ``key``.
    """

    def bad() -> ConfigError:
        expected = f"one of {list(choices)}" if choices else type_name(tp)
        return ConfigError(f"{key}: expected {expected}, got {value!r}")

    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(key, value, arg, choices)
            except ConfigError:
                continue
        raise bad()
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise bad()
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(key, v, args[0]) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {type_name(tp)}, got {value!r}")
        return tuple(coerce(key, v, a) for v, a in zip(value, args, strict=True))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad() from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        if choices and value not in choices:
            raise ConfigError(f"{key}: unknown value {value!r}; expected one of {list(choices)}")
        return value
    raise bad()  # pragma: no cover - every annotated type of a settings field is handled above
