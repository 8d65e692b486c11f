"""Distributed data parallel (DDP) set-up for runs launched by ``torchrun``.

``torchrun --nproc_per_node N -m cellseg_deploy.cli.main train ...`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment;
:func:`init_distributed` joins them into one process group: ``nccl`` when training on CUDA (one GPU per
local rank), ``gloo`` on the CPU. Multi-node works the same way (``torchrun --nnodes ... --rdzv-endpoint``).

Each process reads its own shard of the data (``DistributedSampler``), gradients are averaged by DDP, and
only rank 0 validates and writes files (checkpoints, ``metrics.jsonl``, curves); the others wait.
Without those variables (a plain ``cellseg-deploy train``) everything runs in one process.

Timeouts: the process group gets an explicit ``timeout`` (``train.dist_timeout_min``) and, under NCCL, the
process's ``device_id`` (the communicator forms at once, on the right GPU). While rank 0 validates alone,
which can take longer than any collective timeout, the other ranks do not sit in an NCCL collective: they
wait in :func:`wait_for_main`, a barrier on a separate gloo group whose timeout is ``val.timeout_min``; the
NCCL broadcast of the result follows when every rank is there. (A gloo wait blocks the host thread only.)

BatchNorm under DDP: where BatchNorm layers train (``BatchNorm2d``, not torchvision's ``FrozenBatchNorm2d``)
and several GPUs train, :func:`wrap_model` turns them into ``SyncBatchNorm`` so their statistics come from the
global batch, not from each GPU's one or two images (``train.sync_batchnorm``; NCCL only: ``SyncBatchNorm``
has no CPU kernel).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from cellseg_deploy.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the run.

    Attributes:
        rank: global rank (0 writes files).
        world_size: number of processes.
        local_rank: rank on this machine (the CUDA device index on GPU runs).
        local_world_size: processes on this machine (CPU threads are shared among them).
        initialized: whether :func:`init_distributed` created the process group (and must destroy it).
        wait_group: the gloo group :func:`wait_for_main` waits on (None in a single process).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    initialized: bool = False
    wait_group: Any = field(default=None, compare=False, repr=False)

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that validates and writes."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True when more than one process trains."""
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    """True when ``torchrun`` (or another launcher) set ``WORLD_SIZE`` and ``RANK``."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def process_group_options(device_type: str, local_rank: int, timeout_min: float) -> dict[str, Any]:
    """Keyword arguments of ``torch.distributed.init_process_group`` for this process.

    ``nccl`` with ``device_id=cuda:LOCAL_RANK`` on CUDA, ``gloo`` on the CPU; ``timeout`` always explicit
    (NCCL's default is 10 minutes, and a hung collective waits that long before it fails).
    """
    if timeout_min <= 0:
        raise ConfigError(f"train.dist_timeout_min: must be > 0, got {timeout_min}")
    options: dict[str, Any] = {
        "backend": "nccl" if device_type == "cuda" else "gloo",
        "timeout": timedelta(minutes=timeout_min),
    }
    if device_type == "cuda":
        options["device_id"] = torch.device("cuda", local_rank)
    return options


def init_distributed(
    device_type: str, *, timeout_min: float = 30.0, wait_timeout_min: float = 180.0
) -> DistInfo:
    """Join the process group torchrun described in the environment (or return a single-process info).

    Args:
        device_type: ``"cpu"`` (backend ``gloo``) or ``"cuda"`` (backend ``nccl``; sets this process's
            device to ``cuda:LOCAL_RANK`` and binds the group to it).
        timeout_min: the process group's timeout for collectives, minutes.
        wait_timeout_min: how long :func:`wait_for_main` waits for rank 0 (its validation), minutes.
    """
    if not launched_by_torchrun():
        return DistInfo()
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if world <= 1:
        return DistInfo(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world)
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"torchrun started local rank {local_rank} but this machine has {torch.cuda.device_count()} "
                "CUDA device(s); use --nproc_per_node <= the number of GPUs"
            )
        torch.cuda.set_device(local_rank)
    if wait_timeout_min <= 0:
        raise ConfigError(f"val.timeout_min: must be > 0, got {wait_timeout_min}")
    if not dist.is_initialized():
        options = process_group_options(device_type, local_rank, timeout_min)
        dist.init_process_group(**options)
        initialized = True
        log.info(
            "rank %d/%d: process group %s on %s (timeout %.0f min)",
            rank,
            world,
            options["backend"],
            options.get("device_id", "cpu"),
            timeout_min,
        )
    else:
        initialized = False
    wait_group = dist.new_group(backend="gloo", timeout=timedelta(minutes=wait_timeout_min))
    return DistInfo(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        local_world_size=local_world,
        initialized=initialized,
        wait_group=wait_group,
    )


def wait_for_main(info: DistInfo) -> None:
    """Every process waits until rank 0 gets here too (after work only rank 0 does, e.g. validation).

    A barrier on the gloo ``wait_group`` (timeout ``val.timeout_min``), so no NCCL collective is left waiting
    past its own timeout. No-op in a single process.
    """
    if info.enabled and dist.is_initialized():
        dist.barrier(group=info.wait_group)


def cleanup(info: DistInfo) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    if info.initialized and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every process (no-op in a single process)."""
    if info.enabled and dist.is_initialized():
        dist.barrier()


def broadcast_floats(info: DistInfo, values: list[float]) -> list[float]:
    """Rank 0's ``values`` on every process (e.g. the validation metric and the stop flag)."""
    if not (info.enabled and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.broadcast(t, src=0)
    return [float(v) for v in t.cpu().tolist()]


def sync_batchnorm(model: torch.nn.Module, info: DistInfo, device: torch.device) -> int:
    """Turn ``model``'s BatchNorm layers into ``SyncBatchNorm`` (in place) when several CUDA processes train.

    Only layers that keep statistics (``BatchNorm*d``; ``FrozenBatchNorm2d`` is no BatchNorm subclass) change;
    parameters and buffers are the same tensors, so an optimizer built before keeps working. Returns how
    many layers were converted (0 on the CPU or in a single process).
    """
    if not info.enabled or device.type != "cuda":
        return 0
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
        and not isinstance(module, torch.nn.SyncBatchNorm)
    ]
    if not names:
        return 0
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if converted is not model:  # only when the root itself is a BatchNorm layer
        raise ValueError("sync_batchnorm: the model itself is a BatchNorm layer")
    return len(names)


def wrap_model(model: torch.nn.Module, info: DistInfo, device: torch.device) -> Any:
    """Wrap in ``DistributedDataParallel`` when several processes train, else return ``model``."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = (
        [device.index if device.index is not None else info.local_rank] if device.type == "cuda" else None
    )
    return DistributedDataParallel(model, device_ids=device_ids)
