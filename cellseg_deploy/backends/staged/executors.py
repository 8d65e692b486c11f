"""Stage executors: what runs the stage graphs for the staged runner.

An executor takes a stage name and its input tensor (float32, on :attr:`StageExecutor.device`) and returns
the stage's outputs by name (float32 torch tensors on the same device). The staged runner does everything
else (pre-processing, anchors, decoding, NMS, RoIAlign) in FP32 PyTorch, so swapping the executor changes only
how the networks run.

- :class:`OrtExecutor`: ONNX Runtime sessions on the stage graphs (CPU provider, or the CUDA provider on a
  GPU). Tensors pass through host memory (numpy), which is simple and portable, not the fast path.
- :class:`TrtExecutor`: TensorRT engines through the named-tensor API (``set_input_shape``,
  ``set_tensor_address``, ``execute_async_v3`` on a dedicated CUDA stream), outputs allocated by torch on the
  GPU, optional CUDA-graph capture per input shape, one scratch buffer shared by every execution context.
  Its decisions are plain functions (:func:`trt_torch_dtype`, :func:`is_aligned`, :func:`graph_key`,
  :func:`plan_device_memory`, ...); its CUDA calls go through
  :class:`~cellseg_deploy.backends.tensorrt.build.CudaApi`.

fp32 on a GPU computes in fp32: TF32 is off for the PyTorch stage modules and for ONNX Runtime's CUDA
provider (``use_tf32=0``) unless asked for (``tf32=True``); TensorRT fp32 engines are built without TF32.
Every executor counts the host-device synchronisations it makes (:attr:`StageExecutor.syncs`).
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from cellseg_deploy.errors import BackendUnavailable, ModelFileError

log = logging.getLogger(__name__)


class StageExecutor(abc.ABC):
    """Runs stage graphs. Subclasses implement :meth:`run`, and :meth:`close` when they hold resources.

    Attributes:
        device: where inputs are expected and outputs returned.
        roi_bucket: when positive, the runner pads RoI counts up to a multiple of it (fewer distinct
            shapes, e.g. for CUDA graphs); 0 runs exact counts.
    """

    name: ClassVar[str] = ""
    device: torch.device = torch.device("cpu")
    roi_bucket: int = 0
    syncs: int = 0
    """Host-device synchronisations made through :meth:`synchronize` so far."""
    marks_need_sync: ClassVar[bool] = False
    """Whether :meth:`elapsed_s` needs one :meth:`synchronize` after the last :meth:`mark` (device events)."""

    @abc.abstractmethod
    def run(self, stage: str, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run ``stage`` on ``inputs`` (float32, on :attr:`device`); returns float32 outputs by name."""

    def synchronize(self) -> None:
        """Wait until the device has finished the work queued so far (no-op on the CPU)."""
        if self.device.type == "cuda":
            self.syncs += 1
            torch.cuda.synchronize(self.device)

    def mark(self) -> Any:
        """A point in time for stage timings: host seconds after synchronising (device events on TensorRT)."""
        self.synchronize()
        return time.perf_counter()

    def elapsed_s(self, start: Any, end: Any) -> float:
        """Seconds between two :meth:`mark` results."""
        return float(end - start)

    def close(self) -> None:
        """Release sessions, engines and memory."""
        return None

    def info(self) -> dict[str, Any]:
        """What runs the stages (for reports)."""
        return {"executor": self.name}


