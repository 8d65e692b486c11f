"""The stage export: a checkpoint -> ``backbone_rpn``, ``box_head`` and ``mask_head`` ONNX graphs (fp32, and fp16
with float32 casts at the boundary) in one folder with ``manifest.json``.

The stage split itself (stage modules, BatchNorm folding, geometry, the profile, the folder format) is in
:mod:`~cellseg_deploy.backends.staged.stages`; this module traces it, writes the manifest, and checks that no
fp16 stage output is inf or NaN on the profile's largest image (:func:`check_stages_finite`, which runs the
stage modules with FP16 storage through the staged runner's own pipeline).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cellseg_deploy.backends.staged.executors import StageExecutor, TorchExecutor
from cellseg_deploy.backends.staged.runner import StagedPipeline, torch_stage_executor
from cellseg_deploy.backends.staged.stages import (
    BOUNDARY_DTYPE,
    MANIFEST_NAME,
    STAGE_PRECISIONS,
    STAGED_FORMAT,
    STAGES,
    StageGeometry,
    StageProfile,
    build_stage_modules,
    fp16_storage_stage_modules,
    load_stage_folder,
    stage_file,
    synthetic_input,
)
from cellseg_deploy.errors import CheckFailed
from cellseg_deploy.io_utils import atomic_path, atomic_write_json, sha256_file

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------
@dataclass
class StagedExportResult:
    """What :func:`export_staged` wrote.

    Attributes:
        out_dir: the stage folder.
        manifest: path of ``manifest.json``.
        graphs: ``{precision: {stage: path}}``.
        profile: the profile the graphs were declared for.
        finite_check: ``{precision: {"image": [H, W], "finite": bool, "max_abs": {stage: float}}}``.
        seconds: wall time of the whole export.
    """

    out_dir: Path
    manifest: Path
    graphs: dict[str, dict[str, Path]]
    profile: StageProfile
    finite_check: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (for ``--json``)."""
        return {
            "out_dir": str(self.out_dir),
            "manifest": str(self.manifest),
            "graphs": {p: {s: str(path) for s, path in g.items()} for p, g in self.graphs.items()},
            "profile": self.profile.to_dict(),
            "finite_check": self.finite_check,
            "seconds": round(self.seconds, 3),
        }


def _trace_inputs(stage: str, geometry: StageGeometry, profile: StageProfile) -> torch.Tensor:
    """A small example input (the graphs are dynamic; a small trace keeps FP16 tracing on the CPU fast)."""
    if stage == "backbone_rpn":
        h = min(max(128, profile.height[0]), profile.height[2])
        w = min(max(160, profile.width[0]), profile.width[2])
        return torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    size = geometry.roi_size(stage)
    return torch.randn(3, geometry.channels, size, size, generator=torch.Generator().manual_seed(0))


def _export_graph(
    module: nn.Module,
    example: torch.Tensor,
    dest: Path,
    stage: str,
    geometry: StageGeometry,
    opset: int,
    metadata: dict[str, Any],
) -> None:
    """Trace ``module`` to ``dest`` (atomically) with dynamic axes, provenance in ``metadata_props``, checked
    by ``onnx.checker``."""
    import onnx

    from cellseg_deploy.backends.metadata import set_onnx_metadata

    inputs, outputs = geometry.io(stage)
    dynamic: dict[str, dict[int, str]] = {}
    for spec in (*inputs, *outputs):
        dynamic[spec["name"]] = {i: d for i, d in enumerate(spec["shape"]) if isinstance(d, str)}
    with atomic_path(dest) as tmp, warnings.catch_warnings(), torch.no_grad():
        # The TorchScript-based exporter is the one that handles these modules (facts.md); its deprecation
        # and tracer warnings are expected here and only here.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            module,
            (example,),
            str(tmp),
            dynamo=False,
            opset_version=opset,
            input_names=[s["name"] for s in inputs],
            output_names=[s["name"] for s in outputs],
            dynamic_axes=dynamic,
            do_constant_folding=True,
        )
        proto = onnx.load(str(tmp))
        set_onnx_metadata(proto, {**metadata, "inputs": inputs, "outputs": outputs})
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))


EXPORTER = "torch.onnx.export(dynamo=False), one graph per stage"


