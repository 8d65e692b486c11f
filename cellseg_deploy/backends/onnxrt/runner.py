"""ONNX Runtime runner for the single-graph export (:mod:`cellseg_deploy.backends.onnxrt.export`).

The graph takes the uint8 ``[H, W, 3]`` image as read from disk (normalisation and resizing are inside it)
and returns ``boxes, labels, scores, mask_probs``; the shared post-processing pastes the masks on the host.

Execution providers are asked for explicitly and checked after the session is created: asking for CUDA and
getting the CPU (ONNX Runtime falls back silently when the CUDA libraries or the GPU are missing) is an
error, never a silent swap. :meth:`OrtRunner.info` reports the providers actually in use.

CUDA libraries: onnxruntime-gpu's CUDA provider library needs cuBLAS(Lt) and cuDNN, which pip installs
only as ``site-packages/nvidia/...`` packages that the dynamic loader does not search. ONNX Runtime finds
them after ``import torch`` (torch loads the same files) or after ``onnxruntime.preload_dlls()``; ``eval``
and ``predict`` create the session before anything imports torch, so the runner calls ``preload_dlls`` itself
before a CUDA session (once per process) and says so in ``info()["cuda_libraries"]``.

Precision: the CUDA provider computes fp32 convolutions and matmuls in TF32 unless told otherwise (its
``use_tf32`` defaults to on). This runner is ``fp32``, so it asks for ``use_tf32=0``; ``tf32=true`` is the
explicit opt-in. ``info()`` reports ``tf32`` and the provider options asked for.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from cellseg_deploy.backends.base import Runner, check_static_size
from cellseg_deploy.backends.devices import parse_device
from cellseg_deploy.backends.onnxrt.profiling import calls_from_trace, graph_origins
from cellseg_deploy.backends.registry import register_runner
from cellseg_deploy.errors import BackendUnavailable, ModelFileError, UserError
from cellseg_deploy.structures import Detections, LayerTime

if TYPE_CHECKING:
    from cellseg_deploy.modeling.config import ModelConfig

GRAPH_OPT_LEVELS: tuple[str, ...] = ("disable", "basic", "extended", "all")
"""Names of ONNX Runtime's graph optimisation levels (option ``graph_optimization``)."""

_OUTPUTS = ("boxes", "labels", "scores", "mask_probs")

CUDNN_CONV_ALGO_SEARCH: tuple[str, ...] = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")
"""Values of the CUDA provider's ``cudnn_conv_algo_search`` (option ``cudnn_conv_algo_search``)."""

log = logging.getLogger(__name__)

_cuda_libraries: str | None = None
"""How this process got the CUDA libraries for ONNX Runtime (set by :func:`prepare_cuda_libraries`)."""


def prepare_cuda_libraries(ort: Any) -> str:
    """Make cuBLAS/cuDNN from the pip ``nvidia-*`` packages loadable for the CUDA provider; once per process.

    Calls ``onnxruntime.preload_dlls()`` (ONNX Runtime >= 1.21) whether or not torch was imported: on Linux
    it ``dlopen``s the files from ``site-packages/nvidia``, which costs nothing when torch already loaded
    them. Its messages (printed on stdout) go to this module's debug log. Returns a line for ``info()``.
    """
    global _cuda_libraries
    if _cuda_libraries is not None:
        return _cuda_libraries
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        _cuda_libraries = f"not preloaded: onnxruntime {ort.__version__} has no preload_dlls (>= 1.21); " + (
            "torch was imported first" if "torch" in sys.modules else "only the loader's search path"
        )
        return _cuda_libraries
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        preload()
    if printed.getvalue().strip():
        log.debug("onnxruntime.preload_dlls: %s", printed.getvalue().strip())
    _cuda_libraries = "preloaded by onnxruntime.preload_dlls()"
    return _cuda_libraries


