"""The latency measurement: several engines, interleaved on the same images, stage by stage.

One *sample* is one call of the whole pipeline on one image (or one batch), timed on the host:

``decode`` (:func:`~cellseg_deploy.data.io.read_image` of the TIFF file; after the warm-up its bytes sit in
the OS page cache, so this is decoding, not disk) -> ``runner.infer``, split into the runner's own
``preprocess`` and ``network`` timings (see :class:`~cellseg_deploy.structures.Detections`) and
``infer_other``, the rest of the call (output conversion and device-to-host copies; for staged runners the
FP32 host steps between the stages) -> the shared :func:`~cellseg_deploy.postprocess.postprocess`
(``paste`` and ``rle``). ``other`` is what remains: detection selection and Python overhead. ``total`` is the
end-to-end wall time of the sample; the stages add up to it exactly. Finer timings a runner reports (one per
stage and host step of a staged runner) are kept as ``substages``.

Engines are named by runner, optionally with a precision: ``torch``, ``trt:fp16``, ``openvino:bf16``
(:func:`parse_engine_specs`); without one they run at :attr:`BenchSettings.precision`.

Fairness: the engines run in turn on the same image before moving on (A, B, A, B, ...); the order flips
every round (A, B then B, A) so that neither engine always runs on a cache warmed by the other or always
first after a pause, and a slow drift of the machine falls on every engine alike. Warm-up rounds, interleaved
the same way, are excluded. By default (:attr:`BenchSettings.isolation` ``"process"``) each engine lives in a
process of its own (:mod:`cellseg_deploy.bench.engine_process`) that times its samples and otherwise waits on
a pipe: in one process the runtimes' thread pools, allocators and per-model arenas sit side by side, and an
engine's time then depended on which others were in the run. ``"shared"`` loads every engine into the
benchmark's process instead. On CUDA the
device is synchronised before each sample starts and after inference, so no sample carries another's
queued kernels; the outputs reach post-processing as host arrays, so every device copy is inside the sample.

Two modes (:attr:`BenchSettings.mode`). ``latency`` (the default) is the above: one sample at a time, engines
interleaved. ``throughput`` runs each engine alone through the pipelined loop that ``predict`` and ``eval``
use (:mod:`cellseg_deploy.evaluation.pipeline`: decoding, inference and post-processing overlap, with
``concurrency`` inference calls in flight and ``batch`` images per call) over the workload, and reports
images per second on the wall clock of the measured passes (``throughput.images_per_s``, also the tables'
throughput column) with the latency each image saw under that load (decode start to post-processing end,
queue waits included, in ``other``). Warm-up passes are excluded there too.

Memory: with ``isolation="shared"`` the latency process holds every engine at once, so its high-water mark
is reported as such (``process_peak_rss_mb``); each engine's own peak comes from a fresh process
(:mod:`cellseg_deploy.bench.memory`), run after the latency phase. That process also times the engine alone
over as many rounds as the run measured: ``alone.run_over_alone`` (the run's p50 over the p50 alone) shows
how much the company of the other engines changed its time, and the run warns past
:data:`ALONE_TOLERANCE`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from cellseg_deploy.backends import Runner, create_runner, get_runner_class
from cellseg_deploy.bench.engine_process import EngineProcess
from cellseg_deploy.bench.environment import capture_environment, load_average
from cellseg_deploy.bench.memory import peak_rss_mb, probe_memory
from cellseg_deploy.bench.models import EngineModel
from cellseg_deploy.bench.profile import probe_profile
from cellseg_deploy.bench.sample import STAGES, Sample, SamplePipeline, stage_times
from cellseg_deploy.bench.stats import summarize
from cellseg_deploy.bench.timing import device_synchronizer
from cellseg_deploy.bench.workload import Workload
from cellseg_deploy.errors import ConfigError, UserError, naming_model_output
from cellseg_deploy.evaluation.pipeline import PipelineSettings, check_batching
from cellseg_deploy.postprocess import PostprocessConfig
from cellseg_deploy.structures import Detections

SCHEMA = "cellseg-deploy/bench/1"
MODES: tuple[str, ...] = ("latency", "throughput")
ISOLATIONS: tuple[str, ...] = ("process", "shared")
"""Latency mode: every engine in a process of its own (the default), or all in the benchmark's process."""

