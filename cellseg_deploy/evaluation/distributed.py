"""``predict`` and ``eval`` over several processes (``torchrun``): the ranks share the images, rank 0 writes.

``torchrun --nproc-per-node N -m cellseg_deploy.cli.main predict ...`` starts N processes; each joins the
process group (:func:`cellseg_deploy.distributed.init_distributed`: gloo on the CPU, nccl on CUDA
with one GPU per local rank), takes every N-th image of the folder (:func:`my_share`), runs its own runner
on them, and sends its results to rank 0 (:func:`gather_to_main`). Rank 0 puts them back in the folder's
order, so the submission zip and the COCO evaluation are the ones a single process makes, byte for byte and
AP for AP, and sends what it did to every rank (:func:`result_from_main`).

Failures: an image a rank cannot read or run is skipped and named as in one process (the names reach rank
0 with the results). A rank that stops (a broken model, ``--strict``) still joins the gather with its
error, so rank 0 names that rank and its image, writes nothing, and every rank exits non-zero. A rank that
dies outright is seen by ``torchrun``, which stops the others. Object collectives run on the gloo
``wait_group`` of :class:`~cellseg_deploy.distributed.DistInfo` (also under nccl): results are
Python objects on the host, and that group's timeout (``wait_timeout_min``) covers a slow rank.

Progress: each rank adds its finished images to a counter in the process group's store; rank 0's bar reads
it, so the bar shows the whole folder (:func:`folder_progress`).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from cellseg_deploy.errors import CheckFailed, DataError, UserError

if TYPE_CHECKING:  # torch is imported only by a run that is distributed
    from cellseg_deploy.distributed import DistInfo

T = TypeVar("T")

__all__ = [
    "finish",
    "folder_progress",
    "gather_to_main",
    "launched",
    "my_share",
    "rank_device",
    "rank_threads",
    "result_from_main",
    "session",
    "start",
]


def launched() -> bool:
    """True when ``torchrun`` started this process as one of several (``WORLD_SIZE`` above 1)."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def start(device: str, timeout_min: float = 30.0) -> DistInfo:
    """Join the ``torchrun`` process group for a ``predict``/``eval`` run (a single-process info otherwise).

    ``device`` ``"cpu"`` -> gloo; ``"cuda"``/``"cuda:N"`` -> nccl on ``cuda:LOCAL_RANK``. ``timeout_min`` is
    the group's collective timeout and the wait for the slowest rank's share.
    """
    from cellseg_deploy.distributed import init_distributed

    device_type = "cuda" if device.startswith("cuda") else "cpu"
    return init_distributed(device_type, timeout_min=timeout_min, wait_timeout_min=timeout_min)


def finish(info: DistInfo) -> None:
    """Leave the process group :func:`start` joined (no-op in a single process)."""
    from cellseg_deploy.distributed import cleanup

    cleanup(info)


@contextlib.contextmanager
def session(device: str) -> Iterator[DistInfo | None]:
    """The process group of a ``torchrun`` launch for the block (:func:`start`, then :func:`finish` however
    the block ends); ``None`` in a process that ``torchrun`` did not start as one of several."""
    if not launched():
        yield None
        return
    info = start(device)
    try:
        yield info
    finally:
        finish(info)


def rank_device(info: DistInfo | None, device: str) -> str:
    """The device of this rank: ``cuda:LOCAL_RANK`` for a CUDA run of several processes, else ``device``."""
    if info is not None and info.enabled and device.startswith("cuda"):
        return f"cuda:{info.local_rank}"
    return device


def rank_threads(info: DistInfo | None, threads: int | None, device: str) -> int | None:
    """CPU threads of this rank's runner: ``threads`` when given; in a CPU run of several processes on one
    machine, this machine's usable cores divided among them (each process is one CPU slice); else ``None``
    (the backend's default)."""
    if threads is not None or info is None or not info.enabled or device.startswith("cuda"):
        return threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, info.local_world_size))