@register_runner
class OrtRunner(Runner):
    """ONNX Runtime on an exported ``.onnx`` file; CPU provider, or CUDA with ``device="cuda[:N]"``.

    Options (``options=`` dict, or ``--option key=value`` on the CLI):

    - ``graph_optimization``: one of :data:`GRAPH_OPT_LEVELS` (default ``"all"``).
    - ``optimized_model_path``: save the graph as optimised by ONNX Runtime to this file (for inspection;
      the saved file is specific to this machine's providers and ONNX Runtime version).
    - ``inter_op_threads``: threads running independent nodes in parallel (default: ONNX Runtime's).
    - ``sequential``: ``True`` (default) runs nodes one after another (the inter-op pool unused).
    - ``tf32`` (CUDA): ``False`` (default) computes fp32 as fp32 (provider option ``use_tf32=0``); ``True``
      lets the CUDA provider use TF32 for convolutions and matmuls (faster on Ampere and later, about 3
      decimal digits per multiplication; the fp32 parity tolerances were not measured for it).
    - ``cudnn_conv_algo_search`` (CUDA): one of :data:`CUDNN_CONV_ALGO_SEARCH` (default ``EXHAUSTIVE``, ONNX
      Runtime's: every new input shape benchmarks cuDNN's algorithms once).
    - ``spinning``: ``False`` (default) lets the intra-op threads sleep between runs; ``True`` is ONNX
      Runtime's own default (they busy-wait).
    - ``profile``: ``True`` turns on ONNX Runtime's profiler for
      :meth:`~cellseg_deploy.backends.base.Runner.layer_profile` (:mod:`cellseg_deploy.backends.onnxrt.profiling`);
      the profiler costs time in every call.

    ``threads`` sets the intra-op thread count (default: ONNX Runtime's, one per physical core).
    """

    name = "onnx"
    description = "ONNX Runtime on the single exported graph (CPU, or CUDA provider)"
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)
    model_suffixes: ClassVar[tuple[str, ...]] = (".onnx",)
    layer_profiling: ClassVar[bool] = True

    @classmethod
    def unavailable_reason(cls) -> str | None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return "onnxruntime is not installed: pip install onnxruntime (CPU) or onnxruntime-gpu"
        return None

    @classmethod
    def check_model_path(cls, path: Path) -> None:
        if path.suffix.lower() in (".pt", ".pth"):
            raise ModelFileError(
                f"runner 'onnx' reads .onnx files, and {path} is a checkpoint: export it first with "
                f"'cellseg-deploy export {path} --format onnx --out models/NAME.onnx', or use --engine torch"
            )
        super().check_model_path(path)

    # -- lifecycle -----------------------------------------------------------------------------------------
    def _load(self) -> None:
        import onnxruntime as ort

        from cellseg_deploy.backends.metadata import decode_props

        options = ort.SessionOptions()
        options.log_severity_level = 3
        # No busy-waiting between runs: ONNX Runtime's pool otherwise spins after each run and steals the cores
        # from whatever runs next (another engine in an interleaved benchmark, the host's own post-processing).
        # Option ``spinning=true`` restores ONNX Runtime's default.
        spinning = "1" if self.bool_option("spinning") else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        level = str(self.options.get("graph_optimization", "all"))
        if level not in GRAPH_OPT_LEVELS:
            raise UserError(
                f"graph_optimization: unknown level {level!r}; expected one of {list(GRAPH_OPT_LEVELS)}"
            )
        options.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[level]
        _ = self.tf32  # a bad value is an error on every device, not only on CUDA
        if self.threads is not None:
            options.intra_op_num_threads = int(self.threads)
        if self.options.get("inter_op_threads") is not None:
            options.inter_op_num_threads = int(self.options["inter_op_threads"])
        options.execution_mode = (
            ort.ExecutionMode.ORT_SEQUENTIAL
            if self.bool_option("sequential", True)
            else ort.ExecutionMode.ORT_PARALLEL
        )
        self.profiling = self.bool_option("profile")
        if self.profiling:
            options.enable_profiling = True
            options.profile_file_prefix = str(
                Path(tempfile.gettempdir()) / f"cellseg-ort-profile-{os.getpid()}"
            )
        self.profiled: list[list[LayerTime]] | None = None
        saved = self.options.get("optimized_model_path")
        if saved:
            Path(saved).parent.mkdir(parents=True, exist_ok=True)
            options.optimized_model_filepath = str(saved)

        providers = self._requested_providers(ort)
        try:
            self.session = ort.InferenceSession(str(self.model_path), options, providers=providers)
        except Exception as exc:
            first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise ModelFileError(f"ONNX Runtime cannot load {self.model_path}: {first}") from exc
        self.providers = list(self.session.get_providers())
        wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
        if self.providers[0] != wanted:
            self.session = None
            raise BackendUnavailable(
                f"asked for {wanted} but ONNX Runtime gave {self.providers} (available here: "
                f"{ort.get_available_providers()}); check the CUDA/cuDNN libraries and the GPU, or use --device cpu"
            )
        self._check_signature()
        self.metadata = decode_props(dict(self.session.get_modelmeta().custom_metadata_map))
        self.mask_size = int(self.metadata.get("mask_size", 28) or 28)
        self.model_config = _model_config(self.metadata)

    def _requested_providers(self, ort: Any) -> list[Any]:
        """Providers in order of preference; for CUDA with the options in :meth:`cuda_provider_options`."""
        try:
            kind, index = parse_device(self.device)
        except UserError:
            raise UserError(
                f"runner 'onnx': unknown device {self.device!r}; expected cpu, cuda or cuda:N"
            ) from None
        if kind == "cpu":
            return ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendUnavailable(
                f"device {self.device!r} needs ONNX Runtime's CUDA provider, which this onnxruntime build lacks "
                f"(available: {ort.get_available_providers()}); pip install onnxruntime-gpu, or use --device cpu"
            )
        self.cuda_libraries = prepare_cuda_libraries(ort)
        return [("CUDAExecutionProvider", self.cuda_provider_options(index or 0)), "CPUExecutionProvider"]

    def cuda_provider_options(self, device_id: int) -> dict[str, str]:
        """The CUDA provider options this runner asks for (strings, as ONNX Runtime takes them)."""
        search = str(self.options.get("cudnn_conv_algo_search", "EXHAUSTIVE")).upper()
        if search not in CUDNN_CONV_ALGO_SEARCH:
            raise UserError(
                f"cudnn_conv_algo_search: unknown value {search!r}; expected one of {list(CUDNN_CONV_ALGO_SEARCH)}"
            )
        return {
            "device_id": str(device_id),
            "use_tf32": "1" if self.tf32 else "0",
            "cudnn_conv_algo_search": search,
        }

    @property
    def tf32(self) -> bool:
        """Whether TF32 was asked for (option ``tf32``; only the CUDA provider has it)."""
        return self.bool_option("tf32")

    def _check_signature(self) -> None:
        """The graph must be a cellseg-deploy single-graph export: one uint8 ``[H, W, 3]`` input, four outputs."""
        inputs = self.session.get_inputs()
        outputs = [o.name for o in self.session.get_outputs()]
        ok = (
            len(inputs) == 1
            and inputs[0].type == "tensor(uint8)"
            and len(inputs[0].shape) == 3
            and inputs[0].shape[2] == 3
            and outputs == list(_OUTPUTS)
        )
        if not ok:
            found = ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs)
            raise ModelFileError(
                f"{self.model_path} is not a cellseg-deploy single-graph export: expected input 'image' uint8 "
                f"[H, W, 3] and outputs {list(_OUTPUTS)}, found inputs ({found}) and outputs {outputs}; "
                "export with 'cellseg-deploy export --format onnx' (stage graphs run with --engine staged)"
            )
        self.input_name = inputs[0].name
        self.fixed_size = (
            tuple(inputs[0].shape[:2]) if all(isinstance(d, int) for d in inputs[0].shape[:2]) else None
        )

    def _close(self) -> None:
        self.session = None

    # -- inference -----------------------------------------------------------------------------------------
    def _infer(self, image: np.ndarray) -> Detections:
        height, width = int(image.shape[0]), int(image.shape[1])
        check_static_size(self.model_path, self.fixed_size, (height, width))
        t0 = time.perf_counter()
        feed = {self.input_name: np.ascontiguousarray(image, dtype=np.uint8)}
        t1 = time.perf_counter()
        boxes, labels, scores, masks = self.session.run(list(_OUTPUTS), feed)
        t2 = time.perf_counter()
        if len(boxes) == 0:
            det = Detections.empty((height, width), self.mask_size)
        else:
            det = Detections(
                boxes=np.asarray(boxes, np.float32),
                labels=np.asarray(labels, np.int64),
                scores=np.asarray(scores, np.float32),
                mask_probs=np.asarray(masks, np.float32),
                image_size=(height, width),
            )
        det.timings = {"preprocess": t1 - t0, "network": t2 - t1}
        return det

    def layer_profile(self) -> list[list[LayerTime]]:
        """Ends ONNX Runtime's profiling (it cannot restart in a session): later calls are not profiled."""
        self._require_loaded()
        if not self.profiling:
            raise UserError("the onnx runner keeps layer times only when loaded with option profile=true")
        if self.profiled is None:
            import onnx

            trace = Path(self.session.end_profiling())
            try:
                origins = graph_origins(onnx.load(str(self.model_path), load_external_data=False))
                self.profiled = calls_from_trace(json.loads(trace.read_text()), origins)
            finally:
                trace.unlink(missing_ok=True)
        return list(self.profiled)

    def _info(self) -> dict[str, Any]:
        import onnxruntime as ort

        info: dict[str, Any] = {
            "providers": list(getattr(self, "providers", [])),
            "onnxruntime": str(ort.__version__),
            "graph_optimization": str(self.options.get("graph_optimization", "all")),
        }
        if self.device != "cpu":
            info["tf32"] = self.tf32
            info["cuda_libraries"] = getattr(self, "cuda_libraries", None)
            session = getattr(self, "session", None)
            if session is not None:
                info["provider_options"] = session.get_provider_options().get("CUDAExecutionProvider", {})
        meta = getattr(self, "metadata", {})
        for key in ("arch", "class_names", "source_sha256", "opset", "graph_sha256", "exported_at"):
            if key in meta:
                info[key] = meta[key]
        config = getattr(self, "model_config", None)
        if config is not None:
            info["detections_per_img"] = config.detections_per_img
        if self.options.get("optimized_model_path"):
            info["optimized_model_path"] = str(self.options["optimized_model_path"])
        return info


def _model_config(meta: dict[str, Any]) -> ModelConfig | None:
    """The model config recorded in the file's metadata (``None`` for files exported elsewhere)."""
    from cellseg_deploy.errors import ConfigError
    from cellseg_deploy.modeling.config import ModelConfig

    data = meta.get("model_config")
    if not isinstance(data, dict):
        return None
    try:
        return ModelConfig.from_dict(data)
    except ConfigError:
        return None
