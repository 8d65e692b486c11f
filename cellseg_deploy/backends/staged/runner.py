"""The staged pipeline: stage graphs run by an executor, everything between them FP32 PyTorch.

Per image batch::

    preprocess     uint8 -> float, normalise, resize, pad to 32        torchvision GeneralizedRCNNTransform
    backbone_rpn   FPN maps + RPN logits/deltas                        executor (ONNX Runtime or TensorRT)
    rpn_post       anchors, decoding, top-k, proposal NMS, box RoIAlign torchvision RPN + MultiScaleRoIAlign
    box_head       class logits + box regression                       executor
    box_post       decoding, softmax, score filter, per-class NMS,     torchvision RoIHeads.postprocess_detections
                   mask RoIAlign                                       + MultiScaleRoIAlign
    mask_head      mask logits for every class                         executor
    mask_post      sigmoid of the predicted class, boxes to original   torchvision maskrcnn_inference, resize_boxes
                   pixels, copy to host

The host steps are torchvision's own modules, built from the model config stored in the stage manifest (they
hold no weights: anchors, box coder, RoIAlign and thresholds are all fixed by the config), so the staged
pipeline computes what torchvision computes, and NMS (boxes offset by ~1e5 per class) stays FP32.
They run on the runner's device (the GPU with TensorRT). Anchors are computed once per padded input size
and reused (:class:`AnchorCache`). Host-device synchronisations are counted per image
(:class:`SyncCounter`, ``info()["host_syncs_per_image"]``) and kept to those the results need: stage timings
use device events on TensorRT (one synchronisation per batch instead of one per stage), RoIAlign over the FPN
levels waits for the device once per pooling instead of once per level (:func:`pool_rois`), and the
detections of an image come back to the host in one copy.

Registered runners:

- ``staged-onnx``: :class:`~cellseg_deploy.backends.staged.executors.OrtExecutor` (CPU, or CUDA with
  ``--device cuda``); ``model_path``: the stage folder or its ``manifest.json``.
- ``trt``: :class:`~cellseg_deploy.backends.tensorrt.executor.TrtExecutor`; ``model_path``: the stage folder
  (engines in ``engines/<precision>/``), an engine folder, or its ``engines.json``.

Precision ``fp32`` or ``fp16`` selects the stage graphs (``staged-onnx``) or engines (``trt``). Options:
``max_batch`` (images per backbone call; at most the profile's batch maximum), for ``trt`` also ``rebuild``
(rebuild engines that are missing or were built for another TensorRT/GPU), ``cuda_graphs``, ``workspace_gib``;
for ``staged-onnx`` and ``staged-torch`` ``tf32`` (allow TF32 for fp32 work on a GPU; default off); for
``staged-torch`` ``fp16_math`` (``storage`` or ``native`` FP16, :func:`default_fp16_math`); for
``staged-onnx`` ``roi_threads`` (threads of the host RoIAlign, :class:`RoiWorkers`; default on the CPU the
runner's ``threads``).
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from cellseg_deploy.backends.base import Runner
from cellseg_deploy.backends.registry import register_runner
from cellseg_deploy.backends.staged.executors import OrtExecutor, StageExecutor
from cellseg_deploy.backends.staged.stages import (
    STAGE_INPUTS,
    STAGES,
    StageFolder,
    StageGeometry,
    StageProfile,
    load_stage_folder,
)
from cellseg_deploy.errors import BackendUnavailable, ModelFileError, UserError
from cellseg_deploy.modeling.config import ModelConfig
from cellseg_deploy.modeling.raw import image_to_tensor
from cellseg_deploy.structures import Detections

TIMING_KEYS: tuple[str, ...] = (
    "preprocess",
    "backbone_rpn",
    "rpn_post",
    "box_head",
    "box_post",
    "mask_head",
    "mask_post",
    "network",
)
"""Keys of ``Detections.timings`` from staged runners (seconds per image; ``network`` = the three stages)."""

RawOutput = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def build_host_model(config: ModelConfig) -> nn.Module:
    """The torchvision ``MaskRCNN`` of ``config`` with its learned networks removed, in eval mode.

    What remains (transform, anchor generator, box coders, proposal filtering, RoIAlign poolers,
    detection post-processing) has no weights, so building it from the config reproduces the checkpoint's
    host steps exactly. Raises ``RuntimeError`` if that ever stops being true.
    """
    from cellseg_deploy.modeling.registry import get_arch

    with torch.random.fork_rng(devices=[]):  # the random init must not move the caller's RNG
        model: Any = get_arch(config.arch).build(config)
    model.backbone = nn.Identity()
    model.rpn.head = nn.Identity()
    for name in ("box_head", "box_predictor", "mask_head", "mask_predictor"):
        setattr(model.roi_heads, name, nn.Identity())
    learned = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    if learned:
        raise RuntimeError(
            f"host steps of {config.arch!r} hold tensors {learned[:5]}: they must come from the checkpoint"
        )
    return model.eval()


class AnchorCache:
    """torchvision's anchors, computed once per padded input size.

    ``AnchorGenerator`` makes the same anchors for every image of a padded batch ``[B, 3, H, W]``: they
    depend only on ``H, W``, the feature-map sizes, dtype and device (not on the pixels). The cache keeps the
    per-image anchors ``float32 [sum_l A * H_l * W_l, 4]`` by that key (at most ``max_entries`` sizes, least
    recently used dropped).
    """

    def __init__(self, generator: Any, max_entries: int = 16) -> None:
        self.generator = generator
        self.max_entries = max_entries
        self.entries: OrderedDict[tuple[Any, ...], torch.Tensor] = OrderedDict()
        self.misses = 0

    @staticmethod
    def key(images: Any, features: list[torch.Tensor]) -> tuple[Any, ...]:
        """``(H, W, feature sizes, dtype, device)`` of a batch: what the anchors depend on."""
        h, w = images.tensors.shape[-2:]
        sizes = tuple(tuple(f.shape[-2:]) for f in features)
        return (int(h), int(w), sizes, features[0].dtype, str(features[0].device))

    def __call__(self, images: Any, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Anchors for each image of ``images`` (the same tensor for all of them), as torchvision's."""
        key = self.key(images, features)
        anchors = self.entries.get(key)
        if anchors is None:
            self.misses += 1
            first = type(images)(images.tensors[:1], images.image_sizes[:1])
            anchors = self.generator(first, [f[:1] for f in features])[0]
            self.entries[key] = anchors
            if len(self.entries) > self.max_entries:
                self.entries.popitem(last=False)
        else:
            self.entries.move_to_end(key)
        return [anchors] * len(images.image_sizes)


