"""The training loop: :func:`train` turns a recipe and a dataset into checkpoints, metrics and curves.

What one call does (every choice comes from the :class:`~cellseg_deploy.training.recipe.Recipe`):

- splits ``<data_root>/train`` into training and validation images (seeded, stable);
- builds the model (random, torchvision-pretrained or local initial weights, see
  :func:`cellseg_deploy.modeling.build_model`), wraps it in DDP under ``torchrun``;
- trains with SGD or AdamW, a warm-up then a step, cosine or plateau schedule, optional gradient clipping,
  under fp16 autocast + GradScaler (``amp``, CUDA), bf16 autocast (CPU or CUDA) or fp32;
- validates every N epochs through the *same* path ``eval`` uses (``forward_raw`` ->
  ``detections_from_torch`` -> ``postprocess`` -> COCOeval), so the AP seen here is the AP reported later;
  keeps the best checkpoint by segm AP50 and stops early after N validations without a better one;
- writes, in ``out_dir``: ``last.pt`` (with ``train_state`` for ``resume``), ``best.pt``, ``metrics.jsonl``,
  ``curves.png`` and the resolved ``recipe.yaml``. Only rank 0 writes.

Reproducibility: the data order (``DistributedSampler`` seeded per epoch), each sample's augmentation
(seeded from ``(seed, epoch, index)``) and the RoI samplers' draws (torch's generator reseeded from
``(seed, step, rank)`` before every step) are functions of the seed and the position in the run, never of
what ran before. A run resumed from a mid-epoch ``last.pt`` therefore reaches the same weights as the
uninterrupted run, bit for bit on the CPU with the same thread count. On CUDA some kernels (atomic adds in
RoIAlign's and interpolation's backward passes) have no deterministic variant: runs agree closely, not
bitwise (``train.deterministic`` asks torch for deterministic algorithms and warns where none exist).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cellseg_deploy.distributed import (
    DistInfo,
    barrier,
    broadcast_floats,
    cleanup,
    init_distributed,
    sync_batchnorm,
    wait_for_main,
    wrap_model,
)
from cellseg_deploy.errors import CheckpointError, ConfigError, DataError, UserError
from cellseg_deploy.io_utils import atomic_write_text
from cellseg_deploy.modeling import build_model, load_checkpoint, save_checkpoint
from cellseg_deploy.modeling.builder import resolve_model_config, starts_trained
from cellseg_deploy.tables import format_metric
from cellseg_deploy.training.dataset import InstanceDataset, collate, validation_ground_truth
from cellseg_deploy.training.recipe import Recipe
from cellseg_deploy.training.schedule import LRSchedule

log = logging.getLogger(__name__)

LAST = "last.pt"
BEST = "best.pt"
METRICS = "metrics.jsonl"
CURVES = "curves.png"
RECIPE = "recipe.yaml"
SUMMARY_KEYS = ("segm_AP50", "segm_AP", "segm_AP75", "bbox_AP50", "bbox_AP", "bbox_AP75")


@dataclass
class TrainResult:
    """What a training run produced.

    Attributes:
        out_dir: the run folder.
        last_checkpoint: ``last.pt`` (the final weights, with ``train_state``).
        best_checkpoint: ``best.pt`` (the weights with the best validation segm AP50).
        metrics: the last validation's metrics (``segm_AP50`` first; see :func:`validate`).
        best_metrics: the best validation's metrics.
        epochs: epochs completed; steps: optimizer steps taken (whole run, resumed parts included).
        seconds: wall time of the whole run (training and validation, resumed parts included).
        stop_reason: ``completed``, ``early_stop``, ``max_steps`` or ``time_limit``.
        world_size: processes that trained.
        rank: this process's rank; only rank 0's result carries the metrics (the others return early).
    """

    out_dir: Path
    last_checkpoint: Path
    best_checkpoint: Path | None
    metrics: dict[str, Any] = field(default_factory=dict)
    best_metrics: dict[str, Any] = field(default_factory=dict)
    epochs: int = 0
    steps: int = 0
    seconds: float = 0.0
    stop_reason: str = "completed"
    world_size: int = 1
    rank: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary."""
        return {
            "out_dir": str(self.out_dir),
            "last_checkpoint": str(self.last_checkpoint),
            "best_checkpoint": None if self.best_checkpoint is None else str(self.best_checkpoint),
            "metrics": self.metrics,
            "best_metrics": self.best_metrics,
            "epochs": self.epochs,
            "steps": self.steps,
            "seconds": round(self.seconds, 2),
            "stop_reason": self.stop_reason,
            "world_size": self.world_size,
            "rank": self.rank,
        }


