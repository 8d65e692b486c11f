"""Running a runner over a dataset split or a folder of images: evaluation and competition predictions.

- :func:`run_dataset`: a split of the real layout (``val``/``train``/``all`` from ``train/``, ``test`` from
  ``test_release/`` with ``test_ground_truth.json``) -> COCO ground truth and ``{image_id: Instances}``.
- :func:`evaluate_model`: a model file + runner name -> :class:`~cellseg_deploy.evaluation.coco_eval.EvalResult`
  (what ``cellseg-deploy eval`` prints), including the notes about detection caps.
- :func:`predict_folder`: a folder of images -> ``test-results.json`` and the submission zip, optional
  overlays; unreadable images are skipped and named in the summary (or stop the run with ``strict``).
- :func:`predict_image` and :class:`ImageFailures`: one image at a time, for every loop over images
  (``predict``, ``eval``, ``parity``): an image of extreme aspect ratio is padded so that the model can
  take it, and an image that still cannot be read or run is recorded and skipped, never the end of the run.

Every runner goes through :meth:`Runner.predict`, i.e. the one shared post-processing
(:func:`cellseg_deploy.postprocess.postprocess`), so two runners differ here only by their models. Masks
stay RLEs from the post-processing to the metric: one image is in memory at a time, and no
``N x H x W`` array is built, so 2500 x 1900 images with hundreds of cells go through in bounded memory.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from cellseg_deploy.backends.base import Runner
from cellseg_deploy.data.io import DEFAULT_MAX_PIXELS
from cellseg_deploy.data.layout import DEFAULT_VAL_FRACTION, SPLITS
from cellseg_deploy.data.layout import TEST_MAP_NAME as ID_MAP_NAME
from cellseg_deploy.errors import CheckFailed, DataError, UserError, naming_model_output
from cellseg_deploy.evaluation.coco_eval import (
    DEFAULT_MAX_DETS,
    IOU_TYPES,
    EvalResult,
    evaluate,
    instances_to_results,
    predictions_to_results,
)
from cellseg_deploy.evaluation.distributed import folder_progress, gather_to_main, my_share, result_from_main
from cellseg_deploy.evaluation.pipeline import (
    SEQUENTIAL,
    Outcome,
    PipelineSettings,
    check_batching,
    inference_handles,
    run_pipeline,
)
from cellseg_deploy.evaluation.submission import RESULTS_MEMBER, write_results_json, write_submission
from cellseg_deploy.io_utils import OutputError, rescue_path
from cellseg_deploy.postprocess import PostprocessConfig, postprocess
from cellseg_deploy.structures import Detections, Instances

if TYPE_CHECKING:
    from cellseg_deploy.distributed import DistInfo

EVAL_POSTPROCESS = PostprocessConfig(score_thresh=0.0, mask_thresh=0.5, max_dets=None)
"""Post-processing for evaluation: keep every detection the model returns (the cap is COCOeval's)."""

T = TypeVar("T")

_log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# Images one at a time
# ----------------------------------------------------------------------------------------------------------
MAX_ASPECT = 8.0
"""Images whose longer side exceeds this many times the shorter one are padded before the model sees them.

The models resize an image so that its shorter side reaches ``min_size`` unless the longer side would pass
``max_size``; a 1 x 600 image would then be resized to 0 x 512 pixels, which neither PyTorch nor ONNX Runtime
can do. Padding (bottom or right, with the image's median colour) to at most this aspect ratio keeps every
resized side at ``max_size / MAX_ASPECT`` pixels or more. No image of ordinary proportions is touched.
"""


def pad_to_aspect(image: np.ndarray, max_aspect: float = MAX_ASPECT) -> np.ndarray:
    """``image`` (RGB uint8 ``[H, W, 3]``) padded at the bottom or right so that ``max(H, W) / min(H, W)``
    is at most ``max_aspect``; the image itself (not a copy) when it already is.

    The padding has the image's per-channel median colour (its background, for microscopy), and the
    original pixels keep their coordinates, so detections need no shift, only a crop (:func:`predict_image`).
    """
    height, width = image.shape[:2]
    short_min = int(np.ceil(max(height, width) / max_aspect))
    if min(height, width) >= short_min:
        return image
    new_h, new_w = (short_min, width) if height < width else (height, short_min)
    fill = np.median(image.reshape(-1, image.shape[2]), axis=0).astype(np.uint8)
    padded = np.empty((new_h, new_w, image.shape[2]), np.uint8)
    padded[:] = fill
    padded[:height, :width] = image
    return padded


def predict_image(runner: Runner, image: np.ndarray, post: PostprocessConfig | None = None) -> Instances:
    """:meth:`Runner.predict` for any image the runner can be given, extreme aspect ratios included.

    :func:`infer_images` then :func:`finish_image`: an image of ordinary proportions goes to the runner as
    it is; one that is not (:func:`pad_to_aspect`) is padded, predicted, and its instances cropped back to
    the original ``(H, W)``: boxes clipped, masks cut to the image, instances that lie wholly in the padding
    dropped. The pipelined loop (:mod:`cellseg_deploy.evaluation.pipeline`) calls the same two halves.

    Args:
        runner: a loaded runner.
        image: RGB uint8 ``[H, W, 3]`` at its original size.
        post: post-processing settings (default: :class:`PostprocessConfig`).

    Returns:
        :class:`Instances` of size ``(H, W)``.
    """
    return finish_image(infer_images(runner, [image])[0], image.shape[:2], post)


def infer_images(runner: Runner, images: Sequence[np.ndarray]) -> list[Detections]:
    """Raw detections of RGB uint8 ``[H, W, 3]`` images, each padded first where :func:`pad_to_aspect`
    asks (the detections are then those of the padded image); one runner call (``infer_batch`` for more
    than one image)."""
    padded = [pad_to_aspect(image) for image in images]
    if len(padded) == 1:
        return [runner.infer(padded[0])]
    return runner.infer_batch(padded)


def finish_image(det: Detections, size: tuple[int, ...], post: PostprocessConfig | None = None) -> Instances:
    """The shared post-processing of one image's detections, cropped back to its original ``size`` ``(H, W)``
    when the runner saw a padded image (``det.image_size`` larger than ``size``)."""
    from cellseg_deploy.data.rle import decode_rle, encode_mask

    height, width = int(size[0]), int(size[1])
    inst = postprocess(det, post)
    if tuple(det.image_size) == (height, width):
        return inst
    rles: list[dict[str, Any]] = []
    keep: list[int] = []
    for i, rle in enumerate(inst.rles):
        mask = decode_rle(rle)[:height, :width]  # one mask of the padded image at a time
        if mask.any():
            keep.append(i)
            rles.append(encode_mask(mask))
    kept = inst.select(np.asarray(keep, np.int64))
    boxes = kept.boxes.copy()
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, width)
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, height)
    return Instances(
        boxes=boxes,
        labels=kept.labels,
        scores=kept.scores,
        rles=rles,
        image_size=(height, width),
        mask_probs=kept.mask_probs,
    )