# ----------------------------------------------------------------------------------------------------------
# PyTorch (the stage modules the graphs were traced from)
# ----------------------------------------------------------------------------------------------------------
class TorchExecutor(StageExecutor):
    """The stage modules themselves (:func:`~cellseg_deploy.backends.staged.stages.build_stage_modules`), in PyTorch.

    With FP16 modules every activation is stored in FP16 between layers, on the CPU too, so this is the
    faithful FP16 reference where no GPU is available (ONNX Runtime's CPU provider computes the FP16 graphs'
    convolutions and matrix products in FP32, see :class:`OrtExecutor`).

    Args:
        modules: ``{stage: module}`` taking and returning float32
            (:class:`~cellseg_deploy.backends.staged.stages.Float32Boundary`).
        output_names: ``{stage: [output name, ...]}`` in the modules' output order.
        device: where the modules run.
        tf32: allow TF32 for fp32 convolutions and matrix products on a GPU (default off: fp32 is fp32). The
            switch is torch's, process-wide; it is set here, where the precision was asked for.
    """

    name = "torch"

    def __init__(
        self,
        modules: Mapping[str, torch.nn.Module],
        output_names: Mapping[str, list[str]],
        *,
        device: str = "cpu",
        tf32: bool = False,
    ) -> None:
        from cellseg_deploy.backends.devices import set_tf32, torch_device

        self.device = torch_device(device)
        self.tf32 = bool(tf32)
        if self.device.type == "cuda":
            set_tf32(self.tf32)
        self.modules = {s: m.to(self.device).eval() for s, m in modules.items()}
        self.output_names = dict(output_names)

    def run(self, stage: str, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        (x,) = inputs.values()
        with torch.inference_mode():
            outs = self.modules[stage](x.to(self.device, torch.float32))
        return dict(zip(self.output_names[stage], outs, strict=True))

    def close(self) -> None:
        self.modules.clear()

    def info(self) -> dict[str, Any]:
        from cellseg_deploy.backends.devices import tf32_state

        dtypes = {s: str(next(m.parameters()).dtype).replace("torch.", "") for s, m in self.modules.items()}
        info: dict[str, Any] = {"executor": self.name, "torch": str(torch.__version__), "dtypes": dtypes}
        if self.device.type == "cuda":
            info.update(tf32=self.tf32, **tf32_state().as_info())
        return info


# ----------------------------------------------------------------------------------------------------------
# ONNX Runtime
# ----------------------------------------------------------------------------------------------------------
class OrtExecutor(StageExecutor):
    """ONNX Runtime sessions, one per stage graph.

    On the CPU provider the FP16 graphs run with their FP16 weights, but ONNX Runtime has no FP16 CPU kernels
    for Conv, ConvTranspose and Gemm: it computes those (and, after dropping the redundant Cast pairs, the
    layers between them) in FP32. So on the CPU the FP16 graphs show the effect of FP16 weights, not of FP16
    activations; :class:`TorchExecutor` with FP16 modules (or a GPU) gives the latter.

    With ``device="cuda[:N]"`` every session must get the CUDA provider: ONNX Runtime falls back to the CPU
    in silence when the CUDA libraries or the GPU are missing, and that is refused here
    (:class:`~cellseg_deploy.errors.BackendUnavailable`), as the single-graph ``onnx`` runner does. The CUDA
    provider is asked for ``use_tf32=0`` (its default is TF32) unless ``tf32=True``.

    Args:
        graphs: ``{stage: path of its .onnx}``.
        device: ``"cpu"`` (CPU provider) or ``"cuda"``/``"cuda:N"`` (CUDA provider).
        threads: intra-op threads of each session (``None``: ONNX Runtime's default).
        tf32: let the CUDA provider use TF32 for fp32 work.
    """

    name = "onnxruntime"

    def __init__(
        self,
        graphs: Mapping[str, Path],
        *,
        device: str = "cpu",
        threads: int | None = None,
        tf32: bool = False,
    ) -> None:
        import onnxruntime as ort

        from cellseg_deploy.backends.devices import torch_device

        self.device = torch_device(device)
        self.tf32 = bool(tf32)
        opts = ort.SessionOptions()
        # No busy-waiting between stage runs: the host steps in between need the cores (see ort_runner.py).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads is not None:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        providers = ort_providers(self.device, ort.get_available_providers(), tf32=self.tf32)
        self.sessions: dict[str, Any] = {}
        for stage, path in graphs.items():
            try:
                self.sessions[stage] = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
            except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
                raise ModelFileError(
                    f"ONNX Runtime cannot load {path}: {str(exc).splitlines()[0][:200]}"
                ) from exc
        self.providers = {s: sess.get_providers()[0] for s, sess in self.sessions.items()}
        problem = provider_problem(providers, self.providers, ort.get_available_providers())
        if problem is not None:
            self.sessions.clear()
            raise BackendUnavailable(problem)
        self.provider_options = {
            s: sess.get_provider_options().get(self.providers[s], {}) for s, sess in self.sessions.items()
        }

    def run(self, stage: str, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        session = self.sessions[stage]
        feed = {name: t.detach().to("cpu", torch.float32).contiguous().numpy() for name, t in inputs.items()}
        names = [o.name for o in session.get_outputs()]
        outs = session.run(names, feed)
        if self.device.type == "cuda":
            self.syncs += len(feed) + len(outs)  # each host copy to/from the GPU waits for it
        return {
            n: torch.from_numpy(np.asarray(o, dtype=np.float32)).to(self.device)
            for n, o in zip(names, outs, strict=True)
        }

    def close(self) -> None:
        self.sessions.clear()

    def info(self) -> dict[str, Any]:
        import onnxruntime as ort

        info: dict[str, Any] = {
            "executor": self.name,
            "onnxruntime": ort.__version__,
            "providers": self.providers,
        }
        if self.device.type == "cuda":
            first: dict[str, Any] = next(iter(self.provider_options.values()), {})
            info["tf32"] = str(first.get("use_tf32", "")) == "1"
        return info


def ort_providers(device: torch.device, available: list[str], *, tf32: bool = False) -> list[Any]:
    """The providers to ask ONNX Runtime for on ``device``: the CPU provider, or the CUDA provider on GPU
    ``device.index`` with ``use_tf32`` off unless ``tf32`` (then the CPU provider for nodes CUDA lacks).

    Raises:
        BackendUnavailable: CUDA asked for, and this ONNX Runtime has no CUDA provider.
    """
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available:
        raise BackendUnavailable(
            f"device {str(device)!r} needs ONNX Runtime's CUDA provider, which this onnxruntime build lacks "
            f"(available: {available}); pip install onnxruntime-gpu, or use --device cpu"
        )
    options = {"device_id": str(device.index or 0), "use_tf32": "1" if tf32 else "0"}
    return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]


def provider_problem(requested: list[Any], got: Mapping[str, str], available: list[str]) -> str | None:
    """Why sessions that got ``got`` (``{stage: first provider}``) do not honour ``requested``, or ``None``."""
    wanted = requested[0] if isinstance(requested[0], str) else requested[0][0]
    wrong = {s: p for s, p in got.items() if p != wanted}
    if not wrong:
        return None
    return (
        f"asked ONNX Runtime for {wanted} but stage(s) {sorted(wrong)} got {sorted(set(wrong.values()))} "
        f"(available here: {available}); check the CUDA/cuDNN libraries and the GPU, or use --device cpu"
    )