# ----------------------------------------------------------------------------------------------------------
# Devices, precision, threads
# ----------------------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda:0`` when available else ``cpu``; ``cuda`` -> ``cuda:0`` (always indexed); a CUDA
    device without CUDA raises BackendUnavailable."""
    from cellseg_deploy.backends.devices import torch_device

    if name == "auto":
        return torch_device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        from cellseg_deploy.errors import BackendUnavailable

        raise BackendUnavailable(f"train.device {name!r}: torch sees no CUDA GPU here; use --device cpu")
    return torch_device(name)


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` -> ``amp`` on CUDA, ``fp32`` on the CPU; ``amp`` on the CPU raises ConfigError."""
    if name == "auto":
        return "amp" if device.type == "cuda" else "fp32"
    if name == "amp" and device.type != "cuda":
        raise ConfigError(
            "train.precision: 'amp' (fp16 autocast + GradScaler) needs CUDA; on the CPU use "
            "--set train.precision=bf16 or fp32 (allowed: ['auto', 'fp32', 'amp', 'bf16'])"
        )
    return name


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_threads(local_processes: int = 1) -> int:
    """``train.threads: 0``: ``$OMP_NUM_THREADS`` when set, else every available core, split among the
    processes on this machine."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, available_cores() // max(1, local_processes))


def default_num_workers(device: torch.device, local_processes: int = 1) -> int:
    """``data.num_workers: null``: 0 on the CPU (its cores compute), on CUDA ``min(4, cores per process - 1)``
    and at least 1, so decoding and augmentation overlap the GPU's work."""
    if device.type != "cuda":
        return 0
    per_process = available_cores() // max(1, local_processes)
    return max(1, min(4, per_process - 1))


@contextmanager
def _torch_settings(threads: int, deterministic: bool, allow_tf32: bool = False) -> Iterator[None]:
    """Set torch's thread count, determinism and TF32 for the run; put the previous values back afterwards.

    TF32 is off unless asked (``train.tf32``): fp32 training and validation compute in fp32 on a GPU too.
    """
    from cellseg_deploy.backends.devices import tf32

    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    old_bench = torch.backends.cudnn.benchmark
    torch.set_num_threads(threads)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    try:
        with tf32(allow_tf32):
            yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
        torch.backends.cudnn.benchmark = old_bench


def _autocast(precision: str, device: torch.device) -> Any:
    if precision == "amp":
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return torch.autocast(device_type=device.type, enabled=False)


