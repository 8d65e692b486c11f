"""User-facing error types.

Library code raises one of these for anything the *user* can fix (bad input, bad flags, missing files);
the CLI turns them into one line on stderr and exit code 2 (:class:`UserError`) or 1 (:class:`CheckFailed`).
Anything else is a bug and keeps its traceback.

Messages say what was expected, what was found and how to fix it, in one line.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or bad usage: exit code 2, one line on stderr."""

    exit_code = 2


class DataError(UserError):
    """A dataset file or folder is missing, unreadable or malformed."""


class ConfigError(UserError):
    """A recipe, setting or flag has an unknown key, a wrong type or a value outside its allowed set."""


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt, or not a cellseg-deploy checkpoint."""


class ModelFileError(UserError):
    """An exported model (ONNX file, engine, manifest) is missing, corrupt or does not fit the runner."""


class BackendUnavailable(UserError):
    """An optional backend (TensorRT, OpenVINO, a CUDA device) is not installed or not usable here."""


class CheckFailed(Exception):
    """A check or gate ran and did not pass (parity, mAP gate, dataset check): exit code 1."""

    exit_code = 1
