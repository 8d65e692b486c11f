"""One engine of a latency benchmark in a process of its own, driven sample by sample by the benchmark.

With ``--isolation process`` (the default) the benchmark starts one ``python -m
cellseg_deploy.bench.engine_process`` per engine; each loads its runner and then waits for one request at a
time on stdin. The benchmark keeps the interleaved order (A, B, then B, A), so drift over time still falls on
every engine alike, but no engine shares an address space with another: no other runtime's thread pool,
allocator state or per-model arenas live beside it, and a process that is not running a sample is idle,
blocked on its pipe. Timing happens inside the engine's process (:class:`~cellseg_deploy.bench.sample.SamplePipeline`),
so the pipe's round trip is in no sample.

Protocol (one JSON object per line): the first line to the process is the engine's spec (the memory probe's
keys, :func:`~cellseg_deploy.bench.memory.measure_memory`); it answers ``{"ready": true, "info": {...}}`` or
``{"error": "one line"}``. Then each ``{"paths": [...], "round": r, "images": [...]}`` gets one
:class:`~cellseg_deploy.bench.sample.Sample` as a dict, and ``{"quit": true}`` gets ``{"peak_rss_mb": MiB}``
before the process exits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

from cellseg_deploy.bench.sample import Sample
from cellseg_deploy.errors import CheckFailed, InvalidModelOutput, UserError

PREFIX = "CELLSEG_ENGINE "
"""Marks the protocol's lines on the process's stdout (libraries may print there too)."""


class EngineProcess:
    """The benchmark's side of one engine process: :meth:`run` has the signature of
    :meth:`SamplePipeline.run <cellseg_deploy.bench.sample.SamplePipeline.run>`.

    Raises:
        UserError: the engine could not load, or its process died (the message has its last error line).
    """

    def __init__(self, spec: dict[str, Any]) -> None:
        self.label: str = spec.get("label", spec["engine"])
        # stderr to a file, not a pipe: a chatty library would fill a pipe nobody reads during the run and
        # block the engine; the file's last line is the error message when the process dies
        self.stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cellseg_deploy.bench.engine_process"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            bufsize=1,
        )
        self.peak_rss_mb: float | None = None
        try:
            reply = self._ask(spec)
        except UserError:
            self.close()
            raise
        self.info: dict[str, Any] = reply["info"]

    def run(self, paths: list[Path], round_index: int, images: tuple[int, ...]) -> Sample:
        reply = self._ask({"paths": [str(p) for p in paths], "round": round_index, "images": list(images)})
        reply["images"] = tuple(reply["images"])
        return Sample(**reply)

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(UserError):  # a process that died already said why in run()
                self.peak_rss_mb = self._ask({"quit": True}).get("peak_rss_mb")
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for stream in (self.proc.stdin, self.proc.stdout, self.stderr):
            if stream is not None:
                stream.close()

    def __enter__(self) -> EngineProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ask(self, message: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
            reply = _read_reply(self.proc.stdout)
        except (BrokenPipeError, OSError):
            reply = None
        if reply is None:
            self.proc.wait(timeout=60)
            self.stderr.seek(0)
            lines = self.stderr.read().strip().splitlines() or ["no output"]
            raise UserError(
                f"the process of engine {self.label!r} exited with code {self.proc.returncode}: {lines[-1][:300]}"
            )
        if "error" in reply:
            if reply.get("kind") == "InvalidModelOutput":  # the same error as in one process
                raise InvalidModelOutput(reply["error"])
            raise UserError(f"engine {self.label!r}: {reply['error']}")
        return reply


def _read_reply(stream: IO[str]) -> dict[str, Any] | None:
    for line in stream:
        if line.startswith(PREFIX):
            reply: dict[str, Any] = json.loads(line[len(PREFIX) :])
            return reply
    return None


def _send(message: dict[str, Any]) -> None:
    sys.stdout.write(PREFIX + json.dumps(message) + "\n")
    sys.stdout.flush()


def _serve() -> int:
    from cellseg_deploy.bench.memory import peak_rss_mb, runner_from_spec
    from cellseg_deploy.bench.sample import SamplePipeline
    from cellseg_deploy.bench.timing import device_synchronizer
    from cellseg_deploy.evaluation.pipeline import check_batching
    from cellseg_deploy.postprocess import PostprocessConfig

    spec = json.loads(sys.stdin.readline())
    try:
        runner = runner_from_spec(spec).load()
        check_batching(runner, int(spec["batch"]))
    except UserError as exc:
        _send({"error": str(exc)})
        return 1
    pipeline = SamplePipeline(
        spec.get("label", spec["engine"]),
        runner,
        PostprocessConfig(**spec["post"]),
        spec["device"],
        device_synchronizer(spec["device"]),
    )
    _send({"ready": True, "info": runner.info()})
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("quit"):
            runner.close()
            _send({"peak_rss_mb": round(peak_rss_mb(), 1)})
            return 0
        try:
            sample = pipeline.run(
                [Path(p) for p in request["paths"]], request["round"], tuple(request["images"])
            )
        except (UserError, CheckFailed) as exc:
            _send({"error": str(exc), "kind": type(exc).__name__})
            return 1
        _send(dataclasses.asdict(sample))
    return 0


if __name__ == "__main__":
    raise SystemExit(_serve())