def step_seed(*keys: int) -> int:
    """A 63-bit seed mixed from integer keys (``numpy.random.SeedSequence``)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> np.uint64(1))


# ----------------------------------------------------------------------------------------------------------
# RNG state in weights_only-loadable form
# ----------------------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """torch / numpy / Python RNG states as tensors and plain lists (``torch.load(weights_only=True)``-safe)."""
    np_state: Any = np.random.get_state()
    py_state: Any = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": int(py_state[0]), "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------
def validate(
    model: torch.nn.Module,
    dataset: InstanceDataset,
    gt: dict[str, Any],
    *,
    max_dets: int,
    score_thresh: float = 0.0,
    mask_thresh: float = 0.5,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """COCO metrics of ``model`` on ``dataset`` through the shared inference path.

    ``forward_raw`` (fp32, eval mode) -> :func:`~cellseg_deploy.backends.pytorch.runner.detections_from_torch`
    -> :func:`~cellseg_deploy.postprocess.postprocess` -> :func:`~cellseg_deploy.evaluation.coco_eval.evaluate`.
    Image ``i`` of ``dataset`` is image id ``gt["images"][i]["id"]``.

    Returns:
        ``segm_AP50``, ``segm_AP``, ``segm_AP75``, ``bbox_AP50``, ``bbox_AP``, ``bbox_AP75`` (floats in [0, 1],
        ``None`` when the ground truth has no instance), ``segm_per_class_AP50``, ``max_dets``,
        ``num_detections``, ``val_images``, ``predictions_sha256`` (of the raw detections' bytes, image by
        image: equal hashes mean bit-identical predictions), ``val_seconds``.
    """
    from cellseg_deploy.backends.pytorch.runner import detections_from_torch
    from cellseg_deploy.evaluation.coco_eval import evaluate, instances_to_results
    from cellseg_deploy.modeling.raw import forward_raw
    from cellseg_deploy.postprocess import PostprocessConfig, postprocess

    t0 = time.perf_counter()
    inner = getattr(model, "module", model)
    device = device or next(inner.parameters()).device
    was_training = inner.training
    inner.eval()
    # Like eval: keep every detection the model returns; the cap is COCOeval's (per image and category).
    post = PostprocessConfig(score_thresh=score_thresh, mask_thresh=mask_thresh, max_dets=None)
    image_ids = [int(im["id"]) for im in gt["images"]]
    results: list[dict[str, Any]] = []
    digest = hashlib.sha256()
    try:
        with torch.inference_mode(), torch.autocast(device_type=device.type, enabled=False):
            for i in range(len(dataset)):
                image = dataset.image(i)
                out = forward_raw(inner, [torch.from_numpy(image).to(device)])[0]
                det = detections_from_torch(out, (int(image.shape[0]), int(image.shape[1])))
                for array in (det.boxes, det.labels, det.scores, det.mask_probs):
                    digest.update(np.ascontiguousarray(array).tobytes())
                results.extend(instances_to_results(image_ids[i], postprocess(det, post)))
    finally:
        inner.train(was_training)
    ev = evaluate(gt, results, max_dets=max_dets)
    metrics: dict[str, Any] = {}
    for iou in ("segm", "bbox"):
        for key in ("AP50", "AP", "AP75"):
            metrics[f"{iou}_{key}"] = ev.metrics[iou][key]
    metrics["segm_per_class_AP50"] = ev.metrics["segm"]["per_class_AP50"]
    metrics["max_dets"] = max_dets
    metrics["num_detections"] = len(results)
    metrics["val_images"] = len(dataset)
    metrics["predictions_sha256"] = digest.hexdigest()
    metrics["val_seconds"] = round(time.perf_counter() - t0, 3)
    return metrics


# ----------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------
def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (``kind`` is ``train`` or ``val``)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # a line cut short by a kill (only the last one can be)
            continue
    return records


def plot_curves(records: list[dict[str, Any]], dest: Path) -> Path:
    """Write a PNG with the training loss (and its parts) and the learning rate per step, and the validation
    AP per epoch."""
    from cellseg_deploy.plots import add_learning_rate, new_figure, save_png

    fig = new_figure(11, 4, dpi=100)
    ax_loss, ax_ap = fig.subplots(1, 2)
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    if train:
        steps = [r["step"] for r in train]
        ax_loss.plot(steps, [r["loss"] for r in train], label="total", color="black", linewidth=1.5)
        for key in sorted(k for k in train[-1] if k.startswith("loss_")):
            ax_loss.plot(steps, [r.get(key, float("nan")) for r in train], label=key[5:], linewidth=0.8)
        ax_loss.set_yscale("log")
        ax_loss.legend(fontsize=7)
        if any("lr" in r for r in train):  # the schedule beside the loss it shapes
            add_learning_rate(ax_loss, steps, [r.get("lr", float("nan")) for r in train])
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("training loss")
    ax_loss.grid(alpha=0.3)
    if val:
        epochs = [r["epoch_float"] for r in val]
        for key, style in (("segm_AP50", "-o"), ("segm_AP", "-s"), ("segm_AP75", "-^"), ("bbox_AP50", ":o")):
            ax_ap.plot(
                epochs,
                [np.nan if r.get(key) is None else r[key] for r in val],
                style,
                label=key,
                markersize=3,
            )
        ax_ap.legend(fontsize=7)
    ax_ap.set_xlabel("epoch")
    ax_ap.set_ylabel("validation AP")
    ax_ap.set_ylim(0, 1)
    ax_ap.grid(alpha=0.3)
    return save_png(fig, dest)


# ----------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------
def train(
    recipe: Recipe,
    data_root: Path,
    out_dir: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    overwrite: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train the recipe's model on ``data_root/train`` and write the run to ``out_dir``.

    Args:
        recipe: the resolved recipe.
        data_root: a dataset in the competition layout (``train/<id>/image.tif`` + ``classK.tif``).
        out_dir: the run folder (created).
        resume: continue from ``out_dir/last.pt`` (model, optimizer, schedule, scaler, epoch, step, RNG).
        progress: show a tqdm bar (loss, learning rate, rate, ETA) on rank 0.
        overwrite: allow starting a new run in a folder that already holds one.
        on_step: called with the global step number after every optimizer step (and its checkpoint).

    Raises:
        DataError: missing or empty dataset. ConfigError: bad settings. CheckpointError: nothing to resume.
        UserError: the loss became NaN or infinite.
    """
    data_root, out_dir = Path(data_root), Path(out_dir)
    if not (data_root / "train").is_dir():
        raise DataError(
            f"data root {data_root} has no train/ folder; expected <root>/train/<id>/image.tif "
            "(make one with 'cellseg-deploy data synth OUT')"
        )
    last = out_dir / LAST
    if resume and not last.is_file():
        raise CheckpointError(f"nothing to resume: {last} does not exist; run without --resume to start")
    if not resume and last.is_file() and not overwrite:
        raise UserError(
            f"{out_dir} already holds a run ({LAST}); pass --resume to continue it, --overwrite to start over, "
            "or choose another --out"
        )
    device = resolve_device(recipe.train.device)
    precision = resolve_precision(recipe.train.precision, device)
    info = init_distributed(
        device.type, timeout_min=recipe.train.dist_timeout_min, wait_timeout_min=recipe.val.timeout_min
    )
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the current stream, memory stats and new tensors: this GPU
    threads = recipe.train.threads or default_threads(info.local_world_size)
    package_log = logging.getLogger("cellseg_deploy")
    old_level = package_log.level
    if not info.is_main:  # one voice: rank 0 logs, the others only warn
        package_log.setLevel(logging.WARNING)
    try:
        with _torch_settings(threads, recipe.train.deterministic, recipe.train.tf32):
            return _Run(recipe, data_root, out_dir, info, device, precision, threads, progress, on_step).run(
                resume
            )
    finally:
        package_log.setLevel(old_level)
        cleanup(info)


