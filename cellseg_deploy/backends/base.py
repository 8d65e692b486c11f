"""The runner interface: one way to run a model, whatever the backend.

A runner is a context manager::

    with create_runner("onnx", "models/tiny.onnx") as runner:
        det = runner.infer(image)            # raw Detections (mask probabilities, original-image boxes)
        inst = runner.predict(image)         # Instances after the shared post-processing

Input checks and timing live here; a backend implements only :meth:`Runner._load`, :meth:`Runner._infer`
(and optionally :meth:`Runner._close`, :meth:`Runner._infer_batch`).

Contract of ``infer``: takes an RGB uint8 image ``[H, W, 3]`` at its original size and returns
:class:`~cellseg_deploy.structures.Detections` in original-image pixels: boxes float32 ``[N, 4]``
``x1, y1, x2, y2``, labels int64 ``[N]`` in 1..4, scores float32 ``[N]``, mask probabilities float32
``[N, M, M]``, ``N >= 0``. ``Detections.timings`` holds seconds per stage: ``"preprocess"`` (host-side
conversion and, for staged runners, normalisation and resizing) and ``"network"`` (the model; single-graph
runners normalise and resize inside it), plus one entry per stage for staged runners.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from cellseg_deploy.errors import ModelFileError, UserError
from cellseg_deploy.postprocess import PostprocessConfig, postprocess
from cellseg_deploy.structures import Detections, Instances, LayerTime


class Runner(abc.ABC):
    """Base class of every backend runner (see the module docstring).

    Args:
        model_path: the model file the backend reads (checkpoint, ONNX file, stage folder, engine manifest).
        device: ``"cpu"`` or ``"cuda"`` / ``"cuda:N"``.
        precision: one of the runner's :attr:`precisions`.
        threads: intra-op CPU threads (``None``: the backend's default).
        options: backend-specific settings (documented by each runner).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)
    model_suffixes: ClassVar[tuple[str, ...]] = ()
    """File suffixes (or ``"/"`` for a folder) this runner accepts as ``model_path``."""
    layer_profiling: ClassVar[bool] = False
    """Whether the runtime can time every layer (option ``profile=true``, then :meth:`layer_profile`)."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        device: str = "cpu",
        precision: str = "fp32",
        threads: int | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.model_path = Path(model_path)
        self.device = device
        self.precision = precision
        self.threads = threads
        self.options = dict(options or {})
        self._loaded = False
        if precision not in self.precisions:
            raise UserError(
                f"runner {self.name!r} does not support precision {precision!r}; expected one of {list(self.precisions)}"
            )
        if threads is not None and threads < 1:
            raise UserError(f"threads must be at least 1, got {threads}")
        self.check_model_path(self.model_path)

    # -- availability and model files -------------------------------------------------------------------
    @classmethod
    def unavailable_reason(cls) -> str | None:
        """``None`` when this backend can run here, else one line saying what is missing and how to fix it."""
        return None

    @classmethod
    def check_model_path(cls, path: Path) -> None:
        """Raise :class:`ModelFileError` when ``path`` is missing or is not a file this runner reads."""
        if not path.exists():
            raise ModelFileError(f"model {path} does not exist")
        if not cls.model_suffixes:
            return
        is_dir = path.is_dir()
        ok = ("/" in cls.model_suffixes and is_dir) or (
            not is_dir and path.suffix.lower() in cls.model_suffixes
        )
        if not ok:
            raise ModelFileError(
                f"runner {cls.name!r} cannot read {path}: expected "
                + " or ".join("a folder" if s == "/" else f"a {s} file" for s in cls.model_suffixes)
            )

    # -- lifecycle -----------------------------------------------------------------------------------------
    def load(self) -> Runner:
        """Load the model (idempotent)."""
        if not self._loaded:
            reason = self.unavailable_reason()
            if reason is not None:
                from cellseg_deploy.errors import BackendUnavailable

                raise BackendUnavailable(reason)
            self._load()
            self._loaded = True
        return self

    def close(self) -> None:
        """Release the model and its memory (idempotent)."""
        if self._loaded:
            self._close()
            self._loaded = False

    def __enter__(self) -> Runner:
        return self.load()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- inference -----------------------------------------------------------------------------------------
    def infer(self, image: np.ndarray) -> Detections:
        """Raw detections for one RGB uint8 ``[H, W, 3]`` image (see the module docstring)."""
        self._require_loaded()
        check_image(image)
        det = self._infer(np.ascontiguousarray(image))
        return det

    def infer_batch(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """Raw detections for several images (of any sizes); backends that batch override ``_infer_batch``."""
        self._require_loaded()
        for image in images:
            check_image(image)
        return self._infer_batch([np.ascontiguousarray(im) for im in images])

    def predict(self, image: np.ndarray, post: PostprocessConfig | None = None) -> Instances:
        """:meth:`infer` followed by the shared :func:`~cellseg_deploy.postprocess.postprocess`."""
        return postprocess(self.infer(image), post)

    def info(self) -> dict[str, Any]:
        """What ran: backend, device or provider, precision, threads, model file (for reports)."""
        return {
            "runner": self.name,
            "model": str(self.model_path),
            "device": self.device,
            "precision": self.precision,
            "threads": self.threads,
            **self._info(),
        }

    def bool_option(self, key: str, default: bool = False) -> bool:
        """A yes/no option (``true``/``false``, ``1``/``0``, ``yes``/``no``, ``on``/``off`` from ``--option``)."""
        value = self.options.get(key, default)
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise UserError(f"option {key}: expected true or false, got {value!r}")
        return bool(value)

    def layer_profile(self) -> list[list[LayerTime]]:
        """Per call since the runner loaded with option ``profile=true``, the layers that ran and their times.

        The runtime's own profiler does the timing, which costs time in every call: profile in a run of its
        own, never in one whose latency is reported.
        """
        raise UserError(
            f"runner {self.name!r} has no per-layer profile; the runners with one: openvino, onnx (CPU)"
        )

    # -- to implement ---------------------------------------------------------------------------------------
    @abc.abstractmethod
    def _load(self) -> None: ...

    @abc.abstractmethod
    def _infer(self, image: np.ndarray) -> Detections: ...

    def _infer_batch(self, images: list[np.ndarray]) -> list[Detections]:
        return [self._infer(im) for im in images]

    def _close(self) -> None:
        return None

    def _info(self) -> dict[str, Any]:
        return {}

    def _require_loaded(self) -> None:
        if not self._loaded:
            raise RuntimeError(
                f"runner {self.name!r} is not loaded; use it as a context manager or call load()"
            )


def check_image(image: np.ndarray) -> None:
    """Raise :class:`UserError` unless ``image`` is an RGB uint8 ``[H, W, 3]`` array with ``H, W >= 1``."""
    if not isinstance(image, np.ndarray):
        raise UserError(f"image must be a numpy array, got {type(image).__name__}")
    if (
        image.dtype != np.uint8
        or image.ndim != 3
        or image.shape[2] != 3
        or image.shape[0] < 1
        or image.shape[1] < 1
    ):
        raise UserError(
            f"image must be RGB uint8 [H, W, 3] with H, W >= 1, got {image.dtype} {list(image.shape)}; "
            "read images with cellseg_deploy.data.io.read_image"
        )


def check_static_size(model_path: Path, fixed_size: tuple[int, int] | None, size: tuple[int, int]) -> None:
    """Raise :class:`UserError` when a graph exported for one input size (``--static``) gets another ``(H, W)``."""
    if fixed_size is not None and size != fixed_size:
        raise UserError(
            f"{model_path} was exported for {fixed_size[0]}x{fixed_size[1]} images only, got "
            f"{size[0]}x{size[1]}; export again without --static"
        )
