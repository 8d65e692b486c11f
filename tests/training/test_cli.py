"""``cellseg-deploy train``: bad recipes and flags give one line naming the key and exit 2."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cellseg_deploy.cli.main import main


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["train", *args])
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.fixture
def empty_root(tmp_path: Path) -> Path:
    (tmp_path / "data" / "train").mkdir(parents=True)
    return tmp_path / "data"


@pytest.mark.parametrize(
    ("flags", "must_name"),
    [
        (["--set", "optim.lrr=0.1"], ["optim", "lrr", "'lr'"]),
        (["--set", "train.epochs=many"], ["train.epochs", "an integer"]),
        (["--set", "model.arch=resnet9"], ["model.arch", "'tiny'", "'r50-fpn'"]),
        (["--set", "optim.name=rmsprop"], ["optim.name", "'sgd'", "'adamw'"]),
        (["--recipe", "no_such_recipe"], ["no_such_recipe", "tiny_cpu"]),
        (["--device", "tpu"], ["train.device", "'cpu'", "'cuda'"]),
        (["--set", "train.precision=amp", "--device", "cpu"], ["train.precision", "CUDA", "bf16"]),
    ],
)
def test_bad_flags_exit_2_with_one_line_naming_the_key(
    capsys: pytest.CaptureFixture[str],
    empty_root: Path,
    tmp_path: Path,
    flags: list[str],
    must_name: list[str],
) -> None:
    code, err = _run(capsys, "--data", str(empty_root), "--out", str(tmp_path / "run"), *flags)
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    for part in must_name:
        assert part in err, (part, err)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_missing_data_folder(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, err = _run(capsys, "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run"))
    assert code == 2
    assert len(err.splitlines()) == 1 and "train/" in err and "nowhere" in err


def test_dataset_without_samples(
    capsys: pytest.CaptureFixture[str], empty_root: Path, tmp_path: Path
) -> None:
    code, err = _run(capsys, "--data", str(empty_root), "--out", str(tmp_path / "run"))
    assert code == 2
    assert len(err.splitlines()) == 1 and "at least 2" in err


def test_resume_without_a_run(capsys: pytest.CaptureFixture[str], empty_root: Path, tmp_path: Path) -> None:
    code, err = _run(capsys, "--data", str(empty_root), "--out", str(tmp_path / "run"), "--resume")
    assert code == 2
    assert "nothing to resume" in err and len(err.splitlines()) == 1


def test_missing_init_file(capsys: pytest.CaptureFixture[str], empty_root: Path, tmp_path: Path) -> None:
    code, err = _run(
        capsys, "--data", str(empty_root), "--out", str(tmp_path / "run"), "--init", str(tmp_path / "w.pth")
    )
    assert code == 2
    assert "w.pth" in err and len(err.splitlines()) == 1


def test_pretrained_download_failure_is_one_clear_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, empty_root: Path, tmp_path: Path
) -> None:
    """torchvision's download fails (no network; forced here through an unreachable proxy so the test is the
    same with or without network): one line naming the offline alternatives, exit 2, no traceback."""
    import urllib.request

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no cached weights
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.setattr(urllib.request, "_opener", None)  # rebuilt from the proxy variables above
    start = time.perf_counter()
    code, err = _run(
        capsys,
        "--data",
        str(empty_root),
        "--out",
        str(tmp_path / "run"),
        "--pretrained",
        "imagenet",
        "--no-progress",
    )
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    assert "--init" in lines[0] and "--pretrained-backbone" in lines[0] and "download" in lines[0]
    assert "Traceback" not in err
    assert time.perf_counter() - start < 60


def test_help_has_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "cellseg-deploy train --data" in out and "torchrun" in out and "--set" in out


@pytest.mark.slow
def test_local_weights_start_the_run(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture, small_data: Path, tmp_path: Path
) -> None:
    """Offline initial weights: ``--pretrained-backbone`` (an ImageNet-style trunk state dict) and ``--init``
    (a whole model, here the first run's checkpoint) load, are logged and are recorded in the recipe."""
    import logging

    import torch
    from torchvision.models import resnet18

    from cellseg_deploy.modeling import load_checkpoint

    trunk = tmp_path / "resnet18.pth"
    torch.save(resnet18(weights=None).state_dict(), trunk)
    quick = ["--set", "train.max_steps=1", "--set", "model.min_size=64", "--set", "model.max_size=96",
             "--set", "data.max_val_images=1", "--set", "train.threads=1", "--no-progress"]  # fmt: skip
    caplog.set_level(logging.INFO, logger="cellseg_deploy")
    first, second = tmp_path / "a", tmp_path / "b"
    code = main(
        ["train", "--data", str(small_data), "--out", str(first), "--pretrained-backbone", str(trunk), *quick]
    )
    assert code == 0, capsys.readouterr().err
    assert "pretrained_backbone: loaded" in caplog.text
    assert load_checkpoint(first / "last.pt").recipe["weights"]["pretrained_backbone"] == str(trunk)
    caplog.clear()
    code = main(
        ["train", "--data", str(small_data), "--out", str(second), "--init", str(first / "last.pt"), *quick]
    )
    assert code == 0, capsys.readouterr().err
    assert "init: loaded" in caplog.text
    assert load_checkpoint(second / "last.pt").recipe["weights"]["init"] == str(first / "last.pt")
