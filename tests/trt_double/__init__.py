"""Test doubles of TensorRT and of the CUDA calls around it (tests only; see ``tensorrt.py`` and ``cuda.py``).

:func:`install` puts both in place for one test: the ``tensorrt`` module double in ``sys.modules``, the
CUDA stand-in as :data:`cellseg_deploy.backends.tensorrt.build.CUDA_API`, and (for code outside the TensorRT path
that asks ``torch.cuda`` about the device, such as the benchmark's environment and memory probes) a few
``torch.cuda`` query functions answering for the fake GPU.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from tests.trt_double.cuda import FakeCuda
from tests.trt_double.tensorrt import VERSIONS, State, build_module

__all__ = ["VERSIONS", "TrtDouble", "install", "trt_double"]


@dataclass
class TrtDouble:
    """What :func:`install` put in place."""

    trt: ModuleType
    state: State
    cuda: FakeCuda


def install(monkeypatch: pytest.MonkeyPatch, version: str = VERSIONS[1], **cuda_kwargs: Any) -> TrtDouble:
    """Install the doubles for the rest of the test (undone by ``monkeypatch`` and the tracker's exit)."""
    import torch

    from cellseg_deploy.backends.tensorrt import build as trt_export

    cuda = FakeCuda(**cuda_kwargs)
    module, state = build_module(version, cuda)
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    monkeypatch.setattr(trt_export, "CUDA_API", lambda index=0: cuda)
    props = SimpleNamespace(total_memory=cuda.budget_bytes, multi_processor_count=132, name=cuda.name())
    for name, value in {
        "is_available": lambda: True,
        "device_count": lambda: 1,
        "init": lambda: None,
        "synchronize": lambda device=None: cuda.synchronize(),
        "empty_cache": lambda: None,
        "reset_peak_memory_stats": lambda device=None: None,
        "max_memory_allocated": lambda device=None: cuda.allocated_bytes,
        "mem_get_info": lambda device=None: (cuda.budget_bytes - cuda.allocated_bytes, cuda.budget_bytes),
        "get_device_name": lambda device=None: cuda.name(),
        "get_device_capability": lambda device=None: cuda.capability(),
        "get_device_properties": lambda device=None: props,
    }.items():
        monkeypatch.setattr(torch.cuda, name, value)
    cuda.__enter__()
    return TrtDouble(module, state, cuda)


@pytest.fixture
def trt_double(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., TrtDouble]]:
    """``trt_double(version=..., **FakeCuda options)`` installs the doubles for this test and returns them."""
    made: list[TrtDouble] = []

    def make(version: str = VERSIONS[1], **cuda_kwargs: Any) -> TrtDouble:
        double = install(monkeypatch, version, **cuda_kwargs)
        made.append(double)
        return double

    yield make
    for double in reversed(made):
        double.cuda.__exit__(None, None, None)
