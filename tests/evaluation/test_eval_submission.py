"""Submission zips: structure identical to the competition example, atomic writes, format checks."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from eval_synth import random_instances

from cellseg_deploy.errors import DataError
from cellseg_deploy.evaluation import (
    RESULTS_MEMBER,
    predictions_to_results,
    read_submission,
    write_submission,
)
from cellseg_deploy.evaluation.submission import validate_results


def _schema(results: list[dict]) -> tuple:
    """Keys in order and value types of one result, segmentation included."""
    r = results[0]
    return (
        list(r),
        {k: type(v).__name__ for k, v in r.items()},
        [type(v).__name__ for v in r["bbox"]],
        sorted(r["segmentation"]),
        type(r["segmentation"]["counts"]).__name__,
        [type(v).__name__ for v in r["segmentation"]["size"]],
    )


def test_same_structure_as_the_competition_example(hw3_sample: Path, tmp_path: Path) -> None:
    example = hw3_sample / "submission_example.zip"
    if not example.is_file():
        pytest.skip(f"{example} not found")
    with zipfile.ZipFile(example) as zf:
        ex_infos = zf.infolist()
        ex_results = json.loads(zf.read(RESULTS_MEMBER))
    rng = np.random.default_rng(0)
    ours = predictions_to_results({1: random_instances(rng, (446, 512), 3)})
    out = write_submission(ours, tmp_path / "sub.zip")
    with zipfile.ZipFile(out) as zf:
        infos = zf.infolist()
        assert zf.testzip() is None
    assert [i.filename for i in infos] == [i.filename for i in ex_infos] == [RESULTS_MEMBER]
    assert [i.compress_type for i in infos] == [i.compress_type for i in ex_infos]
    assert _schema(read_submission(out)) == _schema(ex_results)
    assert read_submission(out) == ours


def test_empty_submission_is_valid(tmp_path: Path) -> None:
    out = write_submission([], tmp_path / "empty.zip")
    assert read_submission(out) == []


def test_invalid_results_are_refused_and_nothing_is_written(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    good = predictions_to_results({1: random_instances(rng, (20, 20), 2)})
    bad_cases = [
        [{**good[0], "category_id": 5}],
        [{**good[0], "image_id": "1"}],
        [{**good[0], "score": np.float32(0.5)}],
        [{**good[0], "segmentation": {"size": [20, 20], "counts": b"abc"}}],
        [{k: v for k, v in good[0].items() if k != "bbox"}],
    ]
    for bad in bad_cases:
        with pytest.raises(DataError):
            validate_results(bad)
    target = tmp_path / "sub.zip"
    write_submission(good, target)
    before = target.read_bytes()
    with pytest.raises(DataError):
        write_submission(bad_cases[0], target)
    assert target.read_bytes() == before, "a refused write must leave the previous zip untouched"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub.zip"], "no temporary file left behind"


def test_read_submission_names_a_bad_zip(tmp_path: Path) -> None:
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("results.json", "[]")
    with pytest.raises(DataError, match=RESULTS_MEMBER):
        read_submission(bad)


def test_the_same_results_give_the_same_zip_bytes(tmp_path: Path) -> None:
    import time

    from cellseg_deploy.evaluation.submission import read_submission, write_submission

    results = [
        {"image_id": 1, "bbox": [1.0, 2.0, 3.0, 4.0], "score": 0.5, "category_id": 2,
         "segmentation": {"size": [8, 8], "counts": "04;0"}},
    ]  # fmt: skip
    a = write_submission(results, tmp_path / "a.zip").read_bytes()
    time.sleep(2.1)  # the zip format's clock has 2-second steps
    b = write_submission(results, tmp_path / "b.zip").read_bytes()
    assert a == b and read_submission(tmp_path / "b.zip") == results
