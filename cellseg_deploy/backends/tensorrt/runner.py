"""The ``trt`` runner: TensorRT engines for the three stages on an NVIDIA GPU, the host steps in FP32 PyTorch on
the same GPU (the staged pipeline of :mod:`~cellseg_deploy.backends.staged.runner`).

Engines built for another TensorRT version, GPU or stage graph are refused with a one-line message, or rebuilt
with the runner option ``rebuild=true``.
"""

from __future__ import annotations

from cellseg_deploy.backends.registry import register_runner
from cellseg_deploy.backends.staged.runner import StagedPipeline, _flag, _StagedRunnerBase
from cellseg_deploy.backends.staged.stages import (
    STAGES,
    load_stage_folder,
)
from cellseg_deploy.errors import ModelFileError


@register_runner
class TrtRunner(_StagedRunnerBase):
    """TensorRT engines for the stages on an NVIDIA GPU; host steps FP32 PyTorch on the same GPU.

    ``model_path``: a stage folder (engines in ``engines/<precision>/``), an engine folder or ``engines.json``.
    Options: ``rebuild`` (build engines that are missing or were built for another TensorRT version or GPU,
    default false: such engines are refused with a one-line message), ``cuda_graphs`` (default false),
    ``workspace_gib`` (for rebuilds, default 4), ``max_batch``.
    """

    name = "trt"
    description = "TensorRT engines per stage + torchvision FP32 host steps (NVIDIA GPU)"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        from cellseg_deploy.backends.tensorrt.build import trt_unavailable_reason

        return trt_unavailable_reason()

    def _check_device(self) -> None:
        """TensorRT and its GPU are checked by :func:`~cellseg_deploy.backends.tensorrt.build.require_tensorrt`."""
        from cellseg_deploy.backends.tensorrt.build import cuda_index, require_tensorrt

        require_tensorrt()
        cuda_index(self.device)

    def _make_pipeline(self) -> StagedPipeline:
        from cellseg_deploy.backends.tensorrt.build import (
            build_engines,
            cuda_index,
            current_environment,
            engine_mismatch,
            load_engine_set,
            resolve_engine_manifest,
        )
        from cellseg_deploy.backends.tensorrt.executor import TrtExecutor

        device = f"cuda:{cuda_index(self.device)}"
        rebuild = _flag(self.options.get("rebuild", False))
        manifest_path = resolve_engine_manifest(self.model_path, self.precision)
        env = current_environment(device)
        reason: str | None
        if manifest_path.is_file():
            engines = load_engine_set(manifest_path)
            folder = load_stage_folder(engines.stage_dir)
            current = {s: folder.graph_sha256(s, engines.manifest["graph_precision"]) for s in STAGES}
            reason = engine_mismatch(engines.manifest, env, current)
            if reason is None and engines.precision != self.precision:
                reason = f"{manifest_path} holds {engines.precision} engines, {self.precision} asked for; {_BUILD_HINT}"
        else:
            reason = f"no {self.precision} engines at {manifest_path.parent}; {_BUILD_HINT}"
        if reason is not None:
            if not rebuild:
                raise ModelFileError(reason)
            stage_dir = (
                load_engine_set(manifest_path).stage_dir if manifest_path.is_file() else self.model_path
            )
            build_engines(
                stage_dir,
                manifest_path.parent,
                fp16=self.precision == "fp16",
                workspace_gib=float(self.options.get("workspace_gib", 4)),
            )
        engines = load_engine_set(manifest_path)
        engines.verify_files()
        folder = load_stage_folder(engines.stage_dir)
        executor = TrtExecutor(
            engines.engine_paths(), device=device, cuda_graphs=_flag(self.options.get("cuda_graphs", False))
        )
        return StagedPipeline(folder, executor, profile=engines.profile)


_BUILD_HINT = "build them with 'cellseg-deploy export --format trt' (or runner option rebuild=true)"
