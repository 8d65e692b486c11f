"""The data CLI group: help with an example on every command, exit codes for bad usage."""

from __future__ import annotations

import pytest

from cellseg_deploy.cli.main import main


@pytest.mark.parametrize("command", ["synth", "check", "to-coco"])
def test_help_has_an_example(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "Example" in out and f"cellseg-deploy data {command}" in out


def test_bad_split_is_a_usage_error(tmp_path: object, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "to-coco", ".", "--out", "x.json", "--split", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