def rpn_proposals(
    rpn: Any,
    images: Any,
    features: list[torch.Tensor],
    objectness: list[torch.Tensor],
    deltas: list[torch.Tensor],
    anchors: AnchorCache | None = None,
) -> list[torch.Tensor]:
    """torchvision ``RegionProposalNetwork.forward`` (eval) after its head: proposals per image.

    Args:
        rpn: the model's ``RegionProposalNetwork`` (anchor generator, box coder, filtering settings).
        images: ``ImageList`` of the padded batch ``[B, 3, H, W]`` and its resized sizes.
        features: FPN maps, float32 ``[B, C, H_l, W_l]`` per level.
        objectness / deltas: RPN head outputs per level, ``[B, A, H_l, W_l]`` / ``[B, 4A, H_l, W_l]``.
        anchors: a cache of the anchor generator (default: compute them, as torchvision does).

    Returns:
        float32 ``[P_i, 4]`` proposals ``x1, y1, x2, y2`` in resized-image pixels, per image.
    """
    from torchvision.models.detection.rpn import concat_box_prediction_layers

    anchors_per_image = (anchors or rpn.anchor_generator)(images, features)
    num_anchors_per_level = [int(o[0].numel()) for o in objectness]
    flat_objectness, flat_deltas = concat_box_prediction_layers(objectness, deltas)
    proposals = rpn.box_coder.decode(flat_deltas, anchors_per_image).view(len(anchors_per_image), -1, 4)
    boxes, _ = rpn.filter_proposals(proposals, flat_objectness, images.image_sizes, num_anchors_per_level)
    return list(boxes)


_SYNCING_OPS = frozenset(
    {
        "item",
        "tolist",
        "__bool__",
        "__int__",
        "__float__",
        "__index__",
        "numpy",
        "cpu",
        "nonzero",
        "argwhere",
        "masked_select",
        "unique",
        "unique_consecutive",
        "bincount",
        "nms",
    }
)
"""torch functions whose result needs values of a GPU tensor on the host (a data-dependent shape, a Python
number, a copy to host memory): each makes the host wait for the device."""


