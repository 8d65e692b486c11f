"""The training loop on tiny synthetic runs: outputs, exact resume after SIGKILL, checkpoints that rebuild
the model bit for bit, and a 2-process torchrun (gloo) run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cellseg_deploy.modeling import load_checkpoint
from cellseg_deploy.training import Recipe, load_recipe, train
from cellseg_deploy.training.dataset import InstanceDataset, validation_ground_truth
from cellseg_deploy.training.loop import read_metrics, validate

pytestmark = pytest.mark.slow

# A very small run: 64-96 px images, 6 training images (3 steps of 2 per epoch), 2 validation images.
SMALL = [
    "model.min_size=96",
    "model.max_size=128",
    "model.detections_per_img=50",
    "train.threads=1",
    "data.max_train_images=6",
    "data.max_val_images=2",
    "train.log_every_steps=1",
    "schedule.warmup_steps=2",
    "augment.scale_range=[0.8, 1.2]",
    "augment.brightness=0.2",
    "augment.stain=0.05",
    "train.time_limit_min=0",  # no clock in these runs: bitwise reproducible on any machine
    "schedule.time_aware=false",
]


def _records_without_timing(path: Path) -> list[dict[str, object]]:
    drop = {"elapsed_s", "images_per_s", "val_seconds"}
    return [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(path)]


def _assert_same_weights(a: Path, b: Path) -> None:
    sa = torch.load(a, weights_only=True)
    sb = torch.load(b, weights_only=True)
    assert sa["state_dict"].keys() == sb["state_dict"].keys()
    differ = [k for k in sa["state_dict"] if not torch.equal(sa["state_dict"][k], sb["state_dict"][k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    oa, ob = sa["train_state"]["optimizer"]["state"], sb["train_state"]["optimizer"]["state"]
    assert oa.keys() == ob.keys()
    for k in oa:
        assert torch.equal(oa[k]["momentum_buffer"], ob[k]["momentum_buffer"]), k


def test_resume_after_sigkill_mid_epoch_matches_the_uninterrupted_run(
    small_data: Path, tmp_path: Path
) -> None:
    """Kill a run with SIGKILL one step after a mid-epoch checkpoint; resuming it must reach the same
    weights, optimizer state and metrics as the same run left alone."""
    overrides = [*SMALL, "train.epochs=2", "train.checkpoint_every_steps=2", "val.every_epochs=1"]
    killed, full = tmp_path / "killed", tmp_path / "full"
    script = textwrap.dedent(
        """
        import os, signal, sys
        from pathlib import Path
        from cellseg_deploy.training import load_recipe, train

        def kill_at_5(step):
            if step == 5:  # step 4 was checkpointed (epoch 2, 1 step in); step 5 is lost
                os.kill(os.getpid(), signal.SIGKILL)

        recipe = load_recipe("tiny_cpu", sys.argv[3:])
        train(recipe, Path(sys.argv[1]), Path(sys.argv[2]), progress=False, on_step=kill_at_5)
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(small_data), str(killed), *overrides],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    state = torch.load(killed / "last.pt", weights_only=True)["train_state"]
    assert (state["step"], state["epoch"], state["step_in_epoch"]) == (4, 1, 1), "resumes from mid-epoch"

    recipe = load_recipe("tiny_cpu", overrides)
    resumed = train(recipe, small_data, killed, resume=True, progress=False)
    straight = train(recipe, small_data, full, progress=False)
    assert resumed.steps == straight.steps == 6
    _assert_same_weights(killed / "last.pt", full / "last.pt")
    assert _records_without_timing(killed / "metrics.jsonl") == _records_without_timing(
        full / "metrics.jsonl"
    )
    assert resumed.best_metrics["predictions_sha256"] == straight.best_metrics["predictions_sha256"]


def test_run_folder_holds_everything(small_data: Path, tmp_path: Path) -> None:
    recipe = load_recipe("tiny_cpu", [*SMALL, "train.epochs=2", "val.every_epochs=1", "train.max_steps=5"])
    result = train(recipe, small_data, tmp_path / "run", progress=True)
    run = tmp_path / "run"
    assert result.stop_reason == "max_steps" and result.steps == 5 and result.epochs == 1
    assert Recipe.from_dict(yaml.safe_load((run / "recipe.yaml").read_text())) == recipe
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in records if r["kind"] == "val"] == [3, 5]  # epoch end, then the max_steps stop
    assert all(np.isfinite(r["loss"]) for r in records if r["kind"] == "train")
    # checkpoints: weights_only-loadable, self-describing
    raw = torch.load(run / "last.pt", weights_only=True)
    assert raw["model_config"]["arch"] == "tiny" and raw["model_config"]["min_size"] == 96
    assert raw["recipe"] == recipe.to_dict()
    assert next(iter(raw["metrics"])) == "segm_AP50" and raw["metrics"]["step"] == 5
    assert {"torch", "torchvision", "cellseg_deploy"} <= set(raw["versions"])
    assert {"optimizer", "schedule", "rng", "step", "epoch"} <= set(raw["train_state"])
    best = load_checkpoint(run / "best.pt")
    assert best.train_state is None and best.metrics == result.best_metrics
    with pytest.raises(Exception, match="already holds a run"):
        train(recipe, small_data, run, progress=False)


