"""OpenVINO runner: the single exported graph on the CPU, in fp32 or bf16 (AMX).

OpenVINO reads the same ``.onnx`` file as the ``onnx`` runner (:mod:`cellseg_deploy.backends.onnxrt.export`:
uint8 ``[H, W, 3]`` image in, pre-processing inside, ``boxes, labels, scores, mask_probs`` out), or an
OpenVINO IR (``.xml`` beside its ``.bin``) saved from it. The shared post-processing pastes the masks on the
host.

Precision is the user's choice and is never left to the plugin's default (on CPUs with AMX or AVX512-BF16
OpenVINO runs bf16 unless told otherwise):

- ``fp32``: ``INFERENCE_PRECISION_HINT=f32``, strict parity with PyTorch (the ``fp32`` tolerance profile).
- ``bf16``: ``INFERENCE_PRECISION_HINT=bf16``: convolutions and matrix products on the AMX/AVX512-BF16
  units. OpenVINO keeps box decoding, softmax and NMS in fp32; features, head activations and the FPN level
  choice of each RoI are bf16 (the ``bf16`` tolerance profile). The RoI coordinates fed to RoIAlign are
  kept fp32 by :func:`keep_roi_coordinates_fp32` (OpenVINO alone would round them to bf16).

- ``int8``: an int8 OpenVINO IR made by ``cellseg-deploy export --format openvino-int8`` (calibrated
  post-training quantisation, :mod:`cellseg_deploy.backends.openvino.int8`): the convolutions and fully
  connected layers run on AMX-INT8/VNNI, the rest in bf16 (fp32 on CPUs without bf16); the ``int8``
  tolerance profile. Only such an IR runs at ``int8``, and such an IR runs only at ``int8``. On a CPU without
  int8 dot-product instructions (AVX2 only, or AVX-512 without VNNI) OpenVINO emulates them: the results are
  the same, the speed may not beat fp32, and the runner says so once (``info()["int8_instructions"]``).

The precision actually compiled is read back from the compiled model and reported by :meth:`info`
(``execution_precision``); asking for a precision the CPU cannot run is an error, never a silent fallback.

Options (``options=`` dict, ``--option key=value`` on the CLI):

- ``cache_dir``: OpenVINO's model cache folder; the second load of the same model skips compilation.
- ``num_streams``: parallel inference streams (default 1: one image at a time, all threads on it).
- ``performance_hint``: ``LATENCY`` (default) or ``THROUGHPUT``.
- ``profile``: ``true`` compiles with ``PERF_COUNT`` and keeps every call's per-layer times for
  :meth:`~cellseg_deploy.backends.base.Runner.layer_profile` (:mod:`cellseg_deploy.backends.openvino.profiling`);
  the counters cost time in every call.

``threads`` sets ``INFERENCE_NUM_THREADS`` (default: OpenVINO's, one per physical core).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from cellseg_deploy.backends.base import Runner, check_static_size
from cellseg_deploy.backends.openvino.ir import (
    RESIZE_SIZE_INPUT,
    eager_resized_size,
    feed_resize_size_from_host,
    keep_roi_coordinates_fp32,
    read_provenance,
    repair_empty_branches,
)
from cellseg_deploy.backends.openvino.profiling import layer_times, runtime_origins
from cellseg_deploy.backends.registry import register_runner
from cellseg_deploy.cpu import cpu_flags, int8_instructions, vector_instructions
from cellseg_deploy.errors import BackendUnavailable, ModelFileError, UserError
from cellseg_deploy.structures import Detections, LayerTime

log = logging.getLogger(__name__)

OUTPUT_NAMES: tuple[str, ...] = ("boxes", "labels", "scores", "mask_probs")
INSTALL_HINT = "pip install 'cellseg-deploy[openvino]' (or: pip install openvino)"

PRECISION_HINTS: dict[str, str] = {"fp32": "f32", "bf16": "bf16"}
"""``--precision`` -> OpenVINO's ``INFERENCE_PRECISION_HINT`` (``int8`` compiles its unquantised layers at
``bf16``, or ``f32`` on CPUs without bf16: see ``_check_quantisation``)."""
INT8_HINT = (
    "make one with 'cellseg-deploy export CHECKPOINT --format openvino-int8 --calib-data DATA "
    "--out models/NAME.int8.xml'"
)


def openvino_version() -> str | None:
    """The installed OpenVINO version, or ``None`` when it is not installed (no import of the runtime)."""
    from importlib import metadata

    try:
        return metadata.version("openvino")
    except metadata.PackageNotFoundError:
        return None


def cpu_capabilities() -> dict[str, Any]:
    """What OpenVINO's CPU plugin reports about this CPU: ``{"device": full name, "capabilities": [...]}``
    (``capabilities`` holds e.g. ``"FP32"``, ``"BF16"``, ``"INT8"``). Raises :class:`BackendUnavailable`
    without OpenVINO."""
    ov = _import_openvino()
    core = ov.Core()
    return {
        "device": str(core.get_property("CPU", "FULL_DEVICE_NAME")),
        "capabilities": [str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")],
    }


def _import_openvino() -> Any:
    try:
        import openvino as ov
    except ImportError as exc:
        raise BackendUnavailable(f"the openvino runner needs OpenVINO: {INSTALL_HINT}") from exc
    return ov


def _element_name(value: Any) -> str:
    """OpenVINO element type (``<Type: 'bfloat16'>``, ``bf16``, ...) -> short name ``f32``/``bf16``/``f16``."""
    text = str(getattr(value, "get_type_name", lambda: value)()).lower()
    for short, names in (
        ("bf16", ("bf16", "bfloat16")),
        ("f16", ("f16", "float16")),
        ("f32", ("f32", "float32")),
    ):
        if text in names:
            return short
    return text


@register_runner
class OpenVINORunner(Runner):
    """OpenVINO (CPU) on the exported ``.onnx`` graph or an OpenVINO IR ``.xml`` (see the module docstring)."""

    name = "openvino"
    description = "OpenVINO on the CPU: fp32, bf16 on AMX/AVX512-BF16, or a calibrated int8 IR (optional extra [openvino])"
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "bf16", "int8")
    model_suffixes: ClassVar[tuple[str, ...]] = (".onnx", ".xml")
    layer_profiling: ClassVar[bool] = True

    core: Any = None
    compiled: Any = None
    request: Any = None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if openvino_version() is None:
            return f"the openvino runner needs OpenVINO, which is not installed: {INSTALL_HINT}"
        return None

    @classmethod
    def check_model_path(cls, path: Path) -> None:
        if path.suffix.lower() in (".pt", ".pth"):
            raise ModelFileError(
                f"runner 'openvino' reads .onnx or OpenVINO .xml files, and {path} is a checkpoint: export it first "
                f"with 'cellseg-deploy export {path} --format onnx --out models/NAME.onnx', or use --engine torch"
            )
        super().check_model_path(path)
        if path.suffix.lower() == ".xml" and not path.with_suffix(".bin").is_file():
            raise ModelFileError(
                f"OpenVINO IR {path} has no weights file {path.with_suffix('.bin')} beside it"
            )

    # -- lifecycle -----------------------------------------------------------------------------------------
    def _load(self) -> None:
        ov = _import_openvino()
        if self.device != "cpu":
            raise UserError(
                f"runner 'openvino' runs on the CPU only, got device {self.device!r}; use --device cpu"
            )
        self.core = ov.Core()
        capabilities = [str(c) for c in self.core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]
        try:
            model = self.core.read_model(str(self.model_path))
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses with multi-line messages
            first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise ModelFileError(f"OpenVINO cannot read {self.model_path}: {first}") from exc
        self.metadata = read_provenance(model)
        self._check_signature(model)
        self.repaired_branches = repair_empty_branches(model)
        self.resize_limits = _resize_limits(self.metadata)
        self.host_resize = self.resize_limits is not None and feed_resize_size_from_host(model)
        hint = self._check_quantisation(model, capabilities)
        self.fp32_roi_inputs = keep_roi_coordinates_fp32(model) if hint != "f32" else 0
        if hint == "bf16" and "BF16" not in capabilities:
            raise BackendUnavailable(
                f"--precision bf16 needs a CPU with bf16 support (AMX or AVX512-BF16); OpenVINO reports "
                f"{capabilities} for this CPU: use --precision fp32"
            )
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": hint,
            "PERFORMANCE_HINT": str(self.options.get("performance_hint", "LATENCY")).upper(),
            "NUM_STREAMS": int(self.options.get("num_streams", 1)),
        }
        if self.threads is not None:
            config["INFERENCE_NUM_THREADS"] = int(self.threads)
        self.profiling = self.bool_option("profile")
        if self.profiling:
            config["PERF_COUNT"] = True
        cache_dir = self.options.get("cache_dir")
        if cache_dir:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            config["CACHE_DIR"] = str(cache_dir)
        t0 = time.perf_counter()
        try:
            self.compiled = self.core.compile_model(model, "CPU", config)
        except Exception as exc:
            first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise ModelFileError(f"OpenVINO cannot compile {self.model_path} for the CPU: {first}") from exc
        self.compile_s = time.perf_counter() - t0
        self.execution_precision = _element_name(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        if self.execution_precision != hint:
            raise BackendUnavailable(
                f"asked OpenVINO for {hint} inference, but the compiled model runs {self.execution_precision}; "
                f"this CPU ({capabilities}) cannot run --precision {self.precision}"
            )
        if self.precision == "int8":  # quantised layers int8, the rest at the hint
            self.execution_precision = f"int8+{self.execution_precision}"
            self.int8_instructions = _check_int8_instructions(cpu_flags())
        self.request = self.compiled.create_infer_request()
        self.profiled: list[list[LayerTime]] = []
        self.origins = runtime_origins(self.compiled.get_runtime_model()) if self.profiling else {}
        self.outputs = {name: self.compiled.output(name) for name in OUTPUT_NAMES}
        self.device_name = str(self.core.get_property("CPU", "FULL_DEVICE_NAME"))
        self.capabilities = capabilities
        self.mask_size = int(self.metadata.get("mask_size", 28) or 28)

    def _check_quantisation(self, model: Any, capabilities: list[str]) -> str:
        """Match the model to ``--precision`` (int8 IR <-> ``int8``); return the precision hint to compile with."""
        from cellseg_deploy.backends.openvino.ir import read_quantisation

        self.quantisation = read_quantisation(model)
        if self.precision != "int8":
            if self.quantisation is not None:
                raise ModelFileError(
                    f"{self.model_path} is an int8 model (quantised by cellseg-deploy): run it with --precision int8, "
                    "or give the fp32 .onnx it was made from"
                )
            return PRECISION_HINTS[self.precision]
        if self.quantisation is None:
            raise ModelFileError(
                f"--precision int8 needs an int8 OpenVINO IR, and {self.model_path} is not one: {INT8_HINT}"
            )
        if "INT8" not in capabilities:
            raise BackendUnavailable(
                f"--precision int8: OpenVINO reports no int8 support on this CPU ({capabilities}); use --precision fp32"
            )
        return "bf16" if "BF16" in capabilities else "f32"

    def _check_signature(self, model: Any) -> None:
        """One uint8 ``[H, W, 3]`` input and the four raw outputs, as the single-graph export writes them."""
        inputs = model.inputs
        names = sorted(n for o in model.outputs for n in o.get_names() if n in OUTPUT_NAMES)
        shape = inputs[0].get_partial_shape() if len(inputs) == 1 else None
        ok = (
            shape is not None
            and inputs[0].get_element_type().get_type_name() == "u8"
            and shape.rank.is_static
            and shape.rank.get_length() == 3
            and shape[2].is_static
            and shape[2].get_length() == 3
            and len(model.outputs) == len(OUTPUT_NAMES)
            and names == sorted(OUTPUT_NAMES)
        )
        if not ok:
            found = ", ".join(
                f"{i.get_any_name()} {i.get_element_type().get_type_name()} {i.get_partial_shape()}"
                for i in inputs
            )
            raise ModelFileError(
                f"{self.model_path} is not a cellseg-deploy single-graph export: expected input 'image' uint8 [H, W, 3] "
                f"and outputs {list(OUTPUT_NAMES)}, found inputs ({found}) and outputs "
                f"{[sorted(o.get_names()) for o in model.outputs]}; export with "
                "'cellseg-deploy export --format onnx'"
            )
        static_shape: Any = shape
        self.fixed_size: tuple[int, int] | None = (
            (static_shape[0].get_length(), static_shape[1].get_length())
            if static_shape[0].is_static and static_shape[1].is_static
            else None
        )

    def _close(self) -> None:
        self.request = None
        self.compiled = None
        self.core = None

    # -- inference -----------------------------------------------------------------------------------------
    def _infer(self, image: np.ndarray) -> Detections:
        height, width = int(image.shape[0]), int(image.shape[1])
        check_static_size(self.model_path, self.fixed_size, (height, width))
        t0 = time.perf_counter()
        feed = np.ascontiguousarray(image, dtype=np.uint8)
        t1 = time.perf_counter()
        inputs: dict[Any, np.ndarray] = {0: feed}
        if self.host_resize:
            assert self.resize_limits is not None
            size = eager_resized_size(height, width, *self.resize_limits)
            inputs[RESIZE_SIZE_INPUT] = np.array(size, dtype=np.int64)
        result = self.request.infer(inputs)
        boxes, labels, scores, masks = (np.array(result[self.outputs[n]]) for n in OUTPUT_NAMES)
        t2 = time.perf_counter()
        if self.profiling:
            self.profiled.append(layer_times(self.request.get_profiling_info(), self.origins))
        if len(boxes) == 0:
            det = Detections.empty((height, width), self.mask_size)
        else:
            det = Detections(
                boxes=boxes.astype(np.float32, copy=False),
                labels=labels.astype(np.int64, copy=False),
                scores=scores.astype(np.float32, copy=False),
                mask_probs=masks.astype(np.float32, copy=False),
                image_size=(height, width),
            )
        det.timings = {"preprocess": t1 - t0, "network": t2 - t1}
        return det

    def layer_profile(self) -> list[list[LayerTime]]:
        self._require_loaded()
        if not self.profiling:
            raise UserError("the openvino runner keeps layer times only when loaded with option profile=true")
        return list(self.profiled)

    def _info(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "openvino": openvino_version(),
            "execution_precision": getattr(self, "execution_precision", None),
            "cpu": getattr(self, "device_name", None),
            "cpu_capabilities": getattr(self, "capabilities", None),
            "compile_s": round(getattr(self, "compile_s", 0.0), 3),
            "repaired_empty_branches": getattr(self, "repaired_branches", None),
            "fp32_roi_inputs": getattr(self, "fp32_roi_inputs", None),
            "resize_size_from_host": getattr(self, "host_resize", None),
        }
        if getattr(self, "quantisation", None) is not None:
            info["quantisation"] = self.quantisation
        if self.precision == "int8":
            info["int8_instructions"] = getattr(self, "int8_instructions", None)
        compiled = getattr(self, "compiled", None)
        if compiled is not None:
            info["inference_num_threads"] = int(compiled.get_property("INFERENCE_NUM_THREADS"))
            info["num_streams"] = int(compiled.get_property("NUM_STREAMS"))
        if self.options.get("cache_dir"):
            info["cache_dir"] = str(self.options["cache_dir"])
        meta = getattr(self, "metadata", {})
        for key in ("arch", "class_names", "source_sha256", "opset", "graph_sha256", "exported_at"):
            if key in meta:
                info[key] = meta[key]
        return info


_warned_no_int8 = False


def _check_int8_instructions(flags: frozenset[str]) -> str:
    """The int8 instruction set OpenVINO's int8 kernels can use on this CPU (:func:`int8_instructions`), or
    ``"none"`` (said once per process: OpenVINO still runs the IR, with int8 arithmetic emulated by wider
    multiply-adds, which can be slower than fp32), or ``"unknown"`` without CPU flags (not Linux)."""
    name = int8_instructions(flags)
    if name is not None:
        return name
    if not flags:
        return "unknown"
    global _warned_no_int8
    if not _warned_no_int8:
        _warned_no_int8 = True
        log.warning(
            "this CPU has no int8 dot-product instructions (%s; no AMX-INT8, AVX512-VNNI or AVX-VNNI): OpenVINO "
            "emulates int8 and may be no faster than fp32 here; compare with "
            "'cellseg-deploy bench --engine openvino,openvino:int8'",
            "/".join(vector_instructions(flags)) or "no AVX2",
        )
    return "none"


def _resize_limits(metadata: dict[str, Any]) -> tuple[int, int] | None:
    """``(min_size, max_size)`` of the exported model's resize, from its provenance; ``None`` when unknown."""
    config = metadata.get("model_config")
    if not isinstance(config, dict):
        return None
    try:
        return int(config["min_size"]), int(config["max_size"])
    except (KeyError, TypeError, ValueError):
        return None