@dataclass
class ImageFailures:
    """The images a loop skipped, each with the reason, so that one bad image never ends a folder.

    Use :meth:`run` around everything done for one image (read, predict, write)::

        failures = ImageFailures()
        for path in paths:
            inst = failures.run(path, lambda: predict_image(runner, read_image(path)))
            if inst is None:
                continue  # skipped; named at the end
        if failures:
            raise failures.error(len(paths), "the others are in report.json")

    An unreadable image (:class:`DataError`, ``OSError``), one the runner refuses (:class:`UserError`, e.g.
    a size a static export cannot take) and one the model cannot run (any other exception of the runner,
    ``MemoryError`` included) are recorded; an invalid model output
    (:class:`~cellseg_deploy.errors.InvalidModelOutput`: the model file is broken, not the image) and
    interruptions are not caught. With ``strict``, the first failure stops the loop as :class:`DataError`.

    Attributes:
        items: ``(file name, reason)`` in the order met.
        strict: stop at the first failure instead.
    """

    items: list[tuple[str, str]] = field(default_factory=list)
    strict: bool = False

    def __bool__(self) -> bool:
        return bool(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def run(self, image: str | Path, fn: Any) -> Any:
        """``fn()``, or ``None`` when it failed for this image (recorded under ``image``'s file name)."""
        try:
            return fn()
        except CheckFailed:
            raise  # a broken model (InvalidModelOutput) stops the run: every image would fail the same way
        except (UserError, OSError) as exc:  # unreadable, too large, or a size the model refuses
            reason = str(exc).replace(f"{image}: ", "")
            if isinstance(exc, OSError) and exc.strerror:
                reason = f"cannot read file ({exc.strerror})"
            self._record(image, reason, exc)
        except Exception as exc:  # the model could not take this image (torch, ONNX Runtime, OpenVINO errors)
            first = (str(exc).strip().splitlines() or [""])[0][:160]
            self._record(
                image, f"the model could not process this image ({type(exc).__name__}: {first})", exc
            )
        return None

    def _record(self, image: str | Path, reason: str, exc: BaseException) -> None:
        if self.strict:
            raise DataError(f"{image}: {reason} (stopped by --strict)") from exc
        _log.debug("skipped %s: %s", image, reason, exc_info=exc)
        self.items.append((Path(image).name, reason))

    def names(self, most: int = 5) -> str:
        """The first ``most`` file names, comma-separated (``...`` when there are more)."""
        names = ", ".join(n for n, _ in self.items[:most])
        return names + (" ..." if len(self.items) > most else "")

    def error(self, total: int, rest: str) -> CheckFailed:
        """The exit-1 error of a loop that skipped images: how many, which, and where the others went."""
        return CheckFailed(
            f"{len(self.items)} of {total} image(s) failed and were skipped ({self.names()}); {rest}"
        )


# ----------------------------------------------------------------------------------------------------------
# Engines and model caps
# ----------------------------------------------------------------------------------------------------------
def infer_engine(model_path: str | Path) -> str:
    """The runner name for a model file, from the format registry
    (:func:`~cellseg_deploy.backends.registry.engine_for_path`): ``.pt``/``.pth`` -> ``torch``, ``.onnx`` ->
    ``onnx``, an OpenVINO ``.xml`` IR -> ``openvino``, a TensorRT engine manifest (``engines.json``, or a folder
    holding one and no stage manifest) -> ``trt``, any other folder or manifest (``.json``/``.yaml``) ->
    ``staged-onnx``. Anything else raises :class:`UserError`."""
    from cellseg_deploy.backends.registry import engine_for_path

    return engine_for_path(model_path)


def model_detection_cap(runner: Runner) -> int | None:
    """The model's own cap on detections per image (``detections_per_img``), when the runner exposes it.

    Looked up on ``runner.model_config`` (ONNX Runtime), ``runner.checkpoint.model_config`` (torch),
    ``runner.config`` / ``runner.pipeline.config`` (staged runners) and in ``runner.info()``
    (``"detections_per_img"`` or ``"model_config"``); ``None`` when unknown.
    """
    checkpoint = getattr(runner, "checkpoint", None)
    pipeline = getattr(runner, "pipeline", None)
    for config in (
        getattr(runner, "model_config", None),
        getattr(checkpoint, "model_config", None),
        getattr(runner, "config", None),
        getattr(pipeline, "config", None),
    ):
        cap = _cap_from(config)
        if cap is not None:
            return cap
    try:
        info = runner.info()
    except Exception:  # info() of a backend that is not loaded may fail; the cap is then unknown
        return None
    return _cap_from(info.get("detections_per_img")) or _cap_from(info.get("model_config"))


def _cap_from(obj: Any) -> int | None:
    if obj is None:
        return None
    if isinstance(obj, int) and not isinstance(obj, bool):
        return obj
    value = (
        obj.get("detections_per_img") if isinstance(obj, dict) else getattr(obj, "detections_per_img", None)
    )
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def cap_notes(
    engine: str, max_dets: int, model_cap: int | None, predictions: dict[int, Instances]
) -> list[str]:
    """Notes for the report about the two caps: the model's ``detections_per_img`` and COCOeval's ``max_dets``."""
    notes = []
    most = max((len(p) for p in predictions.values()), default=0)
    if model_cap is None:
        notes.append(
            f"the model's own cap on detections per image is unknown for runner {engine!r}; "
            f"most detections returned for one image: {most}"
        )
        return notes
    baked = "set in the checkpoint's model config" if engine == "torch" else "baked into the exported model"
    if max_dets > model_cap:
        notes.append(
            f"--max-dets {max_dets} is above the model's own cap: it returns at most {model_cap} detections per "
            f"image (model.detections_per_img, {baked}); train or export with a larger detections_per_img to "
            "score more"
        )
    hit = sum(1 for p in predictions.values() if len(p) >= model_cap)
    if hit:
        notes.append(
            f"{hit} of {len(predictions)} images returned the model's maximum of {model_cap} detections: "
            "the model's cap may cost recall on dense images"
        )
    return notes


# ----------------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------------
def run_dataset(
    runner: Runner,
    data_root: str | Path,
    split: str,
    *,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
    post: PostprocessConfig = EVAL_POSTPROCESS,
    progress: bool = True,
    failures: ImageFailures | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    pipeline: PipelineSettings = SEQUENTIAL,
    dist: DistInfo | None = None,
) -> tuple[dict[str, Any], dict[int, Instances]]:
    """Predict every image of a dataset split.

    Args:
        runner: any runner (loaded here if it is not yet; closing it is the caller's).
        data_root: the dataset root (``train/``, ``test_release/``, ``test_image_name_to_ids.json``,
            ``test_ground_truth.json``).
        split: one of :data:`SPLITS`.
        val_fraction, seed: the train/val split of ``train/`` (the same as training's).
        post: post-processing settings (the default keeps every detection; see :data:`EVAL_POSTPROCESS`).
        progress: show a tqdm progress bar (stderr).
        failures: where to record images that cannot be read or run; they are then skipped and left out of
            the returned ground truth too (so they do not count as missed cells). ``None``: the first such
            image raises.
        max_pixels: refuse images with more pixels than this (read from the header, before decoding).
        pipeline: the loop (:mod:`cellseg_deploy.evaluation.pipeline`; default: sequential); the same
            predictions either way.
        dist: a ``torchrun`` process group (:mod:`cellseg_deploy.evaluation.distributed`): this rank predicts
            its share; rank 0 returns every prediction, in the split's order, without ``mask_probs`` (they
            would travel for nothing), the other ranks none.

    Returns:
        ``(gt, predictions)``: the COCO ground-truth dict of the split and ``{image_id: Instances}`` with
        masks as RLEs at each image's original size.

    Raises:
        DataError: the layout is broken, the split is empty, or (without ``failures``) an image cannot be
            read, is larger than ``max_pixels`` or its size differs from the ground truth.
    """
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    from cellseg_deploy.data.coco import dataset_to_coco, require_images

    data_root = Path(data_root)
    gt = dataset_to_coco(data_root, split, val_fraction=val_fraction, seed=seed, max_pixels=max_pixels)
    require_images(gt, data_root, split, val_fraction)
    runner.load()
    guard = failures if failures is not None else ImageFailures(strict=True)
    images = [(image_path_of(entry, data_root), entry) for entry in gt["images"]]

    def decode(item: tuple[int, tuple[Path, dict[str, Any]]]) -> np.ndarray:
        return _read_entry(*item[1], max_pixels)

    def finish(
        item: tuple[int, tuple[Path, dict[str, Any]]], image: np.ndarray, det: Detections
    ) -> Instances:
        with naming_model_output(model=runner.model_path, image=item[1][0]):
            return finish_image(det, image.shape[:2], post)

    def share() -> tuple[list[tuple[int, Instances]], list[tuple[int, str, str]]]:
        shared = dist is not None and dist.enabled
        mine = my_share(images, dist) if dist is not None and shared else list(enumerate(images))
        local = ImageFailures(strict=guard.strict)
        done: list[tuple[int, Instances]] = []
        failed: list[tuple[int, str, str]] = []
        # --batch and --concurrency are refused before any progress bar
        loop = _run_loop(runner, mine, decode, finish, pipeline)
        with folder_progress(len(images), progress, f"eval {split}", dist) as tick:
            for (index, (path, _)), outcome in loop:
                before = len(local.items)
                inst = local.run(path, outcome.get)
                failed.extend((index, *f) for f in local.items[before:])
                if inst is not None:
                    # across ranks the mask head's probabilities (3 KiB per instance) stay behind: no score reads them
                    done.append((index, replace(inst, mask_probs=None) if shared else inst))
                tick()
        return done, failed

    if dist is not None and dist.enabled:
        shares = gather_to_main(dist, share)  # rank 0 alone holds every prediction from here on
        merged = _merge_shares(shares) if shares is not None else ([], [])
    else:
        merged = share()
    predictions: dict[int, Instances] = {}
    for index, inst in merged[0]:
        predictions[int(images[index][1]["id"])] = inst
    guard.items.extend((name, reason) for _, name, reason in merged[1])
    if failures:
        kept = set(predictions)
        gt = {
            **gt,
            "images": [e for e in gt["images"] if int(e["id"]) in kept],
            "annotations": [a for a in gt["annotations"] if int(a["image_id"]) in kept],
        }
    return gt, predictions


def _run_loop(
    runner: Runner,
    items: Sequence[T],
    decode: Any,
    finish: Any,
    pipeline: PipelineSettings,
) -> Iterator[tuple[T, Outcome[Any]]]:
    """:func:`~cellseg_deploy.evaluation.pipeline.run_pipeline` over ``items`` with ``runner``
    (:func:`infer_images` on each batch); results in the order of ``items``."""
    check_batching(runner, pipeline.batch)
    handles = inference_handles(runner, pipeline.concurrency)
    return run_pipeline(items, decode, infer_images, finish, pipeline, handles)


def _merge_shares(shares: list[tuple[list[Any], list[Any]]]) -> tuple[list[Any], list[Any]]:
    """Every rank's ``(done, failed)``, each ``(index, ...)``, merged in index order (the input order)."""
    done = sorted((d for s in shares for d in s[0]), key=lambda d: d[0])
    failed = sorted((f for s in shares for f in s[1]), key=lambda f: f[0])
    return done, failed


def _predict_entry(
    runner: Runner, path: Path, entry: dict[str, Any], post: PostprocessConfig, max_pixels: int | None
) -> Instances:
    """Read one ground-truth image, check its size against the annotations, predict it."""
    image = _read_entry(path, entry, max_pixels)
    with naming_model_output(model=runner.model_path, image=path):
        return predict_image(runner, image, post)


def _read_entry(path: Path, entry: dict[str, Any], max_pixels: int | None) -> np.ndarray:
    """Read one ground-truth image and check its size against the annotations."""
    from cellseg_deploy.data.io import read_image

    image = read_image(path, max_pixels=max_pixels)
    expected = (int(entry["height"]), int(entry["width"]))
    if tuple(image.shape[:2]) != expected:
        raise DataError(
            f"{path}: image is {image.shape[0]}x{image.shape[1]} but its ground truth says "
            f"{expected[0]}x{expected[1]}; the dataset and its annotations disagree"
        )
    return image


def image_path_of(entry: dict[str, Any], data_root: Path) -> Path:
    """The image file of a COCO ``images`` entry made by :func:`cellseg_deploy.data.coco.dataset_to_coco`."""
    for key in ("path", "file_path"):
        if entry.get(key):
            p = Path(entry[key])
            return p if p.is_absolute() else data_root / p
    sample = entry.get("sample_id") or entry.get("sample")
    if sample:
        return data_root / "train" / str(sample) / "image.tif"
    name = entry.get("file_name")
    if name:
        for candidate in (data_root / name, data_root / "test_release" / name):
            if candidate.exists():
                return candidate
    raise DataError(
        f"cannot locate the image file of ground-truth image {entry.get('id')!r} (its entry has no path, "
        f"sample_id or file_name that exists) under {data_root}"
    )


def evaluate_model(
    model_path: str | Path,
    engine: str | None,
    data_root: str | Path,
    split: str,
    *,
    max_dets: int = DEFAULT_MAX_DETS,
    score_thresh: float = 0.0,
    mask_thresh: float = 0.5,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
    device: str = "cpu",
    precision: str = "fp32",
    threads: int | None = None,
    iou_types: tuple[str, ...] = IOU_TYPES,
    progress: bool = True,
    failures: ImageFailures | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    pipeline: PipelineSettings = SEQUENTIAL,
    dist: DistInfo | None = None,
    overlays_dir: str | Path | None = None,
    overlay_score: float | None = None,
) -> EvalResult:
    """Evaluate a model file with any registered runner on a dataset split (what ``cellseg-deploy eval`` runs).

    Args:
        model_path: checkpoint (``.pt``), ONNX file, stage folder or engine manifest.
        engine: runner name; ``None`` infers it from the file (:func:`infer_engine`).
        data_root, split, val_fraction, seed: see :func:`run_dataset`.
        max_dets: COCOeval's cap on detections per image and category.
        score_thresh: drop detections below this score before scoring (0 keeps all).
        mask_thresh: mask probability threshold of the post-processing.
        device, precision, threads: passed to the runner.
        iou_types: ``("segm", "bbox")`` or a subset.
        progress: show a progress bar.
        failures, max_pixels: see :func:`run_dataset`; skipped images are left out of the scores, and the
            result's notes and ``info["skipped_images"]`` name them.
        pipeline, dist: see :func:`run_dataset`; with ``dist`` rank 0 scores all the images and every rank
            returns its result (and its skipped images in ``failures``).
        overlays_dir: also write one TP / FP / FN overlay per scored image there
            (:func:`~cellseg_deploy.evaluation.overlays.write_eval_overlays`; rank 0 alone, after scoring).
        overlay_score: the overlays draw predictions scoring at least this (``None``: 0.5, the overlays'
            default); the scores are unaffected.

    Returns:
        The :class:`EvalResult`, with ``notes`` on the model's own cap and ``info`` naming the runner,
        data, split and thresholds.
    """
    from cellseg_deploy.backends.registry import create_runner

    post = PostprocessConfig(score_thresh=score_thresh, mask_thresh=mask_thresh, max_dets=None)
    engine = engine or infer_engine(model_path)
    t0 = time.perf_counter()
    options = pipeline.runner_options(engine)
    with create_runner(
        engine, model_path, device=device, precision=precision, threads=threads, options=options
    ) as runner:
        gt, predictions = run_dataset(
            runner,
            data_root,
            split,
            val_fraction=val_fraction,
            seed=seed,
            post=post,
            progress=progress,
            failures=failures,
            max_pixels=max_pixels,
            pipeline=pipeline,
            dist=dist,
        )
        model_cap = model_detection_cap(runner)
        runner_info = runner.info()

    def score() -> EvalResult:
        scored = _score(gt, predictions, engine, max_dets, iou_types, model_cap, failures, t0, split)
        if overlays_dir is not None:
            from cellseg_deploy.evaluation.overlays import DEFAULT_OVERLAY_SCORE, write_eval_overlays

            drawn = write_eval_overlays(
                gt,
                predictions,
                {int(e["id"]): image_path_of(e, Path(data_root)) for e in gt["images"]},
                overlays_dir,
                score_thresh=DEFAULT_OVERLAY_SCORE if overlay_score is None else overlay_score,
                max_pixels=max_pixels,
            )
            scored.info["overlays"] = {"dir": str(overlays_dir), "images": len(drawn)}
        return scored

    if dist is not None and dist.enabled:
        result, skipped = result_from_main(dist, lambda: (score(), failures.items if failures else []))
        if failures is not None and not dist.is_main:
            failures.items.extend(skipped)
    else:
        result = score()
    result.info.update(
        {
            "runner": runner_info,
            "data_root": str(data_root),
            "split": split,
            "val_fraction": val_fraction,
            "seed": seed,
            "score_thresh": score_thresh,
            "mask_thresh": mask_thresh,
            "pipeline": pipeline.to_dict(),
            "processes": dist.world_size if dist is not None else 1,
        }
    )
    return result


def _score(
    gt: dict[str, Any],
    predictions: dict[int, Instances],
    engine: str,
    max_dets: int,
    iou_types: tuple[str, ...],
    model_cap: int | None,
    failures: ImageFailures | None,
    t0: float,
    split: str,
) -> EvalResult:
    """COCO evaluation of ``predictions`` against ``gt`` with the notes on caps and skipped images."""
    if not predictions:
        raise CheckFailed(
            f"every image of split {split!r} failed ({failures.names() if failures else ''}); nothing to score"
        )
    seconds = time.perf_counter() - t0
    result = evaluate(gt, predictions_to_results(predictions), max_dets=max_dets, iou_types=iou_types)
    result.notes.extend(cap_notes(engine, max_dets, model_cap, predictions))
    if failures:
        result.notes.append(
            f"{len(failures)} image(s) could not be read or run and are left out of the scores: {failures.names()}"
        )
    first = iou_types[0]
    skipped = result.metrics[first]["num_detections"] - result.metrics[first]["num_detections_evaluated"]
    if skipped:
        result.notes.append(
            f"{skipped} detections beyond the cap of {max_dets} per image and category were not scored; "
            "raise --max-dets to include them"
        )
    result.info.update(
        {
            "model_detections_per_img": model_cap,
            "max_detections_in_one_image": max((len(p) for p in predictions.values()), default=0),
            "images_scored": len(predictions),
            "skipped_images": [{"file": f, "reason": r} for f, r in (failures.items if failures else [])],
            "seconds": round(seconds, 3),
        }
    )
    return result


# ----------------------------------------------------------------------------------------------------------
# Folders -> submission
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageEntry:
    """One image to predict: its file, its id in the results, its expected ``(H, W)`` (``None``: unknown)."""

    path: Path
    image_id: int
    size: tuple[int, int] | None = None


@dataclass
class PredictSummary:
    """What :func:`predict_folder` did.

    Attributes:
        out_zip: the submission zip; ``results_json``: ``test-results.json`` written beside it.
        id_source: where the image ids came from (the id map's path, or "sorted file names").
        num_images: images listed; ``num_predicted``: images that went through the model.
        num_detections: detections written.
        failed: ``(file name, reason)`` of every image skipped (unreadable, or not the size the map says).
        overlays_dir: where overlays went (``None``: not asked for).
        overlays_gt: the ground truth the overlays are coloured against (TP / FP / FN), ``None``: by class.
        seconds: wall time of the whole run.
        runner: ``runner.info()``.
    """

    out_zip: Path
    results_json: Path
    id_source: str
    num_images: int
    num_predicted: int
    num_detections: int
    failed: list[tuple[str, str]] = field(default_factory=list)
    overlays_dir: Path | None = None
    seconds: float = 0.0
    runner: dict[str, Any] = field(default_factory=dict)
    overlays_gt: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return {
            "out_zip": str(self.out_zip),
            "results_json": str(self.results_json),
            "id_source": self.id_source,
            "num_images": self.num_images,
            "num_predicted": self.num_predicted,
            "num_detections": self.num_detections,
            "failed": [{"file": f, "reason": r} for f, r in self.failed],
            "overlays_dir": str(self.overlays_dir) if self.overlays_dir else None,
            "overlays_gt": str(self.overlays_gt) if self.overlays_gt else None,
            "seconds": round(self.seconds, 3),
            "runner": self.runner,
        }

    def text(self) -> str:
        """A short human-readable summary (several lines)."""
        lines = [
            f"predicted {self.num_predicted} of {self.num_images} images, {self.num_detections} detections "
            f"in {self.seconds:.1f} s (ids from {self.id_source})",
            f"wrote {self.out_zip} ({RESULTS_MEMBER}) and {self.results_json}",
        ]
        if self.overlays_dir is not None:
            against = f" (TP/FP/FN against {self.overlays_gt})" if self.overlays_gt else ""
            lines.append(f"overlays in {self.overlays_dir}{against}")
        if self.failed:
            lines.append(f"{len(self.failed)} image(s) skipped:")
            lines.extend(f"  {name}: {reason}" for name, reason in self.failed)
        return "\n".join(lines)


def resolve_images(images_dir: str | Path, ids_map: str | Path | None = None) -> tuple[list[ImageEntry], str]:
    """The images of a folder and their result ids.

    With an id map (``ids_map``, or ``images_dir/../test_image_name_to_ids.json`` when that exists) every
    listed ``file_name`` must be in the folder and every image in the folder must be listed; ids and sizes
    come from the map. Without one, the folder's images (TIFF, PNG, JPEG: what
    :func:`cellseg_deploy.data.io.read_image` reads) get ids 1..N in sorted file-name order.

    Returns:
        ``(entries sorted by id, id source description)``.

    Raises:
        DataError: not a folder, no images, an unreadable or malformed map, or a map that does not match
            the folder (one line naming examples on both sides).
    """
    from cellseg_deploy.data.io import IMAGE_SUFFIXES
    from cellseg_deploy.data.layout import list_images

    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise DataError(
            f"{images_dir} is not a folder; expected test_release/ or a folder of TIFF/PNG/JPEG images"
        )
    files = list_images(images_dir)
    if ids_map is None:
        beside = images_dir.parent / ID_MAP_NAME
        if beside.is_file():
            ids_map = beside
    if ids_map is None:
        if not files:
            raise DataError(f"{images_dir} holds no images (expected {', '.join(IMAGE_SUFFIXES)} files)")
        entries = [ImageEntry(path=p, image_id=i) for i, p in enumerate(files, start=1)]
        return entries, f"sorted file names (ids 1..{len(entries)}; no {ID_MAP_NAME} found beside the folder)"

    ids_map = Path(ids_map)
    records = _read_id_map(ids_map)
    on_disk = {p.name for p in files}
    listed = {r["file_name"] for r in records}
    missing = sorted(listed - on_disk)
    extra = sorted(on_disk - listed)
    if missing or extra:
        parts = []
        if missing:
            parts.append(
                f"{len(missing)} listed image(s) are not in the folder (e.g. {', '.join(missing[:3])})"
            )
        if extra:
            parts.append(f"{len(extra)} image(s) in the folder are not listed (e.g. {', '.join(extra[:3])})")
        raise DataError(
            f"id map {ids_map} does not match {images_dir}: {'; '.join(parts)}; pass the id map made for this "
            "folder with --ids"
        )
    entries = [
        ImageEntry(path=images_dir / r["file_name"], image_id=r["id"], size=r.get("size"))
        for r in sorted(records, key=lambda r: r["id"])
    ]
    return entries, str(ids_map)


def _read_id_map(path: Path) -> list[dict[str, Any]]:
    """Parse ``[{"file_name", "id", "height", "width"}, ...]``; raise one-line :class:`DataError` otherwise."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read id map {path}: {exc}") from exc
    if not isinstance(data, list) or not data:
        raise DataError(f"id map {path}: expected a non-empty JSON list of {{file_name, id, height, width}}")
    records: list[dict[str, Any]] = []
    ids: set[int] = set()
    names: set[str] = set()
    for i, item in enumerate(data):
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("file_name"), str)
            or not _is_int(item.get("id"))
        ):
            raise DataError(
                f"id map {path}: entry {i} needs a str 'file_name' and an int 'id', got {str(item)[:80]}"
            )
        name, image_id = item["file_name"], int(item["id"])
        if image_id in ids or name in names:
            raise DataError(f"id map {path}: entry {i} repeats id {image_id} or file name {name!r}")
        ids.add(image_id)
        names.add(name)
        size = (
            (int(item["height"]), int(item["width"]))
            if _is_int(item.get("height")) and _is_int(item.get("width"))
            else None
        )
        records.append({"file_name": name, "id": image_id, "size": size})
    return records


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def predict_folder(
    runner: Runner,
    images_dir: str | Path,
    ids_map: str | Path | None,
    out_zip: str | Path,
    overlays_dir: str | Path | None = None,
    strict: bool = False,
    post: PostprocessConfig = EVAL_POSTPROCESS,
    progress: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    pipeline: PipelineSettings = SEQUENTIAL,
    dist: DistInfo | None = None,
    overlay_score: float | None = None,
) -> PredictSummary:
    """Predict every image of a folder and write the competition submission.

    Writes ``out_zip`` (``test-results.json`` inside) and ``test-results.json`` beside it, both atomically,
    and with ``overlays_dir`` one PNG per image (``<file stem>.png``, see
    :mod:`cellseg_deploy.evaluation.overlays`).

    Args:
        runner: any runner (loaded here if it is not yet; closing it is the caller's).
        images_dir: ``test_release/`` or any folder of TIFF/PNG/JPEG images (see :func:`resolve_images`).
        ids_map: the id map (``test_image_name_to_ids.json``); ``None`` looks beside the folder, then
            falls back to ids 1..N in sorted file-name order.
        out_zip: the submission zip to write.
        overlays_dir: folder for overlay PNGs, or ``None``. With ``test_ground_truth.json`` beside
            ``images_dir`` (:func:`~cellseg_deploy.evaluation.overlays.ground_truth_beside`) they are coloured
            TP / FP / FN against it, else by class.
        strict: stop at the first image that cannot be read or run (raise :class:`DataError`) instead of
            skipping it.
        post: post-processing settings (default: keep every detection the model returns).
        progress: show a tqdm progress bar (stderr).
        max_pixels: refuse images with more pixels than this (read from the header, before decoding);
            ``None``: no limit.
        pipeline: the loop (:mod:`cellseg_deploy.evaluation.pipeline`; default: sequential); the same bytes
            either way.
        dist: a ``torchrun`` process group (:mod:`cellseg_deploy.evaluation.distributed`): each rank
            predicts its share of the images (and writes their overlays), rank 0 writes the one submission,
            the same bytes as one process; every rank returns the whole run's summary. A rank that stops
            makes every rank raise, and no submission is written.
        overlay_score: overlays draw the detections scoring at least this (``None``:
            :data:`~cellseg_deploy.evaluation.overlays.DEFAULT_OVERLAY_SCORE`); the submission keeps all.

    Returns:
        :class:`PredictSummary`; skipped images are in ``failed`` (the submission is still written). Each
        image is handled alone (:class:`ImageFailures`, :func:`predict_image`): one that cannot be read, is
        above ``max_pixels`` or cannot be run by the model is skipped and named; the others are written.

    Raises:
        OutputError: the submission could not be written at the end; the message names the file in the
            system's temporary folder that holds the finished results instead.
    """
    from cellseg_deploy.data.io import read_image
    from cellseg_deploy.evaluation.overlays import DEFAULT_OVERLAY_SCORE, ground_truth_beside, write_overlay

    t0 = time.perf_counter()
    entries, id_source = resolve_images(images_dir, ids_map)
    out_zip = Path(out_zip)
    overlays = Path(overlays_dir) if overlays_dir is not None else None
    truth = ground_truth_beside(images_dir) if overlays is not None else None
    drawn_from = DEFAULT_OVERLAY_SCORE if overlay_score is None else overlay_score
    runner.load()

    def decode(item: tuple[int, ImageEntry]) -> np.ndarray:
        entry = item[1]
        image = read_image(entry.path, max_pixels=max_pixels)
        if entry.size is not None and tuple(image.shape[:2]) != entry.size:
            raise DataError(
                f"image is {image.shape[0]}x{image.shape[1]} but the id map says {entry.size[0]}x{entry.size[1]}"
            )
        return image

    def finish(
        item: tuple[int, ImageEntry], image: np.ndarray, det: Detections
    ) -> tuple[np.ndarray | None, Instances]:
        with naming_model_output(model=runner.model_path, image=item[1].path):
            inst = finish_image(det, image.shape[:2], post)
        return (image if overlays is not None else None), inst

    def share() -> tuple[list[tuple[int, list[dict[str, Any]]]], list[tuple[int, str, str]]]:
        mine = my_share(entries, dist) if dist is not None and dist.enabled else list(enumerate(entries))
        failures = ImageFailures(strict=strict)
        done: list[tuple[int, list[dict[str, Any]]]] = []
        failed: list[tuple[int, str, str]] = []
        # --batch and --concurrency are refused before any progress bar
        loop = _run_loop(runner, mine, decode, finish, pipeline)
        with folder_progress(len(entries), progress, "predict", dist) as tick:
            for (index, entry), outcome in loop:
                before = len(failures.items)
                out = failures.run(entry.path, outcome.get)
                if out is not None:
                    image, inst = out
                    done.append((index, instances_to_results(entry.image_id, inst)))
                    if overlays is not None:
                        try:
                            gt = truth.instances_for(entry.path.name, image.shape) if truth else None
                            write_overlay(
                                overlays / f"{entry.path.stem}.png",
                                image,
                                inst,
                                score_thresh=drawn_from,
                                gt=gt,
                            )
                        except OSError as exc:  # the predictions are kept; only the picture is missing
                            failures.items.append(
                                (
                                    entry.path.name,
                                    f"predicted, but no overlay written ({exc.strerror or exc})",
                                )
                            )
                    del image, out
                failed.extend((index, *f) for f in failures.items[before:])
                tick()
        return done, failed

    def write(done: list[Any], failed: list[Any]) -> PredictSummary:
        results = [r for _, per_image in done for r in per_image]
        zip_path = _write_or_rescue(out_zip, lambda dest: write_submission(results, dest), len(results))
        results_json = _write_or_rescue(
            zip_path.with_name(RESULTS_MEMBER), lambda dest: write_results_json(results, dest), len(results)
        )
        return PredictSummary(
            out_zip=zip_path,
            results_json=results_json,
            id_source=id_source,
            num_images=len(entries),
            num_predicted=len(done),
            num_detections=len(results),
            failed=[(name, reason) for _, name, reason in failed],
            overlays_dir=overlays,
            seconds=time.perf_counter() - t0,
            runner=runner.info(),
            overlays_gt=truth.source if truth else None,
        )

    if dist is None or not dist.enabled:
        return write(*share())
    shares = gather_to_main(dist, share)
    return result_from_main(dist, lambda: write(*_merge_shares(shares or [])))


def _write_or_rescue(dest: Path, write: Any, count: int) -> Path:
    """``write(dest)``; when that fails at this last step, ``write`` into :func:`rescue_path` and raise
    :class:`OutputError` naming it, so finished predictions are never lost to a full disk or a folder that
    became read-only during the run."""
    try:
        return Path(write(dest))
    except OutputError:
        raise  # the finished file was kept beside dest; the message says where
    except OSError as exc:
        kept = Path(write(rescue_path(dest)))
        raise OutputError(
            f"cannot write {dest} ({exc.strerror or exc}); the finished results ({count} detections) are kept "
            f"in {kept}"
        ) from exc


def _progress(items: Iterable[T], enabled: bool, desc: str) -> Iterator[T]:
    """tqdm over ``items`` (rate and ETA on stderr) when ``enabled``."""
    if not enabled:
        yield from items
        return
    from tqdm import tqdm

    seq = list(items)
    yield from tqdm(seq, desc=desc, unit="img", total=len(seq), dynamic_ncols=True)
