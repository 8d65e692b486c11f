"""The stream a CUDA-event timer records on (issue 21.7), on the CPU.

No GPU here, so ``torch.cuda``'s event, stream and device entry points are replaced by recorders that
remember which device each call named; tests/gpu/test_cuda_paths.py times real work on a real GPU.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from cellseg_deploy.bench.timing import CudaEventTimer


class _Stream:
    def __init__(self, device: torch.device) -> None:
        self.device = device


class _Event:
    def __init__(self, log: list[Any], **kwargs: Any) -> None:
        self.log = log
        self.created_on = _current[0]

    def record(self, stream: Any = None) -> None:
        # torch.cuda.Event.record() without a stream records on the *current* device's stream.
        self.log.append(("record", stream.device if stream is not None else _current[0]))

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, other: Any) -> float:
        return 2.0


_current = [torch.device("cuda", 0)]  # what torch would report as the current device


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    log: list[Any] = []

    class _DeviceContext:
        def __init__(self, device: Any) -> None:
            self.device = torch.device(device)

        def __enter__(self) -> None:
            self.previous = _current[0]
            _current[0] = self.device

        def __exit__(self, *exc: object) -> None:
            _current[0] = self.previous

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "Event", lambda **kw: _Event(log, **kw))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream(torch.device(device)))
    monkeypatch.setattr(torch.cuda, "device", _DeviceContext)
    return log


def test_events_record_on_the_stream_of_the_timed_device(recorded: list[Any]) -> None:
    timer = CudaEventTimer("cuda:1")
    assert timer._start.created_on == torch.device("cuda", 1)  # type: ignore[attr-defined]
    timer.start()
    timer.stop()
    assert recorded == [("record", torch.device("cuda", 1))] * 2
    assert timer.elapsed_s() == pytest.approx(0.002)


def test_plain_cuda_means_gpu_0(recorded: list[Any]) -> None:
    timer = CudaEventTimer("cuda")
    timer.start()
    assert recorded == [("record", torch.device("cuda", 0))]


def test_a_cpu_device_is_refused(recorded: list[Any]) -> None:
    with pytest.raises(ValueError, match="CUDA device"):
        CudaEventTimer("cpu")