def _is_bool_index(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def op_synchronises(name: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool:
    """Whether torch function ``name`` called with ``args`` waits for a CUDA device when its tensors are on
    one: :data:`_SYNCING_OPS`, ``torch.where(condition)`` (one argument: ``nonzero``), indexing with a bool
    mask, and ``repeat_interleave`` without ``output_size``."""
    if name in _SYNCING_OPS:
        return True
    if name == "where":
        return len(args) + len(kwargs) == 1
    if name in ("__getitem__", "__setitem__"):
        return len(args) > 1 and _is_bool_index(args[1])
    if name == "repeat_interleave":
        return "output_size" not in kwargs and any(isinstance(a, torch.Tensor) for a in args[1:2])
    return False


class SyncCounter(TorchFunctionMode):
    """Counts the torch calls of the host steps that synchronise a CUDA device (:func:`op_synchronises`).

    The count is by kind of operation, so it is the same on the CPU (where nothing waits) as on a GPU for
    the same detections: what a change to the host steps saves on a GPU shows on the CPU. Calls made while
    :attr:`paused` (inside a stage executor, which counts its own in ``executor.syncs``) are not counted.

    Attributes:
        count: synchronising calls so far; by_op: the same per function name.
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.by_op: Counter[str] = Counter()
        self.paused = False

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if not self.paused:
            name = getattr(func, "__name__", "")
            if op_synchronises(name, args, kwargs):
                self.count += 1
                self.by_op[name] += 1
        return func(*args, **kwargs)


HOST_THREADS = 1
"""torch threads for the host steps on the CPU. They are many small operations between stage runs, and two
thread pools (torch's OpenMP team and ONNX Runtime's) taking turns on the same cores cost more than the
second thread gains, most on a small, loaded machine (docs/tensorrt.md has the measurement). Results do not
change."""


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """torch's intra-op thread count at ``count`` inside the block (``None``: unchanged), restored after."""
    if count is None or count == torch.get_num_threads():
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class StagedPipeline:
    """The host side of the staged model: preprocessing, the FP32 steps between stages, and stage calls.

    Args:
        folder: the stage folder (model config, geometry, profile).
        executor: runs the stage graphs; its ``device`` is where the host steps run.
        profile: the shapes the stages take (default the folder's; engines carry their own).
        roi_threads: threads for the host RoIAlign (:class:`RoiWorkers`); default on the CPU torch's intra-op
            thread count (the runner's ``threads``), on a GPU 1.

    Attributes:
        syncs_per_image: host-device synchronisations of the last :meth:`detect` call per image (host steps
            counted by :class:`SyncCounter`, plus the executor's own).
        sync_ops: the synchronising calls of the last call, by function name (per batch).
    """

    def __init__(
        self,
        folder: StageFolder,
        executor: StageExecutor,
        profile: StageProfile | None = None,
        roi_threads: int | None = None,
    ) -> None:
        self.folder = folder
        self.executor = executor
        self.device = executor.device
        self.config = folder.model_config
        self.geometry: StageGeometry = folder.geometry
        self.profile = profile or folder.profile
        host: Any = build_host_model(self.config).to(self.device)
        self.host = host
        self.anchors = AnchorCache(host.rpn.anchor_generator)
        self.outputs = {s: folder.output_names(s) for s in STAGES}
        self.syncs_per_image = 0.0
        self.sync_ops: dict[str, int] = {}
        self.count_syncs = True
        self.host_threads = HOST_THREADS if self.device.type == "cpu" else None
        if roi_threads is None:
            roi_threads = torch.get_num_threads() if self.device.type == "cpu" else 1
        self.roi_workers = RoiWorkers(roi_threads)
        self._counter: SyncCounter | None = None

    def preprocess(self, images: list[np.ndarray]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """RGB uint8 ``[H, W, 3]`` images -> padded float32 batch ``[B, 3, H', W']`` on the device and the
        resized ``(h, w)`` of each image (torchvision's transform: normalise, resize, pad to 32)."""
        tensors = [image_to_tensor(torch.from_numpy(im).to(self.device)) for im in images]
        with torch.inference_mode():
            batch, _ = self.host.transform(tensors)
        return batch.tensors, [(int(h), int(w)) for h, w in batch.image_sizes]

    def _stage(self, stage: str, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One executor call (its synchronisations are the executor's to count)."""
        counter = self._counter
        if counter is not None:
            counter.paused = True
        try:
            return self.executor.run(stage, inputs)
        finally:
            if counter is not None:
                counter.paused = False

    def _run_rois(
        self, stage: str, features: torch.Tensor, record: dict[str, Any] | None
    ) -> dict[str, torch.Tensor]:
        """Run a head on ``features [R, C, S, S]``: empty sets skip the executor, sets over the profile's maximum
        run in chunks, and with an executor ``roi_bucket`` counts are zero-padded up to its multiple."""
        count = int(features.shape[0])
        if count == 0:
            return self._empty_outputs(stage)
        limit = self.profile.max_rois(stage)
        bucket = self.executor.roi_bucket
        chunks = []
        for start, n, padded in roi_chunks(count, limit, bucket):
            part = features[start : start + n]
            if padded > n:
                part = torch.cat([part, part.new_zeros((padded - n, *part.shape[1:]))])
            out = self._stage(stage, {STAGE_INPUTS[stage]: part})
            chunks.append({k: v[:n] for k, v in out.items()})
        outs = {k: torch.cat([c[k] for c in chunks]) if len(chunks) > 1 else chunks[0][k] for k in chunks[0]}
        if record is not None:
            record[stage] = outs
        return outs

    def _empty_outputs(self, stage: str) -> dict[str, torch.Tensor]:
        g = self.geometry
        k = g.num_classes
        shapes = {
            "class_logits": (0, k),
            "box_regression": (0, 4 * k),
            "mask_logits": (0, k, g.mask_size, g.mask_size),
        }
        return {n: torch.zeros(shapes[n], device=self.device) for n in self.outputs[stage]}

    def forward(
        self,
        batch: torch.Tensor,
        image_sizes: list[tuple[int, int]],
        *,
        timings: dict[str, float] | None = None,
        record: dict[str, Any] | None = None,
        clock: _Clock | None = None,
    ) -> list[RawOutput]:
        """Detections for a padded batch, in resized-image pixels.

        Args:
            batch: float32 ``[B, 3, H, W]`` normalised, resized, padded (on the device).
            image_sizes: resized ``(h, w)`` of each image inside the padding.
            timings: if given, seconds per stage are added to it (keys :data:`TIMING_KEYS`).
            record: if given, every stage's outputs are stored in it by stage name (for checks).
            clock: the clock ``timings`` are taken with, when the caller started it earlier.

        Returns:
            per image ``(boxes float32 [N, 4], labels int64 [N], scores float32 [N], mask_probs float32 [N, M, M])``.
        """
        from torchvision.models.detection.image_list import ImageList
        from torchvision.models.detection.roi_heads import maskrcnn_inference

        clock = clock or _Clock(self.executor, timings)
        rh = self.host.roi_heads
        with torch.inference_mode():
            out = self._stage("backbone_rpn", {"images": batch})
            if record is not None:
                record["backbone_rpn"] = out
            clock.lap("backbone_rpn")
            levels = self.geometry.levels
            features = OrderedDict((lv, out[f"feat_{lv}"]) for lv in levels)
            objectness = [out[f"rpn_logits_{i}"] for i in range(len(levels))]
            deltas = [out[f"rpn_deltas_{i}"] for i in range(len(levels))]
            image_list = ImageList(batch, image_sizes)
            proposals = rpn_proposals(
                self.host.rpn, image_list, list(features.values()), objectness, deltas, self.anchors
            )
            if record is not None:
                record["_features"], record["_proposals"] = features, proposals
            box_features = pool_rois(rh.box_roi_pool, features, proposals, image_sizes, self.roi_workers)
            clock.lap("rpn_post")
            heads = self._run_rois("box_head", box_features, record)
            clock.lap("box_head")
            boxes, scores, labels = rh.postprocess_detections(
                heads["class_logits"], heads["box_regression"], proposals, image_sizes
            )
            mask_features = pool_rois(rh.mask_roi_pool, features, boxes, image_sizes, self.roi_workers)
            clock.lap("box_post")
            masks = self._run_rois("mask_head", mask_features, record)
            clock.lap("mask_head")
            probs = maskrcnn_inference(masks["mask_logits"], labels)
            clock.lap("mask_post")
        clock.finish()
        return [(b, lab, s, p[:, 0]) for b, lab, s, p in zip(boxes, labels, scores, probs, strict=True)]

    def close(self) -> None:
        """Stop the RoIAlign threads and release the executor."""
        self.roi_workers.close()
        self.executor.close()

    def detect(self, images: list[np.ndarray]) -> list[Detections]:
        """:class:`Detections` (original-image pixels, host numpy) for images of any sizes, as one batch."""
        counter = SyncCounter()
        syncs_before = self.executor.syncs
        self._counter = counter if self.count_syncs else None
        try:
            with (
                counter if self.count_syncs else contextlib.nullcontext(),
                torch_threads(self.host_threads),
            ):
                results, timings = self._detect(images)
        finally:
            self._counter = None
        self.sync_ops = dict(counter.by_op)
        self.syncs_per_image = (counter.count + self.executor.syncs - syncs_before) / len(images)
        per_image = {k: v / len(images) for k, v in timings.items()}
        for det in results:
            det.timings = dict(per_image)
        return results

    def _detect(self, images: list[np.ndarray]) -> tuple[list[Detections], dict[str, float]]:
        from torchvision.models.detection.transform import resize_boxes

        timings: dict[str, float] = {}
        clock = _Clock(self.executor, timings)
        batch, sizes = self.preprocess(images)
        problem = self.profile.image_problem(*batch.shape[:1], *batch.shape[2:])
        if problem is not None and self.executor.name == "tensorrt":
            raise UserError(problem)
        clock.lap("preprocess")
        outs = self.forward(batch, sizes, timings=timings, clock=clock)
        t0 = time.perf_counter()
        results = []
        for im, resized, (boxes, labels, scores, probs) in zip(images, sizes, outs, strict=True):
            original = (int(im.shape[0]), int(im.shape[1]))
            boxes = resize_boxes(boxes, list(resized), list(original))
            results.append(to_host_detections(boxes, labels, scores, probs, original))
        timings["mask_post"] = time.perf_counter() - t0 + timings.get("mask_post", 0.0)
        timings["network"] = sum(timings.get(s, 0.0) for s in STAGES)
        return results, timings


class RoiWorkers:
    """Threads that run torchvision's CPU RoIAlign on parts of one pooling's RoIs at the same time.

    torchvision's CPU ``roi_align`` kernel is one loop over the RoIs on the calling thread (it ignores torch's
    intra-op threads), and it is most of the CPU host steps' time (box pooling: 1000 RoIs ``[64, 7, 7]``).
    It releases the GIL, and each RoI's output depends only on that RoI, so ``count`` threads, each pooling a
    contiguous part of the RoIs, give the same values in a fraction of the time. ONNX Runtime is idle while
    the host steps run (no spinning), so its threads do not compete for the cores.

    ``count`` 1 (the default on a GPU, where one kernel launch is already parallel) runs everything on the
    calling thread. The threads start on first use; :meth:`close` stops them.
    """

    min_rois = 16
    """A part has at least this many RoIs: smaller sets are not worth a thread hand-over."""

    def __init__(self, count: int = 1) -> None:
        self.count = max(1, int(count))
        self._pool: ThreadPoolExecutor | None = None

    def parts(self, start: int, stop: int) -> list[tuple[int, int]]:
        """``[start, stop)`` cut into at most :attr:`count` contiguous ``(start, stop)`` parts of at least
        :attr:`min_rois` RoIs each (one part if there are fewer); none if the range is empty."""
        n = stop - start
        if n <= 0:
            return []
        k = max(1, min(self.count, n // self.min_rois))
        bounds = [start + (n * i) // k for i in range(k + 1)]
        return list(itertools.pairwise(bounds))

    def run(self, jobs: list[Callable[[], None]]) -> None:
        """Run ``jobs`` (each under ``torch.inference_mode``, like the caller) and wait for all of them;
        the first exception is raised here."""
        if self.count == 1 or len(jobs) <= 1:
            for job in jobs:
                job()
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.count, thread_name_prefix="roi-align")
        futures = [self._pool.submit(_inference_job, job) for job in jobs[1:]]
        _inference_job(jobs[0])  # the calling thread takes a part too
        for future in futures:
            future.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _inference_job(job: Callable[[], None]) -> None:
    # inference_mode is thread-local: a worker thread must enter it itself.
    with torch.inference_mode():
        job()


def pool_rois(
    pooler: Any,
    features: Mapping[str, torch.Tensor],
    boxes: list[torch.Tensor],
    image_sizes: list[tuple[int, int]],
    workers: RoiWorkers | None = None,
) -> torch.Tensor:
    """torchvision's ``MultiScaleRoIAlign.forward``, bit for bit, with one host-device synchronisation
    instead of one per FPN level, and on the CPU with the RoIs split across ``workers``' threads.

    torchvision selects each level's RoIs with ``torch.where(levels == level)`` (a data-dependent size: the
    host waits for the device once per level, twice per image with the box and mask poolers). Here the RoIs
    are sorted by level once, the per-level counts come to the host in one copy, each level's RoIAlign runs
    on contiguous parts of the sorted RoIs (one per worker thread), and each part's result is written to its
    RoIs' rows of the output. RoIAlign of one RoI does not depend on the others, so the output is the same.
    When one part holds every RoI in their original order, its RoIAlign output is returned as it is.

    Args:
        pooler: the model's ``MultiScaleRoIAlign`` (its scales are set up on first use, as torchvision does).
        features: FPN maps by level name, float32 ``[B, C, H_l, W_l]``.
        boxes: per image, float32 ``[N_i, 4]`` ``x1, y1, x2, y2`` in resized-image pixels.
        image_sizes: resized ``(h, w)`` per image.
        workers: the threads to pool with (default: the calling thread only).

    Returns:
        float32 ``[sum N_i, C, S, S]``, ``S`` the pooler's output size.
    """
    from torchvision.ops import roi_align
    from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales

    workers = workers or RoiWorkers(1)
    maps = _filter_input(dict(features), pooler.featmap_names)
    if pooler.scales is None or pooler.map_levels is None:
        pooler.scales, pooler.map_levels = _setup_scales(
            maps, image_sizes, pooler.canonical_scale, pooler.canonical_level
        )
    rois = _convert_to_roi_format(boxes)
    size, ratio = pooler.output_size, pooler.sampling_ratio
    total = int(rois.shape[0])
    order: torch.Tensor | None = None  # None: the RoIs are pooled in their own order
    if len(maps) == 1:
        counts, ordered = [total], rois
    else:
        levels = pooler.map_levels(boxes)
        order = torch.argsort(levels, stable=True)
        counts = (levels[None, :] == torch.arange(len(maps), device=levels.device)[:, None]).sum(1).tolist()
        ordered = rois[order]
        if max(counts) == total:  # one level holds every RoI: the stable sort left them in place
            order = None
    parts: list[tuple[torch.Tensor, float, int, int]] = []
    start = 0
    for feature, scale, count in zip(maps, pooler.scales, counts, strict=True):
        parts.extend((feature, scale, a, b) for a, b in workers.parts(start, start + count))
        start += count
    if len(parts) == 1 and order is None:
        feature, scale, _, _ = parts[0]
        return roi_align(feature, ordered, output_size=size, spatial_scale=scale, sampling_ratio=ratio)
    result = torch.empty((total, maps[0].shape[1], *size), dtype=maps[0].dtype, device=maps[0].device)

    def job(feature: torch.Tensor, scale: float, a: int, b: int) -> Callable[[], None]:
        def pool() -> None:
            out = roi_align(
                feature, ordered[a:b], output_size=size, spatial_scale=scale, sampling_ratio=ratio
            )
            # Parts write disjoint rows of ``result``, so the threads never touch the same memory.
            if order is None:
                result[a:b].copy_(out)
            else:
                result.index_copy_(0, order[a:b], out.to(result.dtype))

        return pool

    workers.run([job(*part) for part in parts])
    return result


def roi_chunks(count: int, limit: int, bucket: int) -> list[tuple[int, int, int]]:
    """How a head runs ``count`` RoIs with at most ``limit`` per call: ``(start, n, padded)`` per call, where
    ``padded >= n`` is ``n`` rounded up to a multiple of ``bucket`` (``bucket`` 0: no padding), but never
    above ``max(limit, n)``."""
    out = []
    for start in range(0, count, limit):
        n = min(limit, count - start)
        padded = n
        if bucket > 0 and n % bucket:
            padded = min(-(-n // bucket) * bucket, max(limit, n))
        out.append((start, n, padded))
    return out


def to_host_detections(
    boxes: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor,
    probs: torch.Tensor,
    size: tuple[int, int],
) -> Detections:
    """One image's detections in host memory, in **one** copy from the device: boxes ``[N, 4]``, scores, and
    labels (small integers, exact in float32) and the ``[N, M, M]`` mask probabilities packed into one
    float32 ``[N, 6 + M * M]`` tensor, split again on the host."""
    n = int(boxes.shape[0])
    m = int(probs.shape[-1])
    packed = torch.cat(
        [boxes.float(), scores.float()[:, None], labels.float()[:, None], probs.float().reshape(n, m * m)],
        dim=1,
    )
    host = packed.cpu().numpy()
    return Detections(
        boxes=np.ascontiguousarray(host[:, :4]),
        labels=host[:, 5].astype(np.int64),
        scores=np.ascontiguousarray(host[:, 4]),
        mask_probs=np.ascontiguousarray(host[:, 6:]).reshape(n, m, m),
        image_size=size,
    )


class _Clock:
    """Stage timings from the executor's marks: host seconds after a synchronisation, or (TensorRT) device
    events that need one synchronisation at :meth:`finish` instead of one per lap."""

    def __init__(self, executor: StageExecutor, timings: dict[str, float] | None) -> None:
        self.executor = executor
        self.timings = timings
        self.marks: list[tuple[str, Any]] = []
        self.start = executor.mark() if timings is not None else None

    def lap(self, key: str) -> None:
        if self.timings is not None:
            self.marks.append((key, self.executor.mark()))

    def finish(self) -> None:
        if self.timings is None or not self.marks:
            return
        if self.executor.marks_need_sync:
            self.executor.synchronize()
        last = self.start
        for key, mark in self.marks:
            self.timings[key] = self.timings.get(key, 0.0) + self.executor.elapsed_s(last, mark)
            last = mark


class _StagedRunnerBase(Runner):
    """Shared by ``staged-onnx``, ``staged-torch`` and ``trt``: a :class:`StagedPipeline` over an executor."""

    precisions: ClassVar[tuple[str, ...]] = ("fp32", "fp16")
    model_suffixes: ClassVar[tuple[str, ...]] = ("/", ".json")
    pipeline: StagedPipeline

    def _make_pipeline(self) -> StagedPipeline:
        raise NotImplementedError

    def _check_device(self) -> None:
        """Refuse a CUDA device torch cannot see (before any model is read)."""
        from cellseg_deploy.backends.devices import parse_device

        if parse_device(self.device)[0] == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable(
                f"device {self.device!r} asked for, but torch sees no CUDA GPU; use --device cpu"
            )

    def _load(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        self._check_device()
        self.pipeline = self._make_pipeline()
        profile_batch = self.pipeline.profile.batch[2]
        self.max_batch = int(self.options.get("max_batch", profile_batch))
        if not 1 <= self.max_batch <= profile_batch and self.pipeline.executor.name == "tensorrt":
            raise UserError(
                f"max_batch {self.max_batch} must lie in [1, {profile_batch}] (the engines' profile)"
            )

    def _close(self) -> None:
        self.pipeline.close()
        del self.pipeline
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def _infer(self, image: np.ndarray) -> Detections:
        return self.pipeline.detect([image])[0]

    def _infer_batch(self, images: list[np.ndarray]) -> list[Detections]:
        results: list[Detections] = []
        for start in range(0, len(images), self.max_batch):
            results.extend(self.pipeline.detect(images[start : start + self.max_batch]))
        return results

    def _info(self) -> dict[str, Any]:
        return {
            "arch": self.pipeline.config.arch,
            "stages": str(self.pipeline.folder.root),
            "host_syncs_per_image": self.pipeline.syncs_per_image,
            "host_sync_ops": dict(self.pipeline.sync_ops),
            **self.pipeline.executor.info(),
        }


@register_runner
class StagedOnnxRunner(_StagedRunnerBase):
    """Stage graphs on ONNX Runtime (CPU provider, or CUDA provider with ``--device cuda``, refused if ONNX
    Runtime falls back to the CPU); host steps FP32 PyTorch on the same device. ``fp16`` runs the
    ``*.fp16.onnx`` graphs (on the CPU, ONNX Runtime computes FP16 nodes without a CPU kernel in FP32 between
    Casts, so values are FP16-rounded, not FP16-accumulated). Option ``tf32``: let the CUDA provider use TF32
    for fp32 work (default off)."""

    name = "staged-onnx"
    description = "stage graphs on ONNX Runtime + torchvision FP32 host steps"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return "ONNX Runtime is not installed: pip install onnxruntime (or onnxruntime-gpu)"
        return None

    def _make_pipeline(self) -> StagedPipeline:
        folder = load_stage_folder(self.model_path)
        executor = OrtExecutor(
            folder.graphs(self.precision),
            device=self.device,
            threads=self.threads,
            tf32=_flag(self.options.get("tf32", False)),
        )
        return StagedPipeline(folder, executor, roi_threads=_int_option(self.options, "roi_threads"))


def load_stage_checkpoint(folder: StageFolder, path: Path | None = None) -> Any:
    """The checkpoint a stage folder was exported from (the manifest's path, or ``path``), after checking its
    SHA-256 against the manifest.

    Raises:
        ModelFileError: the checkpoint is missing or is not the one the graphs were exported from.
    """
    from cellseg_deploy.io_utils import sha256_file
    from cellseg_deploy.modeling.checkpoint import load_checkpoint

    recorded = folder.manifest["checkpoint"]
    ckpt_path = Path(path) if path is not None else Path(recorded["path"])
    if not ckpt_path.is_file():
        raise ModelFileError(
            f"stage folder {folder.root} was exported from {ckpt_path}, which does not exist here; "
            "pass its current location with option checkpoint=PATH"
        )
    if sha256_file(ckpt_path) != recorded["sha256"]:
        raise ModelFileError(
            f"checkpoint {ckpt_path} is not the one the stage graphs in {folder.root} were exported from "
            f"(SHA-256 differs from {recorded['sha256'][:12]}...); re-export the stages or pass the right file"
        )
    return load_checkpoint(ckpt_path)


def torch_stage_executor(
    folder: StageFolder,
    precision: str,
    *,
    device: str = "cpu",
    checkpoint: Path | None = None,
    tf32: bool = False,
    fp16_math: str = "native",
) -> StageExecutor:
    """A :class:`~cellseg_deploy.backends.staged.executors.TorchExecutor` running the stage modules of the
    folder's source checkpoint in ``precision`` (what the graphs were traced from); ``tf32`` as there.
    ``fp16_math`` (one of :data:`FP16_MATH`), for ``fp16``: ``native`` FP16 modules, or ``storage``: FP32
    modules with FP16 storage (:func:`~cellseg_deploy.backends.staged.stages.fp16_storage_stage_modules`)."""
    if fp16_math not in FP16_MATH:
        raise UserError(
            f"staged-torch option fp16_math={fp16_math!r}: expected one of {', '.join(FP16_MATH)}"
        )
    from cellseg_deploy.backends.staged.executors import TorchExecutor
    from cellseg_deploy.backends.staged.stages import build_stage_modules, fp16_storage_stage_modules

    model = load_stage_checkpoint(folder, checkpoint).build_model()
    if fp16_math == "storage" and precision == "fp16":
        modules = fp16_storage_stage_modules(model)
    else:
        modules = build_stage_modules(model, precision)
    return TorchExecutor(modules, {s: folder.output_names(s) for s in STAGES}, device=device, tf32=tf32)


FP16_MATH: tuple[str, ...] = ("storage", "native")
"""How ``staged-torch`` computes ``fp16``: ``native`` FP16 modules, or FP16 ``storage`` with FP32 arithmetic
(:func:`~cellseg_deploy.backends.staged.stages.fp16_storage_stage_modules`)."""


def default_fp16_math(device: str) -> str:
    """``native`` on a GPU (FP16 arithmetic in hardware); ``storage`` on the CPU, where PyTorch emulates FP16
    convolutions many times slower than FP32 ones and storage rounding gives the same FP16 tensors between
    layers, which is what decides an overflow or a lost detection."""
    return "native" if device.startswith("cuda") else "storage"


@register_runner
class StagedTorchRunner(_StagedRunnerBase):
    """The stage modules in PyTorch (from the checkpoint the stage folder references, SHA-256 checked) with the
    same host steps: ``fp16`` keeps every tensor between layers in FP16, on the CPU too, so it is the FP16
    reference without a GPU. Options: ``checkpoint`` (where the source checkpoint is now, if it moved),
    ``tf32`` (allow TF32 for fp32 stages on a GPU; default off, fp32 computes in fp32), ``fp16_math``
    (:data:`FP16_MATH`; default :func:`default_fp16_math` of the device)."""

    name = "staged-torch"
    description = "stage modules in PyTorch (fp16: FP16 tensors between layers, CPU or GPU) + FP32 host steps"

    def _make_pipeline(self) -> StagedPipeline:
        folder = load_stage_folder(self.model_path)
        path = self.options.get("checkpoint")
        self.fp16_math = str(self.options.get("fp16_math", default_fp16_math(self.device)))
        executor = torch_stage_executor(
            folder,
            self.precision,
            device=self.device,
            checkpoint=Path(path) if path else None,
            tf32=_flag(self.options.get("tf32", False)),
            fp16_math=self.fp16_math,
        )
        return StagedPipeline(folder, executor)

    def _info(self) -> dict[str, Any]:
        info = super()._info()
        if self.precision == "fp16":
            info["fp16_math"] = self.fp16_math
        return info


def _int_option(options: Mapping[str, Any], key: str) -> int | None:
    """Runner option ``key`` as a positive integer (``None`` when not given)."""
    if key not in options:
        return None
    try:
        value = int(options[key])
    except (TypeError, ValueError):
        value = 0
    if value < 1:
        raise UserError(f"option {key} must be a positive integer, got {options[key]!r}")
    return value


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)
