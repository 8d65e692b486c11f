"""The TensorRT double exposes only names of the real bindings, per version (see ``tensorrt.API``)."""

from __future__ import annotations

import enum

import pytest

from tests.trt_double.cuda import FakeCuda
from tests.trt_double.tensorrt import API, VERSIONS, available, build_module


@pytest.mark.parametrize("version", VERSIONS)
def test_every_public_name_is_listed_for_its_version(version: str) -> None:
    trt, _ = build_module(version, FakeCuda())
    for name in [n for n in vars(trt) if not n.startswith("_")] + ["__version__"]:
        assert name in API and available(name, version), name
        obj = getattr(trt, name)
        if isinstance(obj, type) and issubclass(obj, enum.Enum):
            for member in obj.__members__:
                assert available(f"{name}.{member}", version), f"{name}.{member}"
        elif isinstance(obj, type):
            for attr in [a for a in vars(obj) if not a.startswith("_")]:
                if hasattr(obj, attr):
                    assert available(f"{name}.{attr}", version), f"{name}.{attr} is not in TensorRT {version}"


@pytest.mark.parametrize(
    ("name", "versions_with_it"),
    [
        ("BuilderFlag.FP16", {"10.0.1.6", "10.16.0.72"}),
        ("NetworkDefinitionCreationFlag.EXPLICIT_BATCH", {"10.0.1.6", "10.16.0.72"}),
        ("ICudaEngine.device_memory_size", {"10.0.1.6", "10.16.0.72"}),
        ("ICudaEngine.device_memory_size_v2", {"10.16.0.72", "11.1.0.5"}),
        ("IExecutionContext.set_device_memory", {"10.16.0.72", "11.1.0.5"}),
    ],
)
def test_names_absent_from_a_version_are_absent_from_its_double(
    name: str, versions_with_it: set[str]
) -> None:
    for version in VERSIONS:
        trt, _ = build_module(version, FakeCuda())
        owner, attr = name.split(".")
        assert hasattr(getattr(trt, owner), attr) == (version in versions_with_it), (name, version)
    assert not hasattr(build_module(VERSIONS[2], FakeCuda())[0], "bf16")
