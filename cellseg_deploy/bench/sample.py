"""One benchmark sample: decode, infer and post-process an image (or a batch), timed stage by stage.

:class:`SamplePipeline` runs an engine's whole pipeline once and returns its :class:`Sample`; the latency
measurement (:mod:`cellseg_deploy.bench.runner_bench`) calls it in the benchmark's own process or, one
process per engine, in :mod:`cellseg_deploy.bench.engine_process`.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellseg_deploy.backends import Runner
from cellseg_deploy.bench.timing import CudaEventTimer, SyncFn
from cellseg_deploy.errors import naming_model_output
from cellseg_deploy.postprocess import PostprocessConfig, postprocess
from cellseg_deploy.structures import Detections

STAGES: tuple[str, ...] = ("decode", "preprocess", "network", "infer_other", "paste", "rle", "other")
"""Stages of one sample, in pipeline order; they sum to the sample's total."""


@dataclass
class Sample:
    """The timed record of one sample (seconds; see :data:`STAGES`)."""

    engine: str
    round: int
    images: tuple[int, ...]
    total_s: float
    stages: dict[str, float]
    substages: dict[str, float]
    detections: int
    instances: int
    cuda_torch_peak: int | None = None
    cuda_events_s: float | None = None


class SamplePipeline:
    """One engine's full pipeline on one sample, timed."""

    def __init__(
        self, label: str, runner: Runner, post: PostprocessConfig, device: str, sync: SyncFn
    ) -> None:
        from cellseg_deploy.data.io import read_image

        self.label = label
        self.runner = runner
        self.post = post
        self.sync = sync
        self.read_image = read_image
        self.cuda = device.startswith("cuda") and "torch" in sys.modules
        self.device = device
        self.events = self.cuda and runner.name == "torch"

    def run(self, paths: list[Path], round_index: int, images: tuple[int, ...]) -> Sample:
        """Decode, infer and post-process ``paths`` once; the timed record of it."""
        torch: Any = sys.modules.get("torch") if self.cuda else None
        if torch is not None:
            torch.cuda.reset_peak_memory_stats(self.device)
        timer = CudaEventTimer(self.device) if self.events else None
        self.sync()
        t0 = time.perf_counter()
        arrays = [self.read_image(p) for p in paths]
        t1 = time.perf_counter()
        if timer is not None:
            timer.start()
        dets: list[Detections] = (
            [self.runner.infer(arrays[0])] if len(arrays) == 1 else self.runner.infer_batch(arrays)
        )
        if timer is not None:
            timer.stop()
        self.sync()
        t2 = time.perf_counter()
        with naming_model_output(model=self.runner.model_path, image=", ".join(p.name for p in paths)):
            insts = [postprocess(det, self.post) for det in dets]
        t3 = time.perf_counter()
        stages, sub = stage_times(dets, t1 - t0, t2 - t1, t3 - t0)
        return Sample(
            engine=self.label,
            round=round_index,
            images=images,
            total_s=t3 - t0,
            stages=stages,
            substages=sub,
            detections=sum(len(d) for d in dets),
            instances=sum(len(i) for i in insts),
            cuda_torch_peak=int(torch.cuda.max_memory_allocated(self.device)) if torch is not None else None,
            cuda_events_s=timer.elapsed_s() if timer is not None else None,
        )


def stage_times(
    dets: list[Detections], decode_s: float, infer_s: float, total_s: float
) -> tuple[dict[str, float], dict[str, float]]:
    """Split a sample into :data:`STAGES` (summing to ``total_s``) plus the runners' finer timings.

    ``infer_s`` is the wall time of the runner call; ``infer_other`` is what its ``preprocess`` and
    ``network`` timings leave of it.
    """
    own = ("preprocess", "network")
    stages = dict.fromkeys(STAGES, 0.0)
    stages["decode"] = decode_s
    sub: dict[str, float] = {}
    for det in dets:
        for key, value in det.timings.items():
            if key in own or key in ("paste", "rle"):
                stages[key] += float(value)
            else:
                sub[key] = sub.get(key, 0.0) + float(value)
    stages["infer_other"] = max(infer_s - stages["preprocess"] - stages["network"], 0.0)
    stages["other"] = max(total_s - sum(v for k, v in stages.items() if k != "other"), 0.0)
    return stages, sub
