"""The dataset loop of parity: both runners on each image of a split, then :func:`compare_runs`."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cellseg_deploy.data.layout import DEFAULT_VAL_FRACTION
from cellseg_deploy.errors import UserError, naming_model_output
from cellseg_deploy.evaluation.parity.compare import compare_runs
from cellseg_deploy.evaluation.parity.report import ParityReport
from cellseg_deploy.evaluation.parity.tolerances import (
    DEFAULT_MIN_INSTANCES,
    DEFAULT_SCORE_THRESH,
    ToleranceProfile,
    get_profile,
)
from cellseg_deploy.matching import DEFAULT_MIN_IOU
from cellseg_deploy.structures import Instances

if TYPE_CHECKING:
    from cellseg_deploy.backends.base import Runner


def run_parity(
    reference_model: str | Path,
    candidate_model: str | Path,
    candidate_engine: str,
    data_root: str | Path,
    *,
    images: int | None = None,
    split: str = "val",
    profile: str | ToleranceProfile = "fp32",
    tolerances: dict[str, Any] | None = None,
    reference_engine: str = "torch",
    score_thresh: float = DEFAULT_SCORE_THRESH,
    min_iou: float = DEFAULT_MIN_IOU,
    device: str = "cpu",
    candidate_device: str | None = None,
    candidate_precision: str | None = None,
    threads: int | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
    progress: bool = True,
    min_instances: int = DEFAULT_MIN_INSTANCES,
    max_pixels: int | None = None,
    pipeline: Any = None,
) -> ParityReport:
    """Run the reference and the candidate on a dataset split and compare their instances.

    Each image is compared alone: one that cannot be read or that a runner cannot take is skipped, named in
    ``settings["skipped_images"]`` and in a failure line (the verdict covers the others), and left out of
    the ground truth; an invalid model output stops the run (the model is broken, not the image).

    Args:
        reference_model: the reference's model file (a checkpoint for the default ``torch`` runner).
        candidate_model: the candidate's model file (``.onnx``, stage folder, engine manifest, ...).
        candidate_engine: the candidate's runner name (``onnx``, ...).
        data_root: dataset root in the real layout.
        images: compare only the first ``images`` images of the split (``None``: all).
        split: ``val`` (default), ``train``, ``all`` or ``test`` (see :mod:`cellseg_deploy.evaluation.predict`).
        profile: tolerance profile name (:data:`PROFILES`) or a :class:`ToleranceProfile`.
        tolerances: overrides of the profile's limits (``{"max_box_diff": 2.0}``).
        reference_engine: the reference's runner (default ``torch``, fp32).
        score_thresh: instances scoring at least this must agree.
        min_iou: mask IoU a same-class pair needs to match.
        device: device of the reference (and of the candidate unless ``candidate_device``).
        candidate_precision: the candidate runner's precision (default: the profile's name when the runner
            supports it, else ``fp32``).
        threads: intra-op threads for both runners.
        val_fraction, seed: the train/val split (as in training).
        progress: show a progress bar.
        min_instances: the evidence a verdict needs (:func:`evidence_failure`).
        max_pixels: refuse (skip) images with more pixels than this, from their header (``None``: the
            default limit of :func:`~cellseg_deploy.data.io.read_image`).
        pipeline: the loop over images, a :class:`~cellseg_deploy.evaluation.pipeline.PipelineSettings`
            (``None``: sequential); both runners run on each image, one after the other, and the
            comparison is the same either way (``reference_s``/``candidate_s`` then overlap the host work).

    Returns:
        The :class:`ParityReport`; ``report.passed`` is the verdict (raising is the caller's choice).

    Raises:
        DataError / ModelFileError / CheckpointError / BackendUnavailable: unusable inputs.
    """
    from cellseg_deploy.backends.registry import get_runner_class
    from cellseg_deploy.data.coco import dataset_to_coco, require_images
    from cellseg_deploy.data.io import DEFAULT_MAX_PIXELS, read_image
    from cellseg_deploy.evaluation.distributed import folder_progress
    from cellseg_deploy.evaluation.pipeline import SEQUENTIAL, run_pipeline
    from cellseg_deploy.evaluation.predict import ImageFailures, finish_image, image_path_of, infer_images
    from cellseg_deploy.postprocess import PostprocessConfig

    t_start = time.perf_counter()
    tol = profile if isinstance(profile, ToleranceProfile) else get_profile(profile)
    tol = tol.with_overrides(tolerances or {})
    if images is not None and images < 1:
        raise UserError(f"--limit (images to compare) must be at least 1, got {images}")
    cand_cls = get_runner_class(candidate_engine)
    if candidate_precision is None:
        base = tol.name.split("+")[0]
        candidate_precision = base if base in cand_cls.precisions else "fp32"

    data_root = Path(data_root)
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    gt = dataset_to_coco(data_root, split, val_fraction=val_fraction, seed=seed, max_pixels=limit)
    require_images(gt, data_root, split, val_fraction)
    entries = sorted(gt["images"], key=lambda e: int(e["id"]))[:images]
    gt = _only_images(gt, {int(e["id"]) for e in entries})

    post = PostprocessConfig(score_thresh=0.0, max_dets=None)  # everything: matching sees the full lists
    ref_out: dict[int, Instances] = {}
    cand_out: dict[int, Instances] = {}
    names: dict[int, str] = {}
    timings = {"reference_s": 0.0, "candidate_s": 0.0}
    with runner_pair(
        reference_engine,
        reference_model,
        candidate_engine,
        candidate_model,
        device=device,
        candidate_device=candidate_device,
        candidate_precision=candidate_precision,
        threads=threads,
    ) as (ref_runner, cand_runner):
        lock = threading.Lock()  # timings are summed from the pipeline's threads

        def decode(item: tuple[dict[str, Any], Path]) -> np.ndarray:
            return read_image(item[1], max_pixels=limit)

        def infer(_handle: Any, batch: Sequence[np.ndarray]) -> list[tuple[Any, Any]]:
            out = []
            for image in batch:
                t0 = time.perf_counter()
                ref_det = infer_images(ref_runner, [image])[0]
                t1 = time.perf_counter()
                cand_det = infer_images(cand_runner, [image])[0]
                with lock:
                    timings["reference_s"] += t1 - t0
                    timings["candidate_s"] += time.perf_counter() - t1
                out.append((ref_det, cand_det))
            return out

        def finish(
            item: tuple[dict[str, Any], Path], image: np.ndarray, dets: Any
        ) -> tuple[Instances, Instances]:
            t0 = time.perf_counter()
            with naming_model_output(model=reference_model, image=item[1]):
                ref = finish_image(dets[0], image.shape[:2], post)
            t1 = time.perf_counter()
            with naming_model_output(model=candidate_model, image=item[1]):
                cand = finish_image(dets[1], image.shape[:2], post)
            with lock:
                timings["reference_s"] += t1 - t0
                timings["candidate_s"] += time.perf_counter() - t1
            return ref, cand

        failures = ImageFailures()
        items = ((entry, image_path_of(entry, data_root)) for entry in entries)
        loop = run_pipeline(items, decode, infer, finish, pipeline or SEQUENTIAL, [ref_runner])
        with folder_progress(len(entries), progress, "parity", None) as tick:
            for (entry, path), outcome in loop:
                tick()
                pair = failures.run(path, outcome.get)
                if pair is None:
                    continue
                image_id = int(entry["id"])
                ref_out[image_id], cand_out[image_id] = pair
                names[image_id] = _short_name(entry, path)
        ref_info, cand_info = ref_runner.info(), cand_runner.info()
    if failures:
        gt = _only_images(gt, set(ref_out))  # a skipped image's cells are not missed cells

    report = compare_runs(
        ref_out,
        cand_out,
        profile=tol,
        score_thresh=score_thresh,
        min_iou=min_iou,
        gt=gt,
        names=names,
        min_instances=min_instances,
    )
    report.reference = ref_info
    report.candidate = cand_info
    if failures:
        report.failures.append(
            failures.error(
                len(entries), f"the comparison covers the other {len(entries) - len(failures)}"
            ).args[0]
        )
    report.settings.update(
        {
            "data_root": str(data_root),
            "split": split,
            "images": len(entries),
            "skipped_images": [{"image": n, "reason": r} for n, r in failures.items],
            "val_fraction": val_fraction,
            "seed": seed,
            **{k: round(v, 3) for k, v in timings.items()},
        }
    )
    report.seconds = time.perf_counter() - t_start
    return report


@contextlib.contextmanager
def runner_pair(
    reference_engine: str,
    reference_model: str | Path,
    candidate_engine: str,
    candidate_model: str | Path,
    *,
    device: str = "cpu",
    candidate_device: str | None = None,
    candidate_precision: str = "fp32",
    threads: int | None = None,
) -> Iterator[tuple[Runner, Runner]]:
    """The loaded reference and candidate runners of a parity run (the reference at its default precision,
    the candidate on ``candidate_device`` or ``device``), closed together."""
    from cellseg_deploy.backends.registry import create_runner

    with (
        create_runner(reference_engine, reference_model, device=device, threads=threads) as ref_runner,
        create_runner(
            candidate_engine,
            candidate_model,
            device=candidate_device or device,
            precision=candidate_precision,
            threads=threads,
        ) as cand_runner,
    ):
        yield ref_runner, cand_runner


def _short_name(entry: dict[str, Any], path: Path) -> str:
    for key in ("sample_id", "sample"):
        if entry.get(key):
            return str(entry[key])[:12]
    stem = path.parent.name if path.name == "image.tif" else path.stem
    return stem[:12]


def _only_images(gt: dict[str, Any], keep: set[int]) -> dict[str, Any]:
    """``gt`` cut to the images ``keep`` (their entries and annotations)."""
    return {
        **gt,
        "images": [e for e in gt["images"] if int(e["id"]) in keep],
        "annotations": [a for a in gt.get("annotations", []) if int(a["image_id"]) in keep],
    }
