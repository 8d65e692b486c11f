"""The format registry: one table behind --engine, export --format, bench's exports and infer_engine; the cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cellseg_deploy.backends.cache import RECORD_SUFFIX, cached_export
from cellseg_deploy.backends.registry import (
    EXPORT_FORMATS,
    FORMATS,
    RUNNER_MODULES,
    SUFFIX_ENGINES,
    engine_for_path,
    get_format,
    get_runner_class,
    list_runners,
    refused_option,
)
from cellseg_deploy.cli.main import main
from cellseg_deploy.errors import ModelFileError, UserError
from cellseg_deploy.evaluation.predict import infer_engine


@pytest.mark.parametrize("name", sorted(RUNNER_MODULES))
def test_every_registered_runner_resolves_and_reads_its_format(name: str) -> None:
    cls = get_runner_class(name)
    assert cls.name == name
    entry = next(f for f in FORMATS if name in f.runners)
    assert entry.suffix in cls.model_suffixes  # the runner reads the files its entry names
    if entry.exporter is not None:  # what the format exports, its runners can run
        assert set(entry.precisions) <= set(cls.precisions), (entry.name, cls.precisions)
        assert entry.default_precision in entry.precisions


def test_list_runners_is_the_table_and_unknown_names_list_it() -> None:
    assert list_runners() == sorted({r for f in FORMATS for r in f.runners})
    with pytest.raises(UserError, match="expected one of onnx, openvino"):
        get_runner_class("tensorflow")


def test_export_formats_come_from_the_table() -> None:
    assert EXPORT_FORMATS == ("onnx", "staged", "trt", "openvino-int8")
    for name in EXPORT_FORMATS:
        module, _, function = (get_format(name).exporter or "").partition(":")
        assert callable(get_format(name).load_exporter()), (module, function)


@pytest.mark.parametrize("entry", FORMATS, ids=lambda f: f.name)
def test_infer_engine_knows_every_suffix_and_marker_in_the_table(entry: Any, tmp_path: Path) -> None:
    for suffix in (entry.suffix, *entry.also_reads):
        if suffix != "/":
            assert infer_engine(f"model{suffix}") == SUFFIX_ENGINES[suffix]
            assert SUFFIX_ENGINES[suffix] in list_runners()
    if entry.marker is not None:
        assert infer_engine(Path("somewhere") / entry.marker) == entry.runners[0]
        folder = tmp_path / entry.name
        folder.mkdir()
        (folder / entry.marker).write_text("{}")
        assert infer_engine(folder) == entry.runners[0]


def test_infer_engine_xml_is_openvino_and_unknown_suffix_is_one_line() -> None:
    assert infer_engine("m.int8.xml") == "openvino" and engine_for_path("m.onnx") == "onnx"
    with pytest.raises(UserError) as err:
        infer_engine("model.bin")
    assert "\n" not in str(err.value) and "OpenVINO .xml" in str(err.value)


def test_refused_option_names_the_formats_that_take_it() -> None:
    assert (
        refused_option(get_format("staged"), ["simplify"])
        == "--simplify applies to --format onnx, not staged"
    )
    assert refused_option(get_format("onnx"), ["fp16"]) == "--fp16 applies to --format staged/trt, not onnx"
    assert refused_option(get_format("onnx"), ["opset", "simplify", "out", "json_path"]) is None


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--format", "staged", "--simplify"], "--simplify applies to --format onnx, not staged"),
        (["--format", "onnx", "--fp16"], "--fp16 applies to --format staged/trt, not onnx"),
        (["--format", "onnx", "--max-batch", "2"], "--max-batch applies to --format staged/trt, not onnx"),
        (
            ["--format", "trt", "--calib-data", "."],
            "--calib-data applies to --format openvino-int8, not trt",
        ),
        (
            ["--format", "staged", "--timing-cache", "t.cache"],
            "--timing-cache applies to --format trt, not staged",
        ),
        (
            ["--format", "onnx", "--precision", "fp16"],
            "--precision fp16 does not apply to --format onnx; it exports fp32",
        ),
    ],
)
def test_export_refuses_an_option_its_format_does_not_take_in_one_line(
    args: list[str], line: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out" / "m.onnx"
    code = main(["export", str(tmp_path / "missing.pt"), "--out", str(out), *args])
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert code == 2
    assert err[-1].endswith(line) and not any("Traceback" in x for x in err)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_deprecated_fp16_flag_conflicting_with_precision_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "export",
            str(tmp_path / "m.pt"),
            "--format",
            "staged",
            "--fp16",
            "--precision",
            "fp32",
            "--out",
            str(tmp_path / "s"),
        ]
    )
    assert code == 2 and "deprecated spelling of --precision" in capsys.readouterr().err


# -- the export cache ------------------------------------------------------------------------------------------


def _writer(calls: list[dict[str, Any]]) -> Any:
    """A real exporter stand-in: copies the checkpoint's bytes and appends the options it was given."""

    def export(checkpoint: Path, out: Path, **options: Any) -> None:
        calls.append(options)
        out.write_bytes(checkpoint.read_bytes() + json.dumps(options, sort_keys=True).encode())

    return export


def test_cache_reuses_an_unchanged_export_and_reexports_a_changed_checkpoint(tmp_path: Path) -> None:
    ckpt = tmp_path / "a.pt"
    ckpt.write_bytes(b"weights v1")
    calls: list[dict[str, Any]] = []
    first = cached_export("onnx", ckpt, tmp_path / "cache", exporter=_writer(calls))
    again = cached_export("onnx", ckpt, tmp_path / "cache", exporter=_writer(calls))
    assert (first.reused, again.reused, again.path) == (False, True, first.path) and len(calls) == 1
    assert first.path.name == "model.onnx" and (first.path.parent / ("model.onnx" + RECORD_SUFFIX)).is_file()

    ckpt.write_bytes(b"weights v2")  # a changed checkpoint: a new export, from the new bytes
    changed = cached_export("onnx", ckpt, tmp_path / "cache", exporter=_writer(calls))
    assert not changed.reused and changed.path != first.path and len(calls) == 2
    assert changed.path.read_bytes().startswith(b"weights v2")

    other = cached_export("onnx", ckpt, tmp_path / "cache", options={"opset": 18}, exporter=_writer(calls))
    assert not other.reused and other.path != changed.path and calls[-1] == {"opset": 18}

    changed.path.write_bytes(b"edited by hand")  # no longer what was recorded: exported again
    assert not cached_export("onnx", ckpt, tmp_path / "cache", exporter=_writer(calls)).reused
    assert changed.path.read_bytes().startswith(b"weights v2") and len(calls) == 4
    leftovers = [p.name for p in changed.path.parent.iterdir() if ".partial-" in p.name]
    assert leftovers == []


def test_cache_keeps_nothing_from_a_failed_export(tmp_path: Path) -> None:
    ckpt = tmp_path / "a.pt"
    ckpt.write_bytes(b"weights")

    def fails(checkpoint: Path, out: Path) -> None:
        out.write_bytes(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        cached_export("onnx", ckpt, tmp_path / "cache", exporter=fails)
    (folder,) = (tmp_path / "cache").iterdir()
    assert list(folder.iterdir()) == []  # no half model, no record: the next call exports again

    with pytest.raises(ModelFileError, match=r"wrote no manifest\.json"):
        cached_export("staged", ckpt, tmp_path / "cache", exporter=lambda c, o, **k: o.mkdir())
    with pytest.raises(ModelFileError, match="cannot be exported into a cache"):
        cached_export("trt", ckpt, tmp_path / "cache")