def export_staged(
    checkpoint: Path,
    out_dir: Path,
    *,
    fp16: bool = True,
    opset: int = 17,
    profile: StageProfile | None = None,
    check_finite: bool = True,
) -> StagedExportResult:
    """Export a checkpoint's backbone+RPN head, box head and mask head as ONNX graphs into ``out_dir``.

    Writes ``backbone_rpn.onnx``, ``box_head.onnx``, ``mask_head.onnx`` (FP32), with ``fp16`` also
    ``*.fp16.onnx`` (FP16 inside, float32 at the boundary), and ``manifest.json``; every file atomically.
    See the module docstring for the tensors.

    Args:
        checkpoint: a cellseg-deploy checkpoint (``.pt``).
        out_dir: the stage folder (created; existing stage files are replaced).
        fp16: also export the FP16 graphs.
        opset: ONNX opset.
        profile: the shape ranges to record for engines; default :meth:`StageProfile.for_model`.
        check_finite: run the FP16 stages (:func:`fp16_storage_stage_modules`: FP16 tensors between layers)
            on a synthetic image of the profile's largest size and fail if any stage output is inf or NaN.

    Raises:
        CheckpointError: unreadable checkpoint.
        CheckFailed: a stage output was inf or NaN on the largest profile image.
    """
    from tqdm import tqdm

    from cellseg_deploy.backends.metadata import provenance
    from cellseg_deploy.modeling.checkpoint import load_checkpoint

    start = time.perf_counter()
    checkpoint = Path(checkpoint)
    out_dir = Path(out_dir)
    ckpt = load_checkpoint(checkpoint)
    model = ckpt.build_model()
    profile = profile or StageProfile.for_model(ckpt.model_config)
    geometry = StageGeometry.of(model)
    precisions = ("fp32", "fp16") if fp16 else ("fp32",)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = provenance(
        ckpt, sha256_file(checkpoint), exporter=EXPORTER, opset=opset, mask_size=geometry.mask_size
    )

    graphs: dict[str, dict[str, Path]] = {p: {} for p in precisions}
    jobs = [(p, s) for p in precisions for s in STAGES]
    modules = {p: build_stage_modules(model, p) for p in precisions}
    for precision, stage in tqdm(jobs, desc="export stages", unit="graph", disable=None):
        dest = out_dir / stage_file(stage, precision)
        meta = {**source, "stage": stage, "precision": precision, "boundary_dtype": BOUNDARY_DTYPE}
        _export_graph(
            modules[precision][stage],
            _trace_inputs(stage, geometry, profile),
            dest,
            stage,
            geometry,
            opset,
            meta,
        )
        graphs[precision][stage] = dest
        log.info("wrote %s", dest)

    manifest = stage_manifest(
        graphs=graphs,
        out_dir=out_dir,
        checkpoint=checkpoint,
        geometry=geometry,
        profile=profile,
        provenance=source,
    )
    manifest_path = atomic_write_json(out_dir / MANIFEST_NAME, manifest)

    finite: dict[str, Any] = {}
    if check_finite:
        names = {s: [o["name"] for o in geometry.io(s)[1]] for s in STAGES}
        for precision in [p for p in precisions if p != "fp32"]:  # FP32 has 1e34 times FP16's range
            # FP16 storage around FP32 arithmetic, in PyTorch (ONNX Runtime's CPU provider would keep the FP16
            # graph's convolutions in FP32 and hide an overflow; native FP16 modules are slow on most CPUs).
            executor = TorchExecutor(fp16_storage_stage_modules(model), names)
            report = check_stages_finite(out_dir, precision, executor=executor)
            finite[precision] = report
            if not report["finite"]:
                bad = [s for s, ok in report["stage_finite"].items() if not ok]
                raise CheckFailed(
                    f"{precision} stage graph(s) {bad} produced inf/NaN on a {report['image']} image "
                    f"(the profile's largest); use the fp32 graphs or retrain with smaller activations"
                )
        manifest["finite_check"] = finite
        atomic_write_json(manifest_path, manifest)
    return StagedExportResult(
        out_dir=out_dir,
        manifest=manifest_path,
        graphs=graphs,
        profile=profile,
        finite_check=finite,
        seconds=time.perf_counter() - start,
    )


