"""The package works when installed from a wheel, not only from a checkout.

A wheel is built from this tree (``pip wheel --no-deps``), installed without ``-e`` into a target folder, and
run from a temporary folder outside the repository (the checkout is not on ``sys.path``): named recipes are
found inside the package, ``train --recipe tiny_cpu`` trains a few steps and ``demo`` starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a process that imports cellseg_deploy from the installed wheel only."""
    folder = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(folder), str(REPO)], check=True, timeout=300)
    (wheel,) = folder.glob("cellseg_deploy-*.whl")
    target = folder / "site"
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, timeout=300
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    return env


def _cli(
    env: dict[str, str], cwd: Path, *args: str, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    code = "import sys; from cellseg_deploy.cli.main import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_the_installed_package_is_the_wheel_and_ships_its_recipes(
    installed: dict[str, str], tmp_path: Path
) -> None:
    probe = (
        "import cellseg_deploy, sys; from cellseg_deploy.training.recipe import list_recipes, recipes_dir; "
        "from cellseg_deploy.bench.environment import git_commit; "
        "print(cellseg_deploy.__file__); print(recipes_dir()); print(','.join(list_recipes())); print(git_commit())"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=installed, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    site = installed["PYTHONPATH"]
    assert out[0].startswith(site) and out[1].startswith(site), out  # not the checkout
    assert {"tiny_cpu", "r50_fpn_plain", "r50_synth_cpu"} <= set(out[2].split(",")), out
    assert out[3] == "None", "an installed package must not report a checkout's commit"


def test_train_by_recipe_name_and_demo_start_from_the_wheel(
    installed: dict[str, str], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    r = _cli(installed, tmp_path, "data", "synth", str(data), "--train", "3", "--test", "1", "--min-size", "96",
             "--max-size", "128")  # fmt: skip
    assert r.returncode == 0, r.stderr
    steps = ["train.epochs=1", "train.batch_size=1", "val.every_epochs=1", "schedule.warmup_steps=1"]
    steps += [
        "train.time_limit_min=0",
        "schedule.time_aware=false",
        "model.min_size=96",
        "model.max_size=128",
    ]
    r = _cli(installed, tmp_path, "train", "--data", str(data), "--recipe", "tiny_cpu", "--out", str(tmp_path / "run"),
             *(a for s in steps for a in ("--set", s)), "--no-progress")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "run" / "last.pt").is_file()

    # demo: started from the wheel, it finds its recipe and data and gets to training; stopped there.
    code = "import sys; from cellseg_deploy.cli.main import main; sys.exit(main(sys.argv[1:]))"
    out = tmp_path / "demo"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "demo", "--out", str(out), "--train", "3", "--test", "1"],
        cwd=tmp_path, env=installed, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    started = False
    while time.monotonic() < deadline and proc.poll() is None:
        if any(out.glob("**/metrics.jsonl")):  # the training loop's log: data made, recipe found, training
            started = True
            break
        time.sleep(1)
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert started or proc.returncode == 0, f"demo did not reach training from the wheel: {err[-2000:]}"
    assert "not found" not in err, err[-2000:]


def test_the_wheel_holds_every_module_of_the_package_and_each_imports(
    installed: dict[str, str], tmp_path: Path
) -> None:
    """Every ``cellseg_deploy`` module of the checkout is in the wheel (a new backend folder without its
    ``__init__.py``, or left out of the package list, would be missing) and imports from there."""
    source = REPO / "cellseg_deploy"
    expected = sorted(
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for p in source.rglob("*.py")
        if "__pycache__" not in p.parts
    )
    probe = (
        "import importlib, os, sys\n"
        "target = os.environ['PYTHONPATH']\n"
        "for name in sys.argv[1:]:\n"
        "    module = importlib.import_module(name)\n"
        "    assert module.__file__.startswith(target), module.__file__\n"
        "print(len(sys.argv) - 1)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", probe, *expected], cwd=tmp_path, env=installed, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == str(len(expected))
    site = Path(installed["PYTHONPATH"]) / "cellseg_deploy"
    shipped = {p.relative_to(site.parent).as_posix() for p in site.rglob("*.py")}
    missing = [
        m
        for m in expected
        if not ({m.replace(".", "/") + ".py", m.replace(".", "/") + "/__init__.py"} & shipped)
    ]
    assert not missing, missing