DEFINITIONS: dict[str, str] = {
    "total": "end-to-end host wall time of one sample: decode + infer + post-process (device synchronised at both ends)",
    "decode": "read_image on the TIFF file (bytes in the OS page cache after warm-up): TIFF decoding and RGBA->RGB",
    "preprocess": "the runner's 'preprocess' timing: host-side input conversion and, on a GPU, the host-to-device copy "
    "(single-graph runners normalise and resize inside the network)",
    "network": "the runner's 'network' timing: the model until its outputs exist, synchronised with the device "
    "(single graph: resize, normalisation, backbone, RPN, heads, NMS; staged runners: the three stage graphs)",
    "infer_other": "the rest of runner.infer: output conversion and device-to-host copies (torch), and for staged "
    "runners the FP32 host steps between the stages (rpn_post, box_post, mask_post in substages)",
    "paste": "postprocess: pasting each mask into its box window at the original resolution (host, OpenCV)",
    "rle": "postprocess: COCO RLE encoding of each pasted mask (host, pycocotools)",
    "other": "total minus the stages above: detection selection and Python overhead",
    "substages": "the runner's finer timings (staged runners: each stage graph, inside network, and each host "
    "step, inside infer_other); not added to the total",
    "throughput_ips": "latency mode: images per second of sequential, single-stream execution: images / sum of "
    "sample times; throughput mode: images per second on the wall clock of the measured passes "
    "(throughput.images_per_s)",
    "throughput": "throughput mode only: images per second of the pipelined loop at the given concurrency, batch "
    "and host workers, measured passes only, one engine at a time; the latency columns are then per image "
    "under that load (decode start to post-processing end, queue waits in 'other')",
    "speedup_vs_torch": "mean (and p50) total latency of the engine named 'torch' divided by this engine's, same run",
    "process_peak_rss_mb": "RSS high-water mark of the benchmark's process: with --isolation shared all engines "
    "loaded together, the interpreter, every library, the workload; with --isolation process only the driver",
    "run_process_peak_rss_mb": "--isolation process: RSS high-water mark of the engine's own process in the run",
    "memory": "per-engine memory from a fresh process running that engine alone (see cellseg_deploy.bench.memory)",
    "alone": "the engine alone in that fresh process, latency mode: p50 of as many timed rounds as the run measured "
    "(after the same warm-up), and the run's p50 over it",
    "profile": "--profile: the engine alone in another fresh process with its runtime's profiler on (after every "
    "timed phase): mean ms per call of its layers by model part and precision (see cellseg_deploy.bench.profile)",
    "cuda_torch_peak_allocated_mb": "torch.cuda.max_memory_allocated during this engine's samples: torch's "
    "allocator only (not ONNX Runtime or TensorRT memory)",
    "cuda_events_infer_ms": "device time on torch's current stream during infer (CUDA events; torch runner only)",
}


