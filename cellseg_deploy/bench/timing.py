"""Wall-clock timers that are honest about asynchronous device work.

Everything the benchmark reports is host wall-clock time (:func:`time.perf_counter`). On a GPU, kernels run
asynchronously: a timer that stops while the device is still busy under-reports, and one that starts while
earlier work is still queued over-reports. :class:`Stopwatch` therefore calls a *synchronise* function (for
CUDA, :func:`torch.cuda.synchronize`) before it starts and before it stops, so each interval contains exactly
the device work issued inside it. On the CPU the synchronise function does nothing.

CUDA events (``torch.cuda.Event(enable_timing=True)``) time the device stream alone; the benchmark measures
pipelines whose decode, pre- and post-processing run on the host, so it uses synchronised wall-clock time for
every stage and :class:`CudaEventTimer` only to report the device-side time of a call next to it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

SyncFn = Callable[[], None]


def _no_sync() -> None:
    return None


def device_synchronizer(device: str) -> SyncFn:
    """A function that waits for all queued work on ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"``).

    For the CPU it does nothing. For CUDA it is :func:`torch.cuda.synchronize` on that device; torch is
    imported only in that case.
    """
    if not device.startswith("cuda"):
        return _no_sync
    import torch

    if not torch.cuda.is_available():
        return _no_sync

    def sync() -> None:
        torch.cuda.synchronize(device)

    return sync


class Stopwatch:
    """Named intervals of host wall-clock time, synchronised with the device at both ends.

    Example::

        sw = Stopwatch(device_synchronizer("cuda"))
        with sw.interval("network"):
            run()
        sw.durations["network"]      # seconds

    Repeated intervals with the same name add up.
    """

    def __init__(self, sync: SyncFn | None = None) -> None:
        self.sync = sync or _no_sync
        self.durations: dict[str, float] = {}

    @contextmanager
    def interval(self, name: str) -> Iterator[None]:
        """Time the body (seconds), synchronising the device before the start and before the stop."""
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.durations[name] = self.durations.get(name, 0.0) + (time.perf_counter() - start)

    def total(self) -> float:
        """Sum of every interval, seconds."""
        return sum(self.durations.values())


def time_calls(
    fn: Callable[[], Any], *, iters: int, warmup: int = 0, sync: SyncFn | None = None
) -> list[float]:
    """Call ``fn`` ``warmup`` times untimed, then ``iters`` times timed; returns seconds per call."""
    if iters < 1:
        raise ValueError(f"iters must be at least 1, got {iters}")
    sync = sync or _no_sync
    for _ in range(warmup):
        fn()
    sync()
    out: list[float] = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


class CudaEventTimer:
    """Device-side time of the work issued between :meth:`start` and :meth:`stop` on one GPU's stream.

    Args:
        device: the GPU whose work is timed (``"cuda"`` means ``cuda:0``, ``"cuda:N"``, or a
            ``torch.device``). The events record on that device's *current* stream, the one a runner that
            made the device current (the ``torch`` runner does) issues its kernels on; recording on whatever
            device happens to be current would time an idle GPU 0 while ``cuda:1`` works.

    Needs torch with CUDA. :meth:`elapsed_s` waits for the stop event, so call it after the timed region.
    The result excludes host work (Python, decode, post-processing) that overlaps the device work.
    """

    def __init__(self, device: Any = "cuda") -> None:
        import torch

        from cellseg_deploy.backends.devices import torch_device

        self.device = torch_device(device)
        if self.device.type != "cuda":
            raise ValueError(f"CudaEventTimer times a CUDA device, got {device!r}")
        if not torch.cuda.is_available():
            raise RuntimeError("CudaEventTimer needs a CUDA device")
        self._torch = torch
        with torch.cuda.device(self.device):  # events belong to the device current at their creation
            self._start = torch.cuda.Event(enable_timing=True)
            self._stop = torch.cuda.Event(enable_timing=True)

    def _stream(self) -> Any:
        return self._torch.cuda.current_stream(self.device)

    def start(self) -> None:
        """Record the start event on the device's current stream."""
        self._start.record(self._stream())

    def stop(self) -> None:
        """Record the stop event on the device's current stream."""
        self._stop.record(self._stream())

    def elapsed_s(self) -> float:
        """Seconds of device time between the two events (waits for the stop event)."""
        self._stop.synchronize()
        return float(self._start.elapsed_time(self._stop)) / 1e3