def test_checkpoint_alone_rebuilds_the_model_and_its_predictions(trained_tiny: tuple[Path, Path]) -> None:
    """The checkpoint (config + weights + recipe) rebuilds a model whose validation predictions are bit-identical
    to those the training process made (same SHA-256 of the raw detections) and score the same AP."""
    checkpoint, data_root = trained_tiny
    ckpt = load_checkpoint(checkpoint)
    recipe = Recipe.from_dict(ckpt.recipe)
    _, val_ds = InstanceDataset.split(data_root, recipe.data, augment=recipe.augment, seed=recipe.seed)
    model = ckpt.build_model()
    metrics = validate(model, val_ds, validation_ground_truth(val_ds), max_dets=recipe.val.max_dets)
    for key in ("predictions_sha256", "segm_AP50", "segm_AP", "segm_AP75", "bbox_AP50", "num_detections"):
        assert metrics[key] == ckpt.metrics[key], key


def test_training_validation_ap_is_what_eval_reports(trained_tiny: tuple[Path, Path]) -> None:
    from cellseg_deploy.evaluation.predict import evaluate_model

    checkpoint, data_root = trained_tiny
    ckpt = load_checkpoint(checkpoint)
    recipe = Recipe.from_dict(ckpt.recipe)
    result = evaluate_model(
        checkpoint, "torch", data_root, "val", max_dets=recipe.val.max_dets,
        val_fraction=recipe.data.val_fraction, seed=recipe.data.split_seed, progress=False,
    )  # fmt: skip
    for iou in ("segm", "bbox"):
        for key in ("AP50", "AP", "AP75"):
            assert result.metrics[iou][key] == ckpt.metrics[f"{iou}_{key}"], (iou, key)
    assert result.metrics["segm"]["num_detections"] == ckpt.metrics["num_detections"]


def test_trained_tiny_detects_cells(trained_tiny: tuple[Path, Path]) -> None:
    """The shared fixture's model is not degenerate: confident detections and a real AP50."""
    from cellseg_deploy.backends.pytorch.runner import TorchRunner
    from cellseg_deploy.data.io import read_image

    checkpoint, data_root = trained_tiny
    ckpt = load_checkpoint(checkpoint)
    assert ckpt.metrics["segm_AP50"] > 0.2, ckpt.metrics
    image = read_image(next((data_root / "train").iterdir()) / "image.tif")
    with TorchRunner(checkpoint) as runner:
        det = runner.infer(image)
    assert (det.scores >= 0.5).sum() >= 3, det.scores[:10]


def test_torchrun_two_cpu_processes_train_and_write_one_checkpoint(small_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "cellseg_deploy.cli.main", "train", "--data", str(small_data), "--out", str(out),
         "--recipe", "tiny_cpu", "--device", "cpu", "--no-progress", "--json", str(tmp_path / "result.json"),
         *[a for s in [*SMALL, "train.epochs=2", "val.every_epochs=1"] for a in ("--set", s)]],
        capture_output=True, text=True, env=env, timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "best.pt",
        "curves.png",
        "last.pt",
        "metrics.jsonl",
        "recipe.yaml",
    ]
    state = torch.load(out / "last.pt", weights_only=True)["train_state"]
    assert state["world_size"] == 2
    # 6 images over 2 processes with batch 2: 2 steps per epoch (3 images each, padded by the sampler)
    assert state["steps_per_epoch"] == 2 and state["step"] == 4
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4], "rank 0 alone writes"
    assert [r["epoch"] for r in records if r["kind"] == "val"] == [1, 2]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2 and result["steps"] == 4
    assert proc.stdout.count("best: ") == 1, proc.stdout


def test_adamw_plateau_bf16_clipping_and_early_stop(small_data: Path, tmp_path: Path) -> None:
    """The other optimizer, schedule and precision: AdamW under CPU bf16 autocast with gradient clipping; a
    plateau schedule and early stopping that both react to a validation AP50 that cannot improve enough."""
    recipe = load_recipe(
        "tiny_cpu",
        [*SMALL, "optim.name=adamw", "optim.lr=1e-3", "optim.grad_clip=1.0", "schedule.name=plateau",
         "schedule.patience=1", "schedule.gamma=0.5", "schedule.warmup_steps=0", "train.precision=bf16",
         "train.epochs=6", "val.every_epochs=1", "val.early_stop_patience=2", "val.min_delta=1.0",
         "data.max_train_images=4"],  # bf16 is emulated, slowly, on CPUs without it
    )  # fmt: skip
    result = train(recipe, small_data, tmp_path / "run", progress=False)
    assert result.stop_reason == "early_stop" and result.epochs == 3
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["best"] for r in records if r["kind"] == "val"] == [True, False, False]
    lrs = {r["epoch_float"]: r["lr"] for r in records if r["kind"] == "train"}
    assert lrs[1.0] == pytest.approx(1e-3) and lrs[3.0] == pytest.approx(5e-4)  # halved after validation 2
    assert all(np.isfinite(r["loss"]) for r in records if r["kind"] == "train")
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["train_state"]
    assert state["schedule"]["plateau_factor"] == pytest.approx(0.25)  # and again after validation 3


@pytest.mark.gpu
def test_amp_on_cuda_trains_and_resumes_its_scaler(small_data: Path, tmp_path: Path) -> None:
    recipe = load_recipe(
        "tiny_cpu", [*SMALL, "train.device=cuda", "train.precision=amp", "train.max_steps=4"]
    )
    result = train(recipe, small_data, tmp_path / "run", progress=False)
    assert result.steps == 4
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["train_state"]
    assert state["scaler"] and state["scaler"]["scale"] > 0
    more = train(
        recipe.with_overrides(["train.max_steps=6"]),
        small_data,
        tmp_path / "run",
        resume=True,
        progress=False,
    )
    assert more.steps == 6
