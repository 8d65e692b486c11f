"""The pipelined loop: input order, bounded memory, per-image failures, and the same bytes as the
sequential loop with a real ONNX Runtime model on real TIFF files."""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cellseg_deploy.backends import create_runner
from cellseg_deploy.data.io import write_image_tif
from cellseg_deploy.errors import DataError, UserError
from cellseg_deploy.evaluation.pipeline import (
    SEQUENTIAL,
    PipelineSettings,
    inference_handles,
    run_pipeline,
)
from cellseg_deploy.evaluation.predict import EVAL_POSTPROCESS, ImageFailures, predict_folder, predict_image


class _Alive:
    """Counts items between decode and their hand-over to the caller (what the pipeline holds)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.most = 0

    def enter(self) -> None:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)

    def leave(self) -> None:
        with self.lock:
            self.now -= 1


def _jitter(rng: random.Random, lock: threading.Lock) -> None:
    with lock:
        delay = rng.uniform(0, 0.004)
    time.sleep(delay)


@pytest.mark.parametrize(
    "settings",
    [
        PipelineSettings(workers=3, depth=1),
        PipelineSettings(workers=2, depth=2, batch=3, concurrency=2),
        SEQUENTIAL,
    ],
    ids=["workers3", "batch3-concurrency2", "sequential"],
)
def test_results_in_input_order_and_memory_bounded(settings: PipelineSettings) -> None:
    rng, lock = random.Random(0), threading.Lock()
    alive = _Alive()
    calls: list[int] = []

    def decode(i: int) -> int:
        alive.enter()
        _jitter(rng, lock)  # later items often finish first
        return i * 10

    def infer(handle: Any, images: list[int]) -> list[int]:
        calls.append(len(images))
        _jitter(rng, lock)
        return [im + 1 for im in images]

    def finish(i: int, image: int, out: int) -> tuple[int, int]:
        _jitter(rng, lock)
        return i, out

    n = 300
    got = []
    for item, outcome in run_pipeline(range(n), decode, infer, finish, settings, ["h1", "h2"]):
        got.append((item, outcome.get()))
        alive.leave()
    assert got == [(i, (i, i * 10 + 1)) for i in range(n)]
    assert max(calls) == settings.batch and sum(calls) == n
    # the bound does not grow with the folder: 300 items, never more than the pipeline's fixed window
    assert alive.most <= settings.max_images_in_flight(), (alive.most, settings)
    if not settings.sequential:
        assert alive.most > 1, "nothing overlapped"


def test_inputs_are_read_lazily() -> None:
    """A generator of items is consumed a window ahead, not listed up front (an endless folder works)."""
    pulled = []

    def items() -> Any:
        i = 0
        while True:
            pulled.append(i)
            yield i
            i += 1

    settings = PipelineSettings(workers=2, depth=1)
    stream = run_pipeline(items(), lambda i: i, lambda h, ims: ims, lambda i, im, o: o, settings, [None])
    firsts = [next(stream)[1].get() for _ in range(5)]
    stream.close()
    assert firsts == [0, 1, 2, 3, 4]
    assert len(pulled) <= 5 + settings.max_images_in_flight()


def test_failures_stay_with_their_item_and_a_batch_names_its_bad_image() -> None:
    def decode(i: int) -> int:
        if i == 2:
            raise DataError("unreadable")
        return i

    def infer(handle: Any, images: list[int]) -> list[int]:
        if 7 in images:
            raise RuntimeError("the model cannot take image 7")
        return images

    def finish(i: int, image: int, out: int) -> int:
        if i == 11:
            raise ValueError("bad post-processing")
        return out

    settings = PipelineSettings(workers=2, batch=4)
    results = list(run_pipeline(range(14), decode, infer, finish, settings, [None]))
    assert [i for i, _ in results] == list(range(14))
    errors = {i: type(o.error).__name__ for i, o in results if not o.ok}
    # 7 broke its batch (4..7): the batch is run again image by image, so 4, 5 and 6 still succeed
    assert errors == {2: "DataError", 7: "RuntimeError", 11: "ValueError"}
    assert [o.get() for i, o in results if o.ok] == [0, 1, 3, 4, 5, 6, 8, 9, 10, 12, 13]


def test_settings_refuse_nonsense() -> None:
    with pytest.raises(UserError, match="batch must be at least 1"):
        PipelineSettings(batch=0)
    with pytest.raises(UserError, match="needs the pipelined loop"):
        PipelineSettings(workers=0, concurrency=2)


# ----------------------------------------------------------------------------------------------------------
# Real model, real files
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def busy_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight tiny model that returns 40 detections per image (score threshold 0), as ONNX."""
    from cellseg_deploy.backends.onnxrt.export import export_onnx
    from cellseg_deploy.bench.models import build_untrained_checkpoint

    folder = tmp_path_factory.mktemp("busy")
    ckpt = build_untrained_checkpoint(folder / "tiny-det40.pt", "tiny", 40, min_size=192, seed=0)
    out = folder / "tiny-det40.onnx"
    export_onnx(ckpt, out)
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight RGBA LZW TIFFs of different sizes (one of extreme aspect ratio, padded for the model) and one
    corrupt file."""
    from cellseg_deploy.bench.workload import render_cells

    root = tmp_path_factory.mktemp("images") / "imgs"
    root.mkdir()
    sizes = [(160, 192), (200, 150), (96, 128), (181, 173), (150, 150), (12, 300), (210, 190), (140, 222)]
    for i, (h, w) in enumerate(sizes):
        image, _ = render_cells(h, w, 25, i)
        write_image_tif(root / f"img{i:02d}.tif", np.ascontiguousarray(image[..., :3]))
    (root / "img99.tif").write_bytes(b"II*\x00 not a tiff")
    return root


def zip_payload(path: Path) -> bytes:
    """The zip's member names, CRCs, sizes and bytes: everything but the header timestamps, which
    write_submission takes from the clock (two sequential runs a few seconds apart differ there)."""
    import zipfile

    with zipfile.ZipFile(path) as zf:
        parts = [f"{i.filename}:{i.CRC}:{i.file_size}:{i.compress_type}".encode() for i in zf.infolist()]
        return b"|".join(parts) + b"".join(zf.read(i.filename) for i in zf.infolist())


def test_pipelined_zip_is_byte_identical_to_sequential(busy_onnx: Path, folder: Path, tmp_path: Path) -> None:
    runs = {
        "sequential": SEQUENTIAL,
        "pipelined": PipelineSettings(workers=2, depth=2),
        "concurrent": PipelineSettings(workers=2, depth=1, concurrency=2),
    }
    zips, failed = {}, {}
    with create_runner("onnx", busy_onnx, threads=1) as runner:
        for name, settings in runs.items():
            summary = predict_folder(
                runner, folder, None, tmp_path / f"{name}.zip", progress=False, pipeline=settings
            )
            zips[name] = zip_payload(summary.out_zip) + summary.results_json.read_bytes()
            failed[name] = summary.failed
            assert summary.num_predicted == 8 and summary.num_detections > 8 * 20
    assert zips["pipelined"] == zips["sequential"]
    assert zips["concurrent"] == zips["sequential"]
    assert failed["pipelined"] == failed["sequential"] == failed["concurrent"]
    assert [name for name, _ in failed["sequential"]] == ["img99.tif"]


def test_pipelined_instances_equal_predict_image(busy_onnx: Path, folder: Path) -> None:
    """The two halves the pipeline calls give what predict_image gives, the padded thin image included."""
    from cellseg_deploy.data.io import read_image
    from cellseg_deploy.evaluation.predict import finish_image, infer_images

    paths = sorted(p for p in folder.glob("img0*.tif"))
    with create_runner("onnx", busy_onnx, threads=1) as runner:
        for path in paths:
            image = read_image(path)
            whole = predict_image(runner, image, EVAL_POSTPROCESS)
            halves = finish_image(infer_images(runner, [image])[0], image.shape[:2], EVAL_POSTPROCESS)
            assert whole.image_size == halves.image_size == image.shape[:2]
            assert whole.rles == halves.rles and np.array_equal(whole.boxes, halves.boxes)


def test_concurrency_refused_for_a_runner_that_takes_one_call(random_tiny_checkpoint: Path) -> None:
    with create_runner("torch", random_tiny_checkpoint) as runner:
        with pytest.raises(UserError, match="one inference call at a time"):
            inference_handles(runner, 2)
        assert inference_handles(runner, 1) == [runner]


def test_strict_stops_at_the_first_bad_image_in_order(busy_onnx: Path, folder: Path, tmp_path: Path) -> None:
    failures = ImageFailures(strict=True)
    assert failures.strict
    with (
        create_runner("onnx", busy_onnx, threads=1) as runner,
        pytest.raises(DataError, match=r"img99\.tif.*stopped by --strict"),
    ):
        predict_folder(
            runner,
            folder,
            None,
            tmp_path / "s.zip",
            strict=True,
            progress=False,
            pipeline=PipelineSettings(workers=2),
        )
    assert not (tmp_path / "s.zip").exists()


def test_cli_predict_pipelined_and_concurrent_write_the_same_results(
    busy_onnx: Path, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cellseg_deploy.cli.main import main

    outs = {}
    for name, extra in {
        "plain": ["--workers", "0"],
        "piped": ["--workers", "2", "--concurrency", "2"],
    }.items():
        out = tmp_path / name / "s.zip"
        code = main(["predict", str(busy_onnx), str(folder), "--out", str(out), "--no-progress", *extra])
        assert code == 1, "the corrupt image is skipped and named: exit 1"
        assert "img99.tif" in capsys.readouterr().out
        outs[name] = out.with_name("test-results.json").read_bytes()
    assert outs["piped"] == outs["plain"] and len(outs["plain"]) > 1000


def test_cli_concurrency_on_a_one_call_runner_is_a_usage_error(
    random_tiny_checkpoint: Path, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cellseg_deploy.cli.main import main

    out = tmp_path / "s.zip"
    code = main(
        ["predict", str(random_tiny_checkpoint), str(folder), "--out", str(out), "--concurrency", "2"]
    )
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "one inference call at a time" in err[0], err
    assert not out.exists()


def test_pipelined_parity_compares_the_same(
    trained_tiny: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """run_parity's dataset loop through the pipeline: the same comparison, figure for figure."""
    from cellseg_deploy.backends.onnxrt.export import export_onnx
    from cellseg_deploy.evaluation.parity import run_parity

    checkpoint, data_root = trained_tiny
    onnx = tmp_path_factory.mktemp("parity") / "tiny.onnx"
    export_onnx(checkpoint, onnx)
    reports = [
        run_parity(checkpoint, onnx, "onnx", data_root, split="all", threads=1, progress=False, pipeline=pipe)
        for pipe in (None, PipelineSettings(workers=2))
    ]
    assert reports[0].overall["n_ref"] > 10
    assert reports[1].overall == reports[0].overall
    assert reports[1].passed == reports[0].passed


def test_openvino_gets_a_stream_for_each_concurrent_call(
    busy_onnx: Path, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--concurrency 2`` on OpenVINO compiles two streams: with the default one, the second infer request
    would wait for the first and the loop would run one call at a time."""
    pytest.importorskip(
        "openvino", reason="OpenVINO is not installed: pip install 'cellseg-deploy[openvino]'"
    )
    from cellseg_deploy.cli.main import main

    streams = {}
    for concurrency in ("1", "2"):
        out, report = tmp_path / concurrency / "s.zip", tmp_path / f"{concurrency}.json"
        argv = ["predict", str(busy_onnx), str(folder), "--engine", "openvino", "--out", str(out)]
        argv += ["--workers", "2", "--concurrency", concurrency, "--no-progress", "--json", str(report)]
        assert main(argv) == 1, "the corrupt image is skipped and named: exit 1"
        capsys.readouterr()
        streams[concurrency] = json.loads(report.read_text())["runner"]["num_streams"]
    assert streams == {"1": 1, "2": 2}