class _Run:
    """One training run's state (see :func:`train`)."""

    def __init__(
        self,
        recipe: Recipe,
        data_root: Path,
        out_dir: Path,
        info: DistInfo,
        device: torch.device,
        precision: str,
        threads: int,
        progress: bool,
        on_step: Callable[[int], None] | None,
    ) -> None:
        self.recipe = recipe
        self.data_root = data_root
        self.out_dir = out_dir
        self.info = info
        self.device = device
        self.precision = precision
        self.threads = threads
        self.progress = progress and info.is_main
        self.on_step = on_step
        self.bar: Any = None

    # -- output ------------------------------------------------------------------------------------------
    def say(self, msg: str) -> None:
        if not self.info.is_main:
            return
        if self.bar is not None and not self.bar.disable:  # keep the bar intact
            self.bar.write(msg, file=sys.stderr)
        else:
            log.info(msg)

    def write_record(self, record: dict[str, Any]) -> None:
        if not self.info.is_main:
            return
        with open(self.out_dir / METRICS, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def save_last(self) -> None:
        if not self.info.is_main:
            return
        save_checkpoint(
            self.out_dir / LAST,
            self.model,
            self.model_config,
            recipe=self.recipe_dict,
            epoch=self.epoch,
            metrics=self.last_metrics,
            train_state=self.train_state(),
        )

    def train_state(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "step": self.step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "steps_per_epoch": self.steps_per_epoch,
            "best_ap50": self.best_ap50,
            "best_metrics": self.best_metrics,
            "bad_validations": self.bad_validations,
            "elapsed_s": self.elapsed(),
            "world_size": self.info.world_size,
            "rng": rng_state(),
        }

    def elapsed(self) -> float:
        return self.elapsed_before + (time.perf_counter() - self.t_start)

    # -- set-up ------------------------------------------------------------------------------------------
    def setup(self, resume: bool) -> None:
        from torch.utils.data.distributed import DistributedSampler

        r = self.recipe
        self.recipe_dict = r.to_dict()
        self.t_start = time.perf_counter()
        self.elapsed_before = 0.0
        torch.manual_seed(r.seed)
        w = r.weights
        if resume:
            # The structure (frozen BatchNorm, trainable stages) is the one the run was trained with, as its
            # checkpoint records it; the weights come from last.pt in load_last.
            self.last_checkpoint = load_checkpoint(self.out_dir / LAST)
            self.model_config = self.last_checkpoint.model_config
            model = build_model(self.model_config)
        else:  # first, so a failed download or a bad weight file stops the run at once
            self.model_config = resolve_model_config(
                r.model, pretrained=w.pretrained, init=w.init, pretrained_backbone=w.pretrained_backbone
            )
            if (
                not starts_trained(w.pretrained, w.init, w.pretrained_backbone)
                and (self.model_config.trainable_backbone_layers or 0) < 5
            ):
                log.warning(
                    "model.trainable_backbone_layers=%s freezes randomly initialised trunk stages (no weights "
                    "given); torchvision would train all 5",
                    self.model_config.trainable_backbone_layers,
                )
            model = build_model(
                self.model_config,
                pretrained=w.pretrained,
                init=w.init,
                pretrained_backbone=w.pretrained_backbone,
            )
        self.model = model.to(self.device)
        self.train_ds, self.val_ds = InstanceDataset.split(
            self.data_root, r.data, augment=r.augment, seed=r.seed
        )
        self.gt = validation_ground_truth(self.val_ds) if self.info.is_main else {}
        wait_for_main(self.info)  # rank 0 decoded the validation set alone; DDP's first broadcast follows
        self.optimizer = _make_optimizer(self.model, r)
        self.sampler: DistributedSampler[Any] = DistributedSampler(
            self.train_ds, num_replicas=self.info.world_size, rank=self.info.rank, shuffle=True, seed=r.seed
        )
        bs = r.train.batch_size
        self.steps_per_epoch = math.ceil(len(self.sampler) / bs)
        total = r.train.epochs * self.steps_per_epoch
        self.total_steps = min(total, r.train.max_steps) if r.train.max_steps else total
        self.schedule = LRSchedule(r.schedule, self.steps_per_epoch, self.total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "amp")
        self.step = self.epoch = self.step_in_epoch = 0
        self.best_ap50: float | None = None
        self.best_metrics: dict[str, Any] = {}
        self.last_metrics: dict[str, Any] = {}
        self.bad_validations = 0
        if resume:
            self.load_last()
        elif self.info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            for name in (LAST, METRICS, BEST, CURVES):  # a new run: nothing of an old one survives
                (self.out_dir / name).unlink(missing_ok=True)
        if self.info.is_main:
            atomic_write_text(self.out_dir / RECIPE, r.to_yaml())
        synced = sync_batchnorm(self.model, self.info, self.device) if r.train.sync_batchnorm else 0
        self.ddp_model = wrap_model(self.model, self.info, self.device)
        self.num_workers = (
            r.data.num_workers
            if r.data.num_workers is not None
            else default_num_workers(self.device, self.info.local_world_size)
        )
        mc = self.model_config
        self.say(
            f"model {mc.arch}: trunk {mc.backbone_norm} BatchNorm"
            + (f" (SyncBatchNorm in {synced} layers)" if synced else "")
            + f", {mc.trainable_backbone_layers} of 5 trunk stages train; {self.num_workers} data workers"
        )
        self.say(
            f"training {r.model.arch} ({r.name}): {len(self.train_ds)} train / {len(self.val_ds)} val images, "
            f"{r.train.epochs} epochs x {self.steps_per_epoch} steps of {bs} image(s)"
            + (f" x {self.info.world_size} processes" if self.info.enabled else "")
            + f", {r.optim.name} lr {r.optim.lr:g}, {r.schedule.name} schedule, {self.precision} on {self.device}"
            + (f" ({self.threads} threads)" if self.device.type == "cpu" else "")
        )

    def load_last(self) -> None:
        ckpt = self.last_checkpoint
        ts = ckpt.train_state
        if ts is None:
            raise CheckpointError(f"{self.out_dir / LAST} has no train_state; it cannot be resumed")
        changed = _diff(ckpt.recipe, self.recipe_dict)
        if changed and self.info.is_main:
            log.warning("resuming %s with recipe changes: %s", self.out_dir / LAST, changed)
        if ts.get("world_size", 1) != self.info.world_size:
            raise ConfigError(
                f"cannot resume: the run used {ts.get('world_size')} process(es), this one {self.info.world_size}; "
                "resume with the same torchrun --nproc_per_node"
            )
        if ts["steps_per_epoch"] != self.steps_per_epoch:
            raise ConfigError(
                f"cannot resume: {ts['steps_per_epoch']} steps per epoch in the checkpoint, {self.steps_per_epoch} "
                "now (the dataset, data.* or train.batch_size changed)"
            )
        try:
            self.model.load_state_dict(ckpt.state_dict, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(
                f"cannot resume from {self.out_dir / LAST}: its weights do not fit the recipe's model "
                f"({str(exc).splitlines()[0][:160]})"
            ) from exc
        self.optimizer.load_state_dict(ts["optimizer"])
        self.schedule.load_state_dict(ts["schedule"])
        if self.scaler.is_enabled() and ts["scaler"]:
            self.scaler.load_state_dict(ts["scaler"])
        self.step, self.epoch, self.step_in_epoch = (
            int(ts["step"]),
            int(ts["epoch"]),
            int(ts["step_in_epoch"]),
        )
        self.best_ap50 = ts["best_ap50"]
        self.best_metrics = dict(ts["best_metrics"])
        self.last_metrics = dict(ckpt.metrics)
        self.bad_validations = int(ts["bad_validations"])
        self.elapsed_before = float(ts["elapsed_s"])
        set_rng_state(ts["rng"])
        if self.info.is_main:  # drop records written after the checkpoint
            records = [rec for rec in read_metrics(self.out_dir / METRICS) if rec.get("step", 0) <= self.step]
            atomic_write_text(self.out_dir / METRICS, "".join(json.dumps(rec) + "\n" for rec in records))
        self.say(
            f"resuming {self.out_dir / LAST}: epoch {self.epoch} + {self.step_in_epoch} steps (step {self.step})"
        )

    # -- run ---------------------------------------------------------------------------------------------
    def run(self, resume: bool) -> TrainResult:
        from torch.utils.data import DataLoader
        from tqdm import tqdm

        self.setup(resume)
        r = self.recipe
        bs = r.train.batch_size
        stop_reason = "completed" if self.step >= self.total_steps else ""
        self.bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            disable=not self.progress,
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
            desc="train",
        )
        window: dict[str, list[float]] = {}
        t_window = time.perf_counter()
        images_window = 0
        try:
            while not stop_reason and self.epoch < r.train.epochs:
                self.sampler.set_epoch(self.epoch)
                self.train_ds.set_epoch(self.epoch)
                order = list(self.sampler)
                batches = [order[i : i + bs] for i in range(0, len(order), bs)][self.step_in_epoch :]
                loader = DataLoader(
                    self.train_ds,
                    batch_sampler=batches,
                    collate_fn=collate,
                    num_workers=self.num_workers,
                    pin_memory=self.device.type == "cuda",
                )
                self.model.train()
                for images, targets in loader:
                    losses = self.train_step(images, targets)
                    for k, v in losses.items():
                        window.setdefault(k, []).append(v)
                    images_window += len(images) * self.info.world_size
                    self.bar.update(1)
                    self.bar.set_postfix(
                        epoch=f"{self.epoch + 1}/{r.train.epochs}",
                        loss=f"{losses['loss']:.3f}",
                        lr=f"{self.current_lr:.2e}",
                        refresh=False,
                    )
                    if self.step % r.train.log_every_steps == 0:
                        dt = time.perf_counter() - t_window
                        self.write_record(
                            {
                                "kind": "train",
                                "step": self.step,
                                "epoch_float": round(
                                    self.epoch + self.step_in_epoch / self.steps_per_epoch, 4
                                ),
                                "lr": self.current_lr,
                                **{k: float(np.mean(v)) for k, v in window.items()},
                                "images_per_s": round(images_window / max(dt, 1e-9), 3),
                                "elapsed_s": round(self.elapsed(), 2),
                            }
                        )
                        window, images_window, t_window = {}, 0, time.perf_counter()
                    every = r.train.checkpoint_every_steps
                    if every and self.step % every == 0 and self.step_in_epoch < self.steps_per_epoch:
                        self.save_last()
                    if self.on_step is not None:
                        self.on_step(self.step)
                    if r.train.max_steps and self.step >= r.train.max_steps:
                        stop_reason = "max_steps"
                        break
                    if r.train.time_limit_min and self._time_up():
                        stop_reason = "time_limit"
                        break
                if self.step_in_epoch >= self.steps_per_epoch:
                    self.epoch += 1
                    self.step_in_epoch = 0
                last_epoch = self.epoch >= r.train.epochs
                due = (
                    stop_reason
                    or last_epoch
                    or (self.step_in_epoch == 0 and self.epoch % r.val.every_epochs == 0)
                )
                if due and self.validate_and_track() and not stop_reason:
                    stop_reason = "early_stop"
                if last_epoch and not stop_reason:
                    stop_reason = "completed"
                self.save_last()
        finally:
            self.bar.close()
            self.bar = None
        barrier(self.info)
        if self.info.is_main:
            plot_curves(read_metrics(self.out_dir / METRICS), self.out_dir / CURVES)
        best = self.out_dir / BEST
        self.say(
            f"done ({stop_reason}) after {self.epoch} epochs + {self.step_in_epoch} steps, {self.elapsed():.0f} s; "
            f"best segm AP50 {format_metric(self.best_metrics.get('segm_AP50'))}: {best}"
        )
        return TrainResult(
            out_dir=self.out_dir,
            last_checkpoint=self.out_dir / LAST,
            best_checkpoint=best if best.is_file() else None,
            metrics=self.last_metrics,
            best_metrics=self.best_metrics,
            epochs=self.epoch,
            steps=self.step,
            seconds=self.elapsed(),
            stop_reason=stop_reason or "completed",
            world_size=self.info.world_size,
            rank=self.info.rank,
        )

    def _time_up(self) -> bool:
        up = float(self.elapsed() >= 60.0 * self.recipe.train.time_limit_min)
        return bool(broadcast_floats(self.info, [up])[0])

    def train_step(
        self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]
    ) -> dict[str, float]:
        """One optimizer step on a batch; returns the loss parts as floats."""
        r = self.recipe
        torch.manual_seed(step_seed(r.seed, self.step, self.info.rank))
        time_fraction = 0.0
        if r.schedule.time_aware:  # rank 0's clock, so every process sets the same rate
            elapsed = broadcast_floats(self.info, [self.elapsed()])[0]
            time_fraction = elapsed / (60.0 * r.train.time_limit_min)
        factor = self.schedule.factor(self.step, time_fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        self.current_lr = r.optim.lr * factor
        dev = self.device
        images = [im.to(dev, non_blocking=True).to(torch.float32) / 255.0 for im in images]
        targets = [{k: v.to(dev, non_blocking=True) for k, v in t.items()} for t in targets]
        with _autocast(self.precision, dev):
            loss_dict = self.ddp_model(images, targets)
        loss = sum(v.float() for v in loss_dict.values())
        assert isinstance(loss, torch.Tensor)
        if not torch.isfinite(loss):
            parts = {k: round(float(v), 4) for k, v in loss_dict.items()}
            raise UserError(
                f"the training loss became {float(loss)} at step {self.step} ({parts}); lower optim.lr, "
                "raise schedule.warmup_steps or set optim.grad_clip"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if r.optim.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), r.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        self.step_in_epoch += 1
        out = {"loss": float(loss.detach())}
        out.update({k: float(v.detach()) for k, v in loss_dict.items()})
        return out

    def validate_and_track(self) -> bool:
        """Validate on rank 0, keep the best checkpoint, feed the plateau schedule; True means stop early."""
        r = self.recipe
        stop = 0.0
        ap50 = -1.0
        if self.info.is_main:
            metrics = validate(
                self.model,
                self.val_ds,
                self.gt,
                max_dets=r.val.max_dets,
                score_thresh=r.val.score_thresh,
                mask_thresh=r.val.mask_thresh,
                device=self.device,
            )
            metrics = {**metrics, "epoch": self.epoch, "step": self.step}
            self.last_metrics = metrics
            ap50 = metrics["segm_AP50"] if metrics["segm_AP50"] is not None else 0.0
            improved = self.best_ap50 is None or ap50 > self.best_ap50 + r.val.min_delta
            if improved:
                self.best_ap50 = ap50
                self.best_metrics = metrics
                self.bad_validations = 0
                save_checkpoint(
                    self.out_dir / BEST,
                    self.model,
                    self.model_config,
                    recipe=self.recipe_dict,
                    epoch=self.epoch,
                    metrics=metrics,
                )
            else:
                self.bad_validations += 1
            self.write_record(
                {
                    "kind": "val",
                    "step": self.step,
                    "epoch": self.epoch,
                    "epoch_float": round(self.epoch + self.step_in_epoch / self.steps_per_epoch, 4),
                    **{k: metrics[k] for k in SUMMARY_KEYS},
                    "num_detections": metrics["num_detections"],
                    "val_seconds": metrics["val_seconds"],
                    "best": improved,
                    "elapsed_s": round(self.elapsed(), 2),
                }
            )
            self.say(
                f"epoch {self.epoch} step {self.step}: segm AP50 {format_metric(metrics['segm_AP50'])} "
                f"AP {format_metric(metrics['segm_AP'])} AP75 {format_metric(metrics['segm_AP75'])} | bbox AP50 "
                f"{format_metric(metrics['bbox_AP50'])} | {metrics['num_detections']} detections"
                + (" (best)" if improved else f" (best {format_metric(self.best_ap50)})")
            )
            patience = r.val.early_stop_patience
            stop = float(patience > 0 and self.bad_validations >= patience)
            plot_curves(read_metrics(self.out_dir / METRICS), self.out_dir / CURVES)
        # The other ranks waited for this validation on a gloo barrier (val.timeout_min), not in the NCCL
        # broadcast, whose timeout a long validation would exceed.
        wait_for_main(self.info)
        ap50, stop = broadcast_floats(self.info, [ap50, stop])
        if self.schedule.observe(ap50, r.val.min_delta) and self.info.is_main:
            self.say(f"plateau: learning rate factor now {self.schedule.plateau_factor:g}")
        return bool(stop)


def _diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}")
    return keys


def _make_optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """SGD or AdamW; normalisation weights and biases get no weight decay unless ``norm_weight_decay``."""
    o = recipe.optim
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if not o.norm_weight_decay and (p.ndim <= 1 or name.endswith(".bias")):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay, "initial_lr": o.lr}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "initial_lr": o.lr})
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0)
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps)