def my_share(items: Sequence[T], info: DistInfo) -> list[tuple[int, T]]:
    """``(index in items, item)`` of this rank's images: every ``world_size``-th from ``rank`` (neighbouring
    images, often of similar size, go to different ranks)."""
    return [(i, items[i]) for i in range(info.rank, len(items), info.world_size)]


def _payload_error(exc: BaseException, info: DistInfo) -> dict[str, Any]:
    kind = "usage" if isinstance(exc, UserError) and not isinstance(exc, CheckFailed) else "failed"
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return {"error": f"rank {info.rank}: {first}", "kind": kind}


def gather_to_main(info: DistInfo, work: Callable[[], T]) -> list[T] | None:
    """Run ``work()`` on every rank; rank 0 gets every rank's value (index = rank), the others ``None``.

    A rank whose ``work`` raised still joins the gather with its error; then every rank raises: the failed
    rank its own exception, the others one naming the failed rank (:class:`DataError` when that was a usage
    or data error such as ``--strict``, :class:`CheckFailed` otherwise), and nothing is written.
    """
    import torch.distributed as dist

    error: BaseException | None = None
    try:
        payload: Any = {"value": work()}
    except Exception as exc:  # sent to rank 0 so that it names this rank, then raised again below
        error = exc
        payload = _payload_error(exc, info)
    gathered: list[Any] | None = [None] * info.world_size if info.is_main else None
    dist.gather_object(payload, gathered, dst=0, group=info.wait_group)
    failed = [p for p in gathered or [] if "error" in p]
    verdict: list[Any] = [failed[0] if failed else None] if info.is_main else [None]
    dist.broadcast_object_list(verdict, src=0, group=info.wait_group)  # every rank learns of a failure
    if error is not None:
        raise error
    if verdict[0] is not None:
        cls = DataError if verdict[0]["kind"] == "usage" else CheckFailed
        raise cls(f"{verdict[0]['error']}; nothing was written")
    return [p["value"] for p in gathered] if gathered is not None else None


def result_from_main(info: DistInfo, work: Callable[[], T]) -> T:
    """``work()`` on rank 0 (writing files, scoring), its value on every rank; rank 0's error on every rank."""
    import torch.distributed as dist

    box: list[Any] = [None]
    error: BaseException | None = None
    if info.is_main:
        try:
            box[0] = {"value": work()}
        except Exception as exc:
            error = exc
            box[0] = _payload_error(exc, info)
    dist.broadcast_object_list(box, src=0, group=info.wait_group)
    if error is not None:
        raise error
    if "error" in box[0]:
        cls = DataError if box[0]["kind"] == "usage" else CheckFailed
        raise cls(box[0]["error"])
    return box[0]["value"]


@contextlib.contextmanager
def folder_progress(
    total: int, enabled: bool, desc: str, info: DistInfo | None
) -> Iterator[Callable[[], None]]:
    """A ``tick()`` to call once per finished image, and a tqdm bar over all ``total`` images on rank 0.

    In one process the bar counts this process's ticks; across ranks every tick adds to a counter in the
    process group's store, which rank 0's bar polls (no collective in the loop, so no rank waits on another).
    """
    distributed = info is not None and info.enabled
    store = _store() if distributed else None
    show = enabled and (info is None or info.is_main)
    bar: Any = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True)
    if store is None:
        try:
            yield (lambda: bar.update(1)) if bar is not None else (lambda: None)
        finally:
            if bar is not None:
                bar.close()
        return
    key = f"cellseg-deploy/{desc}/done"
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.5):
            bar.n = int(store.add(key, 0))
            bar.refresh()

    poller = threading.Thread(target=poll, daemon=True) if bar is not None else None
    if poller is not None:
        poller.start()
    try:
        yield lambda: store.add(key, 1)
    finally:
        stop.set()
        if poller is not None:
            poller.join()
            bar.n = int(store.add(key, 0))
            bar.close()


def _store() -> Any:
    """The process group's key-value store (``None`` when this torch does not expose it)."""
    try:
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_store()
    except Exception:  # a private API: without it each rank shows its own count only
        return None