@dataclass(frozen=True)
class BenchSettings:
    """How to measure.

    Attributes:
        engines: engine labels (``runner`` or ``runner:precision``), in the order they run in even rounds.
        warmup: untimed rounds before measuring (each round runs every engine on every image).
        iters: measured rounds; exclusive with ``seconds``.
        seconds: measure whole rounds until this many seconds have passed (at least one round).
        device: ``"cpu"`` or ``"cuda[:N]"``.
        precision: precision of engines whose label names none (``fp32``, ``fp16``, ``bf16``, ``int8``).
        threads: intra-op CPU threads given to every runner (``None``: each backend's default).
        batch: images per call; ``> 1`` only for runners that really batch (their own ``_infer_batch``).
        memory: also measure each engine's peak memory in a fresh process.
        memory_rounds: passes over the workload in each memory probe of throughput mode, and the fewest in
            each profile (latency mode's memory probes time as many rounds as the run measured, its profiles
            as many up to :data:`PROFILE_MAX_ROUNDS`).
        isolation: latency mode: ``"process"`` runs each engine in a process of its own, driven in the
            interleaved order (:mod:`cellseg_deploy.bench.engine_process`); ``"shared"`` loads every engine
            into the benchmark's process (where the runtimes' thread pools, allocators and arenas live side by
            side and can slow each other down).
        block: latency mode: measured rounds each engine runs back to back before the next engine's turn
            (1: the engines alternate on every image); the order of the engines flips every block.
        settle: latency mode: untimed calls of each engine before each of its blocks.
        profile: also profile each engine whose runner can time its layers, alone in a fresh process
            (:mod:`cellseg_deploy.bench.profile`): by model part and precision, in ``engines[e].profile``.
        post: the post-processing settings (the same for every engine).
        runner_options: extra backend options per runner name (``{"trt": {"cuda_graphs": True}}``).
        progress: show a tqdm progress bar.
        mode: ``"latency"`` (one sample at a time, engines interleaved) or ``"throughput"`` (each engine
            alone through the pipelined loop; see the module docstring).
        concurrency: throughput mode: inference calls in flight (onnx, openvino; openvino gets as many
            streams unless ``runner_options`` set ``num_streams``).
        workers: throughput mode: host threads decoding and post-processing beside inference (``None``:
            predict's default, 2 on CUDA or with ``concurrency > 1``, else 0).
    """

    engines: tuple[str, ...]
    warmup: int = 3
    iters: int | None = 20
    seconds: float | None = None
    device: str = "cpu"
    precision: str = "fp32"
    threads: int | None = None
    batch: int = 1
    memory: bool = True
    memory_rounds: int = 2
    profile: bool = False
    isolation: str = "process"
    block: int = 1
    settle: int = 0
    post: PostprocessConfig = field(default_factory=PostprocessConfig)
    runner_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    progress: bool = True
    mode: str = "latency"
    concurrency: int = 1
    workers: int | None = None

    @property
    def loop(self) -> PipelineSettings:
        """The pipelined loop of throughput mode (its workers, batch and concurrency)."""
        return PipelineSettings(workers=self.workers or 0, batch=self.batch, concurrency=self.concurrency)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode == "throughput" and self.workers is None:  # predict's default (cli/evaluate.py)
            object.__setattr__(
                self, "workers", 2 if self.device.startswith("cuda") or self.concurrency > 1 else 0
            )
        if self.concurrency < 1 or (self.workers is not None and self.workers < 0):
            raise ConfigError(
                f"--concurrency must be at least 1 and --workers 0 or more, got {self.concurrency}, {self.workers}"
            )
        if self.mode == "latency" and (self.concurrency > 1 or self.workers is not None):
            raise ConfigError("--concurrency and --workers belong to --mode throughput")
        if self.block < 1 or self.settle < 0:
            raise ConfigError(
                f"--block must be at least 1 and --settle 0 or more, got {self.block}, {self.settle}"
            )
        if self.isolation not in ISOLATIONS:
            raise ConfigError(f"--isolation must be one of {', '.join(ISOLATIONS)}, got {self.isolation!r}")
        if self.mode == "throughput" and self.workers == 0 and self.concurrency > 1:
            raise ConfigError("--concurrency above 1 needs host workers (--workers 1 or more)")
        if not self.engines:
            raise ConfigError("no engine to benchmark; pass --engine torch,onnx,...")
        if len(set(self.engines)) != len(self.engines):
            raise ConfigError(f"an engine is listed twice: {list(self.engines)}")
        if self.warmup < 0:
            raise ConfigError(f"warm-up rounds must be 0 or more, got {self.warmup}")
        if (self.iters is None) == (self.seconds is None):
            raise ConfigError("give exactly one of iterations (--iters) and a time budget (--seconds)")
        if self.iters is not None and self.iters < 1:
            raise ConfigError(f"iterations must be at least 1, got {self.iters}")
        if self.seconds is not None and not self.seconds > 0:
            raise ConfigError(f"--seconds must be positive, got {self.seconds}")
        if self.batch < 1:
            raise ConfigError(f"batch size must be at least 1, got {self.batch}")
        if self.memory_rounds < 1:
            raise ConfigError(f"memory rounds must be at least 1, got {self.memory_rounds}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        d = asdict(self)
        d["engines"] = list(self.engines)
        return d


def split_label(label: str) -> tuple[str, str | None]:
    """``"trt:fp16"`` -> ``("trt", "fp16")``; ``"torch"`` -> ``("torch", None)``."""
    runner, _, precision = label.partition(":")
    return runner, precision or None


def parse_engine_specs(spec: str) -> tuple[str, ...]:
    """``"torch,trt:fp16"`` -> engine labels, each runner known and each precision one the runner supports.

    Raises:
        UserError: no engine, an unknown runner, an unsupported precision or a repeated label (one line).
    """
    from cellseg_deploy.backends import get_runner_class, list_runners

    labels = tuple(s.strip() for s in spec.split(",") if s.strip())
    if not labels:
        raise UserError("no engine given; expected one or more of " + ", ".join(list_runners()))
    for label in labels:
        runner, precision = split_label(label)
        cls = get_runner_class(runner)
        if precision is not None and precision not in cls.precisions:
            raise UserError(
                f"engine {label!r}: runner {runner!r} does not support precision {precision!r}; "
                f"expected one of {list(cls.precisions)}"
            )
    if len(set(labels)) != len(labels):
        raise UserError(f"an engine is listed twice: {list(labels)}")
    return labels


def parse_runner_options(
    items: list[str] | tuple[str, ...], labels: tuple[str, ...]
) -> dict[str, dict[str, str]]:
    """``["trt.cuda_graphs=true"]`` -> ``{"trt": {"cuda_graphs": "true"}}`` (values stay strings; each runner
    parses its own). The runner must be one of the benchmarked engines'.

    Raises:
        UserError: an item not of the form ``RUNNER.KEY=VALUE``, or a runner that is not benchmarked.
    """
    runners = {split_label(label)[0] for label in labels}
    out: dict[str, dict[str, str]] = {}
    for item in items:
        target, sep, value = item.partition("=")
        runner, dot, key = target.partition(".")
        if not sep or not dot or not runner or not key:
            raise UserError(f"--option expects RUNNER.KEY=VALUE (e.g. trt.cuda_graphs=true), got {item!r}")
        if runner not in runners:
            raise UserError(
                f"--option {item!r}: runner {runner!r} is not benchmarked (--engine {','.join(labels)})"
            )
        out.setdefault(runner, {})[key] = value
    return out


def _engine_runner(label: str, models: dict[str, EngineModel], settings: BenchSettings) -> Runner:
    """The (not yet loaded) runner of one engine label, with the benchmark's device, precision and threads."""
    runner_name, precision = split_label(label)
    return create_runner(
        runner_name,
        models[label].path,
        device=settings.device,
        precision=precision or settings.precision,
        threads=settings.threads,
        options=_runner_options(runner_name, settings),
    )


def _batches(n_images: int, batch: int) -> list[tuple[int, ...]]:
    """Workload indices grouped into full batches (the workload is cycled to fill the last one)."""
    if batch == 1:
        return [(i,) for i in range(n_images)]
    n_batches = max(1, -(-n_images // batch))
    flat = [i % n_images for i in range(n_batches * batch)]
    return [tuple(flat[k : k + batch]) for k in range(0, len(flat), batch)]


def run_benchmark(
    settings: BenchSettings,
    models: dict[str, EngineModel],
    workload: Workload,
) -> dict[str, Any]:
    """Measure every engine in ``settings.engines`` on ``workload`` and return the result (JSON-ready dict).

    The result holds ``schema``, ``created``, ``settings``, ``workload``, ``environment`` (captured after the
    engines loaded, so thread settings are the ones in force), ``load_average_after``, ``definitions`` (what
    each number includes), ``engines`` (per engine: ``info``, ``model``, ``latency`` summary of the totals,
    ``stages`` and ``substages`` summaries, ``stage_mean_ms``, ``detections_per_image``,
    ``instances_per_image``, ``per_image``, ``samples_ms``, ``memory``, ``alone`` (latency mode with memory
    probes: ``n``, ``p50_ms`` alone and ``run_over_alone``; else None), ``speedup_vs_torch``),
    ``process_peak_rss_mb`` and ``warnings``. Times are milliseconds.

    Raises:
        UserError: a runner that cannot load, an engine without a model, ``--batch`` on a runner that does
            not batch.
    """
    missing = [e for e in settings.engines if e not in models]
    if missing:
        raise UserError(f"no model file for engine(s) {missing}")
    if not workload.images:
        raise UserError("the workload has no images")
    if settings.mode == "throughput":
        return _run_throughput(settings, models, workload)
    sync = device_synchronizer(settings.device)
    batches = _batches(len(workload.images), settings.batch)
    paths = [im.path for im in workload.images]
    load_before = load_average()
    samples: list[Sample] = []
    infos: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        pipelines: dict[str, SamplePipeline | EngineProcess] = {}
        for label in settings.engines:
            if settings.isolation == "process":
                process = stack.enter_context(
                    EngineProcess(_engine_spec(label, models[label], settings, paths, rounds=0))
                )
                infos[label] = process.info
                pipelines[label] = process
                continue
            runner = _engine_runner(label, models, settings)
            stack.enter_context(runner)
            check_batching(runner, settings.batch)
            infos[label] = runner.info()
            pipelines[label] = SamplePipeline(label, runner, settings.post, settings.device, sync)
        environment = capture_environment(settings.device, settings.threads)
        environment["load_average"] = load_before
        total_calls = (
            None
            if settings.iters is None
            else (settings.warmup + settings.iters) * len(batches) * len(pipelines)
            + -(-settings.iters // settings.block) * settings.settle * len(pipelines)
        )
        bar = tqdm(
            total=total_calls,
            desc="bench " + ",".join(settings.engines),
            unit="call",
            disable=not settings.progress,
            leave=False,
        )
        with bar:
            for r in range(settings.warmup):
                for idx in batches:
                    for label in _round_order(settings.engines, r):
                        pipelines[label].run([paths[i] for i in idx], -1, idx)
                        bar.update(1)
            start = time.perf_counter()
            r = 0
            block = 0
            while True:
                count = settings.block if settings.iters is None else min(settings.block, settings.iters - r)
                for label, b, round_index, timed in block_schedule(
                    settings.engines, len(batches), r, count, block, settings.settle
                ):
                    idx = batches[b]
                    sample = pipelines[label].run([paths[i] for i in idx], round_index, idx)
                    if timed:
                        samples.append(sample)
                    bar.update(1)
                r += count
                block += 1
                if settings.iters is not None and r >= settings.iters:
                    break
                if settings.seconds is not None and time.perf_counter() - start >= settings.seconds:
                    break
        measured_s = time.perf_counter() - start
    process_peak = peak_rss_mb()
    engine_peaks = {n: p.peak_rss_mb for n, p in pipelines.items() if isinstance(p, EngineProcess)}
    memory: dict[str, dict[str, Any]] = {}
    if settings.memory:
        # as many timed passes alone as the run measured, so the run/alone ratio compares like numbers
        for label in settings.engines:
            rounds = max(settings.memory_rounds, r)
            memory[label] = probe_memory(
                _engine_spec(label, models[label], settings, paths, rounds, warmup=settings.warmup)
            )
    result = _assemble(settings, models, workload, samples, infos, memory, environment, r, measured_s)
    for label, peak in engine_peaks.items():
        result["engines"][label]["run_process_peak_rss_mb"] = peak
    _add_profiles(result, settings, models, paths, rounds=min(r, PROFILE_MAX_ROUNDS))
    result["process_peak_rss_mb"] = round(process_peak, 1)
    result["load_average_after"] = load_average()
    result["warnings"] = _warnings(result)
    return result


def _round_order(engines: tuple[str, ...], r: int) -> tuple[str, ...]:
    return engines if r % 2 == 0 else tuple(reversed(engines))


def block_schedule(
    engines: tuple[str, ...], n_batches: int, first_round: int, rounds: int, block: int, settle: int
) -> Iterator[tuple[str, int, int, bool]]:
    """The calls of one block of measured rounds: ``(engine, batch index, round, timed)`` in order.

    ``rounds == 1`` and ``settle == 0`` is the plain interleaving: every engine on each batch in turn, the
    engine order flipped from one block to the next. Longer blocks run each engine's ``rounds`` rounds back to
    back (the engines in turn, their order flipped every block), after ``settle`` untimed calls on the first
    batch: the engine then times calls that follow its own, as it would alone, while the alternating blocks
    still spread a drift of the machine over every engine.
    """
    order = _round_order(engines, block)
    if rounds == 1 and settle == 0:
        for b in range(n_batches):
            for label in order:
                yield label, b, first_round, True
        return
    for label in order:
        for _ in range(settle):
            yield label, 0, -1, False
        for r in range(first_round, first_round + rounds):
            for b in range(n_batches):
                yield label, b, r, True


def _runner_options(runner_name: str, settings: BenchSettings) -> dict[str, Any]:
    options = dict(settings.runner_options.get(runner_name, {}))
    if settings.batch > 1:
        options.setdefault("max_batch", settings.batch)
    if settings.mode == "throughput":
        for key, value in settings.loop.runner_options(runner_name).items():
            options.setdefault(key, value)  # what the loop needs, unless the user set it
    return options


def _run_throughput(
    settings: BenchSettings, models: dict[str, EngineModel], workload: Workload
) -> dict[str, Any]:
    """Throughput mode of :func:`run_benchmark`: each engine alone, through the pipelined loop."""
    from cellseg_deploy.data.io import read_image
    from cellseg_deploy.evaluation.pipeline import inference_handles, run_pipeline
    from cellseg_deploy.evaluation.predict import finish_image, infer_images

    pipeline = settings.loop
    paths = [im.path for im in workload.images]
    load_before = load_average()
    samples: list[Sample] = []
    infos: dict[str, dict[str, Any]] = {}
    throughput: dict[str, dict[str, Any]] = {}
    environment: dict[str, Any] = {}
    rounds = 0
    measured_total = 0.0
    for label in settings.engines:
        with _engine_runner(label, models, settings) as runner:
            check_batching(runner, settings.batch)
            handles = inference_handles(runner, settings.concurrency)
            infos[label] = runner.info()
            if not environment:
                environment = capture_environment(settings.device, settings.threads)
                environment["load_average"] = load_before

            def decode(item: tuple[int, int]) -> tuple[Any, float, float]:
                t0 = time.perf_counter()
                image = read_image(paths[item[1]])
                return image, t0, time.perf_counter()

            def infer(handle: Runner, decoded: Any) -> list[tuple[Detections, float]]:
                t0 = time.perf_counter()
                dets = infer_images(handle, [d[0] for d in decoded])
                share = (time.perf_counter() - t0) / len(dets)
                return [(det, share) for det in dets]

            def finish(item: tuple[int, int], decoded: Any, out: Any, name: str = label) -> Sample:
                image, t_in, t_decoded = decoded
                det, infer_s = out
                with naming_model_output(model=models[name].path, image=paths[item[1]].name):
                    inst = finish_image(det, image.shape[:2], settings.post)
                total = time.perf_counter() - t_in
                stages, sub = stage_times([det], t_decoded - t_in, infer_s, total)
                return Sample(name, item[0], (item[1],), total, stages, sub, len(det), len(inst))

            def passes(first: int, count: int | None) -> Any:
                r = first
                while count is None or r < first + count:
                    for i in range(len(paths)):
                        yield (r, i)
                    r += 1

            def run(
                items: Any, until: float | None = None, handles: list[Runner] = handles
            ) -> tuple[list[Sample], float]:
                got: list[Sample] = []
                t0 = time.perf_counter()
                stream = run_pipeline(items, decode, infer, finish, pipeline, handles)
                try:
                    for item, outcome in stream:
                        got.append(outcome.get())
                        bar.update(1)
                        done_pass = item[1] == len(paths) - 1
                        if until is not None and done_pass and time.perf_counter() >= until:
                            break
                finally:
                    stream.close()
                return got, time.perf_counter() - t0

            with tqdm(
                desc=f"bench throughput {label}", unit="img", disable=not settings.progress, leave=False
            ) as bar:
                if settings.warmup:
                    run(passes(-settings.warmup, settings.warmup))
                if settings.iters is not None:
                    got, wall = run(passes(0, settings.iters))
                else:
                    got, wall = run(passes(0, None), until=time.perf_counter() + float(settings.seconds or 0))
            samples.extend(got)
            rounds = max(rounds, len(got) // len(paths))
            measured_total += wall
            throughput[label] = {
                "images_per_s": len(got) / wall if wall > 0 else None,
                "images": len(got),
                "seconds": round(wall, 3),
                **pipeline.to_dict(),
                "inference_handles": len(handles),
            }
    process_peak = peak_rss_mb()
    memory: dict[str, dict[str, Any]] = {}
    if settings.memory:
        for label in settings.engines:
            memory[label] = probe_memory(
                _engine_spec(label, models[label], settings, paths, settings.memory_rounds)
            )
    result = _assemble(
        settings, models, workload, samples, infos, memory, environment, rounds, measured_total
    )
    _add_profiles(result, settings, models, paths)
    for label, entry in result["engines"].items():
        entry["throughput"] = throughput[label]
        entry["latency"]["throughput_ips"] = throughput[label]["images_per_s"]
    if "torch" in result["engines"]:
        ref = throughput["torch"]["images_per_s"]
        for label, entry in result["engines"].items():
            ips = throughput[label]["images_per_s"]
            entry["speedup_vs_torch"] = {"mean": ips / ref if ref else None, "p50": None, "of": "throughput"}
    result["latency_unit"] = "per image, under the throughput load"
    result["timing_method"] = (
        "host wall clock (time.perf_counter); each engine alone through the pipelined loop "
        f"(workers {settings.workers}, concurrency {settings.concurrency}, batch {settings.batch}); warm-up "
        "passes excluded; images per second = measured images / wall time of the measured passes"
    )
    result["process_peak_rss_mb"] = round(process_peak, 1)
    result["load_average_after"] = load_average()
    result["warnings"] = _warnings(result)
    return result


def _engine_spec(
    label: str, model: EngineModel, settings: BenchSettings, paths: list[Path], rounds: int, warmup: int = 0
) -> dict[str, Any]:
    """What a fresh process needs to run one engine as the benchmark does (the memory probe, the profile and
    the engine process all read it)."""
    runner_name, precision = split_label(label)
    return {
        "engine": runner_name,
        "label": label,
        "model_path": str(model.path),
        "device": settings.device,
        "precision": precision or settings.precision,
        "threads": settings.threads,
        "batch": settings.batch,
        "options": _runner_options(runner_name, settings),
        "image_paths": [str(p) for p in paths],
        "rounds": rounds,
        "warmup": warmup,
        "post": asdict(settings.post),
    }


PROFILE_MAX_ROUNDS = 10
"""Profiled rounds at most: layer times scatter from call to call like whole calls do, so the profile of a
latency run averages as many rounds as the run measured, up to this many (the profiler's own cost stays a few
runs' worth)."""


def _add_profiles(
    result: dict[str, Any],
    settings: BenchSettings,
    models: dict[str, EngineModel],
    paths: list[Path],
    rounds: int = 0,
) -> None:
    """``engines[e].profile``: each engine's per-layer profile alone (after every timed phase, so that the
    profiler's cost is in no reported time) over ``max(settings.memory_rounds, rounds)`` rounds;
    ``{"skipped": why}`` for runners without a profiler."""
    for label, entry in result["engines"].items():
        if not settings.profile:
            entry["profile"] = {"skipped": "no --profile"}
            continue
        runner_name, _ = split_label(label)
        if not get_runner_class(runner_name).layer_profiling:
            entry["profile"] = {"skipped": f"runner {runner_name!r} has no per-layer profiler"}
            continue
        calls = max(settings.memory_rounds, rounds)
        spec = _engine_spec(label, models[label], settings, paths, calls, warmup=max(1, settings.warmup))
        entry["profile"] = probe_profile(spec)


ALONE_TOLERANCE = 0.05
"""How far an engine's p50 in the interleaved run may be from its p50 alone before the run warns."""


def _alone(run_p50_ms: float, memory: dict[str, Any] | None) -> dict[str, Any] | None:
    """The engine's p50 alone in a fresh process (the memory probe's timed calls) beside its p50 in the run:
    ``run_over_alone`` above 1 means the company of the other engines slowed it down."""
    alone = (memory or {}).get("alone_latency")
    if not alone or not alone.get("n") or not alone.get("p50_ms"):
        return None
    return {
        "n": alone["n"],
        "p50_ms": alone["p50_ms"],
        "run_over_alone": run_p50_ms / alone["p50_ms"],
    }


def _count_stats(values: list[int]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "min": float(arr.min()), "max": float(arr.max())}


def _assemble(
    settings: BenchSettings,
    models: dict[str, EngineModel],
    workload: Workload,
    samples: list[Sample],
    infos: dict[str, dict[str, Any]],
    memory: dict[str, dict[str, Any]],
    environment: dict[str, Any],
    rounds: int,
    measured_s: float,
) -> dict[str, Any]:
    engines: dict[str, Any] = {}
    per_image_samples = settings.batch == 1 or settings.mode == "throughput"  # one sample = one image
    for name in settings.engines:
        mine = [s for s in samples if s.engine == name]
        per_sample_images = 1 if per_image_samples else settings.batch
        latency = summarize([s.total_s for s in mine], per_sample_images)
        stages = {k: summarize([s.stages[k] for s in mine], per_sample_images) for k in STAGES}
        sub_keys = sorted({k for s in mine for k in s.substages})
        substages = {
            k: summarize([s.substages.get(k, 0.0) for s in mine], per_sample_images) for k in sub_keys
        }
        per_image = []
        for i, im in enumerate(workload.images):
            own = [s for s in mine if s.images == (i,)] if per_image_samples else []
            if not own:
                continue
            per_image.append(
                {
                    "image": im.name,
                    "height": im.height,
                    "width": im.width,
                    "cells": im.cells,
                    "detections": _count_stats([s.detections for s in own])["mean"],
                    "instances": _count_stats([s.instances for s in own])["mean"],
                    "latency": summarize([s.total_s for s in own]).to_dict(),
                    "stage_mean_ms": {k: float(np.mean([s.stages[k] for s in own]) * 1e3) for k in STAGES},
                }
            )
        entry: dict[str, Any] = {
            "info": infos[name],
            "model": models[name].to_dict(),
            "latency": latency.to_dict(),
            "stages": {k: v.to_dict() for k, v in stages.items()},
            "stage_mean_ms": {k: v.mean_ms for k, v in stages.items()},
            "substages": {k: v.to_dict() for k, v in substages.items()},
            "detections_per_image": _count_stats([s.detections for s in mine])
            if per_image_samples
            else {k: v / settings.batch for k, v in _count_stats([s.detections for s in mine]).items()},
            "instances_per_image": _count_stats([s.instances for s in mine])
            if per_image_samples
            else {k: v / settings.batch for k, v in _count_stats([s.instances for s in mine]).items()},
            "per_image": per_image,
            "samples_ms": [round(s.total_s * 1e3, 4) for s in mine],
            "memory": memory.get(name, {"skipped": "memory probes were not asked for"}),
            "alone": _alone(latency.p50_ms, memory.get(name)) if settings.mode == "latency" else None,
            "speedup_vs_torch": None,
            "cuda_graphs": bool(infos[name].get("cuda_graphs", False)),
        }
        peaks = [s.cuda_torch_peak for s in mine if s.cuda_torch_peak is not None]
        if peaks:
            entry["cuda_torch_peak_allocated_mb"] = round(max(peaks) / 2**20, 1)
        events = [s.cuda_events_s for s in mine if s.cuda_events_s is not None]
        if events:
            entry["cuda_events_infer_ms"] = summarize(events, per_sample_images).to_dict()
        engines[name] = entry
    if "torch" in engines:
        ref = engines["torch"]["latency"]
        for entry in engines.values():
            lat = entry["latency"]
            entry["speedup_vs_torch"] = {
                "mean": ref["mean_ms"] / lat["mean_ms"] if lat["mean_ms"] > 0 else None,
                "p50": ref["p50_ms"] / lat["p50_ms"] if lat["p50_ms"] > 0 else None,
            }
    return {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": settings.to_dict(),
        "rounds_measured": rounds,
        "measured_seconds": round(measured_s, 3),
        "latency_unit": f"per batch of {settings.batch} images" if settings.batch > 1 else "per image",
        "timing_method": "host wall clock (time.perf_counter); device synchronised before each sample and after "
        "inference; warm-up excluded; engines interleaved, order flipped every round"
        + (
            "; each engine in a process of its own"
            if settings.isolation == "process"
            else "; engines in one process"
        ),
        "workload": workload.to_dict(),
        "environment": environment,
        "definitions": DEFINITIONS,
        "engines": engines,
    }


def detections_differ(result: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """Engines whose mean detections per image differ from the reference engine's (``torch``, else the
    first): ``{engine: (its mean, the reference's mean)}``. Two engines that find different numbers of cells
    do different work (the mask head, pasting and RLE run once per detection), so their latencies are not
    a like-for-like comparison. A difference of half a detection per image or 1 % is tolerated (an
    instance at the score threshold)."""
    engines = result["engines"]
    if not engines:
        return {}
    ref_name = "torch" if "torch" in engines else next(iter(engines))
    ref = float(engines[ref_name]["detections_per_image"]["mean"])
    out = {}
    for name, e in engines.items():
        mean = float(e["detections_per_image"]["mean"])
        if name != ref_name and abs(mean - ref) > max(0.5, 0.01 * ref):
            out[name] = (mean, ref)
    return out


def _warnings(result: dict[str, Any]) -> list[str]:
    out: list[str] = []
    cores = (
        result["environment"]["cpu"].get("usable_cores")
        or result["environment"]["cpu"].get("logical_cores")
        or 1
    )
    for when, load in (
        ("before", result["environment"].get("load_average")),
        ("after", result.get("load_average_after")),
    ):
        if load and load[0] > cores:
            out.append(
                f"the machine was busy {when} the run (1-min load average {load[0]} on {cores} cores): "
                "latencies are inflated and noisy; rerun on a quiet machine"
            )
    n = min(e["latency"]["n"] for e in result["engines"].values())
    if n < 10:
        out.append(f"only {n} samples per engine: p90/p99 are not meaningful; use more --iters or --seconds")
    for name, e in result["engines"].items():
        if e["detections_per_image"]["max"] == 0:
            out.append(
                f"engine {name!r} produced no detections: the mask head, pasting and RLE did not run, so its "
                "latency understates real work; use a trained model or --untrained ARCH"
            )
        if "error" in e["memory"]:
            out.append(f"memory probe for {name!r} failed: {e['memory']['error']}")
        if "error" in (e.get("profile") or {}):
            out.append(f"profile of {name!r} failed: {e['profile']['error']}")
    ref_name = "torch" if "torch" in result["engines"] else next(iter(result["engines"]), "")
    for name, (mean, ref) in detections_differ(result).items():
        out.append(
            f"engine {name!r} returned {mean:.1f} detections per image against {ref:.1f} for {ref_name!r}: the "
            "two do different amounts of work, so their speed ratio is not like for like (marked * in the table)"
        )
    for name, e in result["engines"].items():
        alone = e.get("alone")
        if alone and abs(alone["run_over_alone"] - 1) > ALONE_TOLERANCE:
            out.append(
                f"engine {name!r}: p50 {e['latency']['p50_ms']:.1f} ms in this run against {alone['p50_ms']:.1f} ms "
                f"alone in a fresh process ({alone['run_over_alone']:.2f}x, over {ALONE_TOLERANCE:.0%}): the other "
                "engines or the machine's own noise moved it, and speed ratios from this run are uncertain by as much; "
                "more --iters narrow both p50s, and --block K --settle N times each engine's calls after its own"
            )
    for name, e in result["engines"].items():
        provenance = (e.get("model") or {}).get("provenance")
        if provenance in ("mismatch", "unverified"):
            out.append(
                f"engine {name!r} ran a --model-for file that was not shown to be exported from --model "
                f"({provenance}, --allow-mismatch): it may be another model"
            )
    return out
