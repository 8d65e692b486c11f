"""User-facing error types.

Library code raises one of these for anything the *user* can fix (bad input, bad flags, missing files);
the CLI turns them into one line on stderr and exit code 2 (:class:`UserError`) or 1 (:class:`CheckFailed`).
Anything else is a bug and keeps its traceback.

Messages say what was expected, what was found and how to fix it, in one line.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


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


class InvalidModelOutput(CheckFailed):
    """A runner returned detections that break the raw-output contract (non-finite or inverted boxes, boxes
    far outside the image, scores outside [0, 1], unknown labels, non-finite mask probabilities).

    The model file is at fault, not the input: the run stops with exit code 1 and one line that names the
    model, the image and what was wrong. ``model`` and ``image`` are filled in by whoever knows them
    (:meth:`Runner.predict` the model, the dataset loops the image) through :meth:`about`.
    """

    def __init__(self, problem: str, *, model: str = "", image: str = "") -> None:
        self.problem = problem
        self.model = model
        self.image = image
        super().__init__(self._message())

    def about(self, *, model: str | None = None, image: str | None = None) -> InvalidModelOutput:
        """The same error with the model and/or image named (keeps what is already known)."""
        return InvalidModelOutput(
            self.problem, model=self.model or (model or ""), image=self.image or (image or "")
        )

    def _message(self) -> str:
        where = ", ".join(
            part
            for part in (
                f"model {self.model}" if self.model else "",
                f"image {self.image}" if self.image else "",
            )
            if part
        )
        return f"invalid model output ({where or 'unnamed model'}): {self.problem}"


@contextmanager
def naming_model_output(*, model: object = "", image: object = "") -> Iterator[None]:
    """Name the model and the image in an :class:`InvalidModelOutput` raised inside the block."""
    try:
        yield
    except InvalidModelOutput as exc:
        raise exc.about(model=str(model), image=str(image)) from None
