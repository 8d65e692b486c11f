"""The pipelined loop over images: decoding, inference and post-processing overlap, results in input order.

Every loop over images (``predict``, ``eval``, ``parity``, ``bench --mode throughput``) does three things
per image: *decode* (read the TIFF, check its size), *infer* (the runner) and *finish* (the shared
post-processing: paste, threshold, RLE; and the crop of a padded image). :func:`run_pipeline` runs them as
three stages connected by bounded windows:

```
 items ─▶ decode (host pool) ─▶ infer (inference pool, ``concurrency`` calls) ─▶ finish (host pool) ─▶ caller
          at most ``workers + depth``      at most ``concurrency + depth``         at most ``workers + depth``
```

Each stage keeps a window of at most that many submitted items and hands them on in submission order, so
results come out in input order, whatever finishes first, and memory holds a fixed number of images however
long the folder (the whole pipeline: at most ``2 * (workers + depth) + batch * (concurrency + depth)``
images). The stage functions are the same ones the sequential loop calls one after another
(:data:`SEQUENTIAL`: ``workers=0``, everything in the calling thread), so both loops write the same bytes.

Overlap on the CPU comes from work that releases the GIL: OpenCV decoding and pasting, numpy, pycocotools'
RLE encoding, and the backends' own inference threads. Python-level work does not overlap with anything.

Failures stay per image: an exception of any stage is captured with its item and handed to the caller in
order (:class:`Outcome`; :meth:`Outcome.get` raises it again), so :class:`~cellseg_deploy.evaluation.predict.
ImageFailures` classifies it exactly as in the sequential loop. A failed batch call is retried one image at
a time, so a batch names its bad image.
"""

from __future__ import annotations

import copy
import queue
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from cellseg_deploy.backends.base import Runner
from cellseg_deploy.errors import UserError

T = TypeVar("T")
I = TypeVar("I")  # noqa: E741  (an input item)

CONCURRENT_RUNNERS: tuple[str, ...] = ("onnx", "openvino")
"""Runners that take several inference calls at once: ONNX Runtime's ``session.run`` is thread-safe; an
OpenVINO compiled model gets one infer request per call in flight (:func:`inference_handles`)."""


@dataclass(frozen=True)
class PipelineSettings:
    """How a loop over images runs.

    Attributes:
        workers: host threads for decoding and post-processing; ``0``: the sequential loop (every step in
            the calling thread, one image at a time).
        depth: items each stage may hold beyond those being worked on (the bounded queues' slack).
        batch: images per inference call (``Runner.infer_batch``); ``> 1`` only for runners that batch.
        concurrency: inference calls in flight at once (:data:`CONCURRENT_RUNNERS`; OpenVINO then wants as
            many streams, see ``num_streams``).
    """

    workers: int = 2
    depth: int = 2
    batch: int = 1
    concurrency: int = 1

    def __post_init__(self) -> None:
        for name, low in (("workers", 0), ("depth", 0), ("batch", 1), ("concurrency", 1)):
            if getattr(self, name) < low:
                raise UserError(f"pipeline {name} must be at least {low}, got {getattr(self, name)}")
        if self.workers == 0 and self.concurrency > 1:
            raise UserError("--concurrency above 1 needs the pipelined loop (--workers 1 or more)")

    @property
    def sequential(self) -> bool:
        """True for the plain loop: read, infer, post-process, next."""
        return self.workers == 0

    def max_images_in_flight(self) -> int:
        """Upper bound on images held by the pipeline at once (decoded and not yet handed to the caller)."""
        if self.sequential:
            return self.batch
        host = self.workers + self.depth
        return 2 * host + self.batch * (self.concurrency + self.depth) + 1

    def runner_options(self, runner_name: str) -> dict[str, Any]:
        """The runner options this loop needs from a ``runner_name`` runner it drives: OpenVINO runs
        concurrent infer requests in parallel only with as many streams (it compiles one by default), so
        ``concurrency > 1`` without them would queue the calls and measure one stream."""
        if runner_name == "openvino" and self.concurrency > 1:
            return {"num_streams": self.concurrency}
        return {}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return {
            "workers": self.workers,
            "depth": self.depth,
            "batch": self.batch,
            "concurrency": self.concurrency,
            "sequential": self.sequential,
        }


SEQUENTIAL = PipelineSettings(workers=0, depth=0)
"""The plain loop, one image at a time in the calling thread."""


@dataclass
class Outcome(Generic[T]):
    """A stage's result for one item: its value, or the exception it raised (raised again by :meth:`get`)."""

    value: T | None = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def get(self) -> T:
        """The value; the stage's exception when it failed."""
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]


def capture(fn: Callable[..., T], *args: Any) -> Outcome[T]:
    """``fn(*args)`` as an :class:`Outcome` (``Exception``s captured; interruptions propagate)."""
    try:
        return Outcome(value=fn(*args))
    except Exception as exc:
        return Outcome(error=exc)


Submit = Callable[..., "Future[Any]"]


def _run_now(fn: Callable[..., Any], *args: Any) -> Future[Any]:
    """``submit`` of the sequential loop: run at once in the calling thread."""
    future: Future[Any] = Future()
    future.set_result(fn(*args))
    return future


def ordered_map(fn: Callable[[I], T], items: Iterable[I], submit: Submit, window: int) -> Iterator[T]:
    """``fn(item)`` for every item, in input order, with at most ``window`` items submitted and not yet
    yielded (``fn`` must not raise: wrap it with :func:`capture`). The bound is what keeps memory flat."""
    pending: deque[Future[T]] = deque()
    source = iter(items)
    exhausted = False
    try:
        while True:
            while not exhausted and len(pending) < max(window, 1):
                try:
                    item = next(source)
                except StopIteration:
                    exhausted = True
                    break
                pending.append(submit(fn, item))
            if not pending:
                return
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


