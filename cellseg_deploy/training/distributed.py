"""Distributed data parallel (DDP) set-up for runs launched by ``torchrun``.

``torchrun --nproc_per_node N -m cellseg_deploy.cli.main train ...`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment;
:func:`init_distributed` joins them into one process group: ``nccl`` when training on CUDA (one GPU per
local rank), ``gloo`` on the CPU. Multi-node works the same way (``torchrun --nnodes ... --rdzv-endpoint``).

Each process reads its own shard of the data (``DistributedSampler``), gradients are averaged by DDP, and
only rank 0 validates and writes files (checkpoints, ``metrics.jsonl``, curves); the others wait.
Without those variables (a plain ``cellseg-deploy train``) everything runs in one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from cellseg_deploy.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the run.

    Attributes:
        rank: global rank (0 writes files).
        world_size: number of processes.
        local_rank: rank on this machine (the CUDA device index on GPU runs).
        local_world_size: processes on this machine (CPU threads are shared among them).
        initialized: whether :func:`init_distributed` created the process group (and must destroy it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    initialized: bool = False

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


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun described in the environment (or return a single-process info).

    Args:
        device_type: ``"cpu"`` (backend ``gloo``) or ``"cuda"`` (backend ``nccl``; sets this process's
            device to ``cuda:LOCAL_RANK``).
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
    backend = "nccl" if device_type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
        initialized = True
    else:
        initialized = False
    return DistInfo(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        local_world_size=local_world,
        initialized=initialized,
    )


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


def wrap_model(model: torch.nn.Module, info: DistInfo, device: torch.device) -> Any:
    """Wrap in ``DistributedDataParallel`` when several processes train, else return ``model``."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = (
        [device.index if device.index is not None else info.local_rank] if device.type == "cuda" else None
    )
    return DistributedDataParallel(model, device_ids=device_ids)
