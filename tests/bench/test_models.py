"""Which model file each engine reads; untrained models with a controlled detection count."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from cellseg_deploy.backends.registry import get_format
from cellseg_deploy.bench.models import (
    EXPORTERS,
    _pick_exporter,
    build_untrained_checkpoint,
    check_checkpoint_path,
    parse_model_for,
    resolve_engine_models,
)
from cellseg_deploy.errors import ModelFileError, UserError
from cellseg_deploy.io_utils import sha256_file


def test_torch_reads_the_checkpoint(random_tiny_checkpoint: Path) -> None:
    models = resolve_engine_models(["torch"], checkpoint=random_tiny_checkpoint)
    m = models["torch"]
    assert m.path == random_tiny_checkpoint and m.source == "checkpoint"
    assert m.sha256 == sha256_file(random_tiny_checkpoint)


def test_a_file_that_does_not_fit_its_engine_is_one_line(random_tiny_checkpoint: Path) -> None:
    with pytest.raises(ModelFileError) as err:
        resolve_engine_models(["onnx"], model_for={"onnx": random_tiny_checkpoint})
    assert "onnx" in str(err.value) and "\n" not in str(err.value)


def test_engine_without_a_model_says_which_flag(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match=r"--model-for onnx=PATH"):
        resolve_engine_models(["onnx"])


def test_model_for_an_engine_not_benchmarked(random_tiny_checkpoint: Path) -> None:
    with pytest.raises(UserError, match="not benchmarked"):
        resolve_engine_models(
            ["torch"], checkpoint=random_tiny_checkpoint, model_for={"onnx": Path("x.onnx")}
        )


def test_model_flag_takes_a_checkpoint(tmp_path: Path) -> None:
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"not really")
    with pytest.raises(ModelFileError, match="takes a checkpoint"):
        check_checkpoint_path(onnx_file)


@pytest.mark.parametrize("item", ["onnx", "=x.onnx", "onnx="])
def test_parse_model_for_rejects_malformed(item: str) -> None:
    with pytest.raises(UserError, match="ENGINE=PATH"):
        parse_model_for([item])


def test_exported_file_is_cached_by_checkpoint_hash(random_tiny_checkpoint: Path, tmp_path: Path) -> None:
    # A real function as the "exporter" (a byte copy) exercises the cache without a slow ONNX export.
    copy = replace(get_format("onnx"), exporter="shutil:copyfile")
    notes: list[str] = []
    first = resolve_engine_models(
        ["onnx"],
        checkpoint=random_tiny_checkpoint,
        cache_dir=tmp_path,
        exporters=(copy,),
        on_export=notes.append,
    )["onnx"]
    assert first.source == "exported" and first.path.parent.name == sha256_file(random_tiny_checkpoint)[:16]
    second = resolve_engine_models(
        ["onnx"],
        checkpoint=random_tiny_checkpoint,
        cache_dir=tmp_path,
        exporters=(copy,),
        on_export=notes.append,
    )["onnx"]
    assert second.path == first.path
    assert notes[0].startswith("onnx: exported") and "reused" in notes[1]


def test_bench_exporters_are_the_registry_formats_and_each_loads() -> None:
    assert [e.name for e in EXPORTERS] == ["onnx", "staged", "openvino-int8"]
    for exporter in EXPORTERS:
        assert callable(exporter.load_exporter())  # a "module:function" that no longer exists fails here
    # openvino reads .onnx and .xml: at int8 the int8 IR is exported, otherwise the plain ONNX graph
    picked = _pick_exporter(EXPORTERS, (".onnx", ".xml"), "int8")
    assert picked is not None and picked.name == "openvino-int8"
    picked = _pick_exporter(EXPORTERS, (".onnx", ".xml"), "fp32")
    assert picked is not None and picked.name == "onnx"
    picked = _pick_exporter(EXPORTERS, ("/", ".json"), None)
    assert picked is not None and picked.name == "staged"


def test_untrained_model_returns_exactly_k_detections(tmp_path: Path) -> None:
    from cellseg_deploy.backends import create_runner

    rng = np.random.default_rng(0)
    for k in (3, 40):
        ckpt = build_untrained_checkpoint(tmp_path / f"d{k}.pt", "tiny", k, min_size=96)
        with create_runner("torch", ckpt, threads=1) as runner:
            for shape in ((96, 96, 3), (70, 130, 3)):
                image = rng.integers(0, 255, shape, dtype=np.uint8)
                assert len(runner.infer(image)) == k
    mtime = (tmp_path / "d3.pt").stat().st_mtime_ns
    build_untrained_checkpoint(tmp_path / "d3.pt", "tiny", 3, min_size=96)  # same settings: kept
    assert (tmp_path / "d3.pt").stat().st_mtime_ns == mtime