def _grouped(items: Iterable[T], size: int) -> Iterator[list[T]]:
    group: list[T] = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def inference_handles(runner: Runner, concurrency: int) -> list[Runner]:
    """``concurrency`` runners to call at the same time, all sharing ``runner``'s loaded model.

    ONNX Runtime: the runner itself (a session runs several calls at once). OpenVINO: shallow copies that
    each own an infer request of the one compiled model (an infer request takes one call at a time).
    Other runners keep mutable state per call and are refused above 1.

    Raises:
        UserError: ``concurrency > 1`` for a runner not in :data:`CONCURRENT_RUNNERS`.
    """
    if concurrency == 1:
        return [runner]
    if runner.name not in CONCURRENT_RUNNERS:
        raise UserError(
            f"runner {runner.name!r} runs one inference call at a time; --concurrency {concurrency} needs one "
            f"of {', '.join(CONCURRENT_RUNNERS)} (use --concurrency 1)"
        )
    runner.load()
    if runner.name != "openvino":
        return [runner] * concurrency
    handles = [runner]
    compiled = runner.compiled  # type: ignore[attr-defined]
    for _ in range(concurrency - 1):
        clone = copy.copy(runner)  # same compiled model, core and metadata; closing stays the original's
        clone.request = compiled.create_infer_request()  # type: ignore[attr-defined]
        handles.append(clone)
    return handles


def check_batching(runner: Runner, batch: int) -> None:
    """Raise :class:`UserError` for ``batch > 1`` on a runner that only loops over the images of a call."""
    if batch > 1 and type(runner)._infer_batch is Runner._infer_batch:
        raise UserError(
            f"runner {runner.name!r} runs images one at a time, so --batch {batch} would only loop over them; "
            "use --batch 1"
        )


def run_pipeline(
    items: Iterable[I],
    decode: Callable[[I], Any],
    infer: Callable[[Runner, Sequence[Any]], Sequence[Any]],
    finish: Callable[[I, Any, Any], T],
    settings: PipelineSettings,
    handles: Sequence[Runner],
) -> Generator[tuple[I, Outcome[T]], None, None]:
    """Decode, infer and finish every item; ``(item, outcome)`` in input order (see the module docstring).

    Args:
        items: what to process (file entries); read lazily, at most a window ahead.
        decode: ``item -> image`` (host pool).
        infer: ``(runner, [image, ...]) -> [raw output, ...]``, one output per image (inference pool; the
            runner is one of ``handles``, each used by one call at a time).
        finish: ``(item, image, raw output) -> result`` (host pool).
        settings: :class:`PipelineSettings`.
        handles: runners to infer with, at least ``settings.concurrency`` of them
            (:func:`inference_handles`).

    Yields:
        ``(item, Outcome)``: the result, or the first exception any stage raised for that item.
    """
    free: queue.SimpleQueue[Runner] = queue.SimpleQueue()
    for handle in handles[: settings.concurrency]:
        free.put(handle)

    def decode_one(item: I) -> tuple[I, Outcome[Any]]:
        return item, capture(decode, item)

    def infer_group(group: list[tuple[I, Outcome[Any]]]) -> list[tuple[I, Outcome[Any], Outcome[Any]]]:
        ready = [i for i, (_, image) in enumerate(group) if image.ok]
        outputs: dict[int, Outcome[Any]] = {}
        if ready:
            runner = free.get()
            try:
                batch = capture(infer, runner, [group[i][1].value for i in ready])
                if batch.ok and len(batch.value or ()) == len(ready):
                    outputs = {i: Outcome(value=v) for i, v in zip(ready, batch.value or (), strict=True)}
                elif len(ready) == 1:
                    outputs = {ready[0]: batch}
                else:  # one image of the batch broke the call: run each alone so the failure names it
                    outputs = {
                        i: capture(lambda im: infer(runner, [im])[0], group[i][1].value) for i in ready
                    }
            finally:
                free.put(runner)
        return [
            (item, image, outputs.get(i, Outcome(error=image.error))) for i, (item, image) in enumerate(group)
        ]

    def finish_one(entry: tuple[I, Outcome[Any], Outcome[Any]]) -> tuple[I, Outcome[T]]:
        item, image, output = entry
        if not output.ok:
            return item, Outcome(error=output.error)
        result = capture(finish, item, image.value, output.value)
        return item, result

    if settings.sequential:
        decoded = ordered_map(decode_one, items, _run_now, 1)
        inferred = ordered_map(infer_group, _grouped(decoded, settings.batch), _run_now, 1)
        yield from ordered_map(finish_one, (e for g in inferred for e in g), _run_now, 1)
        return
    host_window = settings.workers + settings.depth
    with (
        ThreadPoolExecutor(settings.workers, thread_name_prefix="cellseg-host") as host,
        ThreadPoolExecutor(settings.concurrency, thread_name_prefix="cellseg-infer") as engine,
    ):
        try:
            decoded = ordered_map(decode_one, items, host.submit, host_window)
            inferred = ordered_map(
                infer_group,
                _grouped(decoded, settings.batch),
                engine.submit,
                settings.concurrency + settings.depth,
            )
            yield from ordered_map(finish_one, (e for g in inferred for e in g), host.submit, host_window)
        finally:
            host.shutdown(wait=True, cancel_futures=True)
            engine.shutdown(wait=True, cancel_futures=True)