def stage_manifest(
    *,
    graphs: dict[str, dict[str, Path]],
    out_dir: Path,
    checkpoint: Path,
    geometry: StageGeometry,
    profile: StageProfile,
    provenance: dict[str, Any],
) -> dict[str, Any]:
    """The ``manifest.json`` dict of a stage folder (pure apart from hashing the files it names).

    ``provenance``: :func:`cellseg_deploy.backends.metadata.provenance` of the source checkpoint (also stored in
    every graph's ``metadata_props``); its model config, versions and opset are copied to the top level.
    """
    stages: dict[str, Any] = {}
    for stage in STAGES:
        inputs, outputs = geometry.io(stage)
        files = {}
        for precision, by_stage in graphs.items():
            path = by_stage[stage]
            files[precision] = {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size}
        stages[stage] = {"graphs": files, "inputs": inputs, "outputs": outputs}
    return {
        "format": STAGED_FORMAT,
        "created": provenance["exported_at"],
        "precisions": sorted(graphs, key=STAGE_PRECISIONS.index),
        "boundary_dtype": BOUNDARY_DTYPE,
        "fp16_conversion": (
            "module.half() traced with float32 Casts at the boundary; BatchNorm folded into convolutions in "
            "float64 before the cast"
        ),
        "host_fp32": "preprocess, anchors, box decoding, proposal and per-class NMS, RoIAlign, mask sigmoid",
        "opset": provenance.get("opset"),
        "stages": stages,
        "geometry": geometry.to_dict(),
        "profile": profile.to_dict(),
        "checkpoint": {"path": str(checkpoint.resolve()), "sha256": provenance["source_sha256"]},
        "model_config": provenance["model_config"],
        "versions": provenance["versions"],
        "provenance": provenance,
    }


def check_stages_finite(
    stage_dir: Path, precision: str, *, executor: StageExecutor | None = None, seed: int = 0
) -> dict[str, Any]:
    """Run a stage folder's stages on a synthetic image of the profile's largest size and report whether every
    stage output is finite.

    ``executor``: what runs the stages; default the source checkpoint's stage modules on the CPU, for ``fp16``
    with FP16 storage (:func:`fp16_storage_stage_modules`), so an overflow shows as inf (ONNX Runtime's CPU
    provider would compute FP16 convolutions in FP32 and hide it).

    The input is :func:`~cellseg_deploy.backends.staged.stages.synthetic_input` (noise, saturated blocks, bright
    discs), normalised, ``[1, 3, H_max, W_max]``; the box head sees this image's proposals, the mask head its
    detections and also (so it always runs at its largest RoI count) the top proposals.

    Returns:
        ``{"image": [H, W], "finite": bool, "stage_finite": {stage: bool}, "max_abs": {stage: float}}``.
    """

    folder = load_stage_folder(stage_dir)
    executor = executor or torch_stage_executor(folder, precision, fp16_math="storage")
    pipeline = StagedPipeline(folder, executor)
    h, w = pipeline.profile.image_max
    image = synthetic_input(h, w, seed=seed)[0]
    batch = pipeline.host.transform.normalize(image)[None]
    record: dict[str, Mapping[str, torch.Tensor]] = {}
    pipeline.forward(batch, [(h, w)], record=record)
    # The mask head sees only the detections above the score threshold (maybe none on this image): also run
    # it on as many of the top proposals as one call takes.
    top = [p[: pipeline.profile.max_rois("mask_head")] for p in record["_proposals"]]
    with torch.inference_mode():
        feats = pipeline.host.roi_heads.mask_roi_pool(record["_features"], top, [(h, w)])
        extra = pipeline.executor.run("mask_head", {"mask_features": feats}) if len(feats) else {}
    record["mask_head"] = {**record.get("mask_head", {}), **{f"{k}@proposals": v for k, v in extra.items()}}
    stage_finite = {
        s: all(bool(torch.isfinite(t).all()) for t in record[s].values()) if s in record else True
        for s in STAGES
    }
    max_abs = {
        s: max((float(t.abs().max()) for t in record[s].values() if t.numel()), default=0.0)
        if s in record
        else 0.0
        for s in STAGES
    }
    pipeline.close()
    return {
        "image": [h, w],
        "finite": all(stage_finite.values()),
        "stage_finite": stage_finite,
        "max_abs": max_abs,
    }
