"""Recipes: every shipped recipe loads; overrides work; bad keys, types and values name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cellseg_deploy.errors import ConfigError
from cellseg_deploy.training import Recipe, list_recipes, load_recipe
from cellseg_deploy.training.recipe import allowed_keys, recipes_dir

SHIPPED = ("r50_fpn_plain", "r50_small_anchors_adamw", "tiny_cpu")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_loads_and_round_trips(name: str) -> None:
    recipe = load_recipe(name)
    assert recipe.name == name
    assert recipe.source, "every shipped recipe says where its numbers come from"
    again = Recipe.from_dict(yaml.safe_load(recipe.to_yaml()))
    assert again == recipe


def test_list_recipes_names_the_shipped_ones() -> None:
    assert set(SHIPPED) <= set(list_recipes())


def test_plain_recipe_matches_the_published_numbers() -> None:
    r = load_recipe(recipes_dir() / "r50_fpn_plain.yaml")
    assert (r.model.arch, r.optim.name, r.optim.lr, r.optim.momentum, r.optim.weight_decay) == (
        "r50-fpn",
        "sgd",
        1e-3,
        0.9,
        5e-4,
    )
    assert (r.train.batch_size, r.train.epochs, r.model.min_size, r.train.precision) == (1, 50, 512, "auto")
    s = load_recipe("r50_small_anchors_adamw")
    assert (s.model.anchor_sizes, s.optim.name, s.optim.lr, s.model.detections_per_img) == (
        "small",
        "adamw",
        5e-5,
        1000,
    )


def test_overrides_apply_with_yaml_values() -> None:
    r = load_recipe(
        "tiny_cpu",
        [
            "optim.lr=1e-3",
            "augment.scale_range=[0.8, 1.25]",
            "weights.init=null",
            "seed=7",
            "model.min_size=320",
            "train.deterministic=false",
            "schedule.milestones=[3, 5]",
        ],
    )
    assert r.optim.lr == pytest.approx(1e-3)
    assert r.augment.scale_range == (0.8, 1.25)
    assert r.weights.init is None
    assert r.seed == 7
    assert r.model.min_size == 320
    assert r.train.deterministic is False
    assert r.schedule.milestones == (3, 5)
    assert r.with_overrides(["optim.lr=0.5"]).optim.lr == 0.5


@pytest.mark.parametrize(
    ("override", "must_name"),
    [
        ("optim.lrr=0.1", ["optim", "lrr", "'lr'", "'weight_decay'"]),
        ("bogus.lr=0.1", ["bogus", "'optim'", "'train'"]),
        ("lr=0.1", ["lr", "'seed'"]),
        ("optim.lr=fast", ["optim.lr", "a number", "fast"]),
        ("train.epochs=2.5", ["train.epochs", "an integer"]),
        ("train.deterministic=maybe", ["train.deterministic", "true/false"]),
        ("optim.name=adam", ["optim.name", "'sgd'", "'adamw'"]),
        ("schedule.name=linear", ["schedule.name", "'cosine'", "'plateau'"]),
        ("train.precision=fp8", ["train.precision", "'amp'", "'bf16'"]),
        ("model.arch=resnet", ["model.arch", "'tiny'", "'r50-fpn'"]),
        ("model.min_sise=3", ["model", "min_sise", "'min_size'"]),
        ("augment.scale_range=[0.5]", ["augment.scale_range", "a list of 2"]),
        ("optim.lr=-1", ["optim.lr", "> 0"]),
        ("augment.hflip=1.5", ["augment.hflip", "[0, 1]"]),
        ("train.device=gpu", ["train.device", "'cuda:N'"]),
        ("optim.lr", ["KEY=VALUE"]),
        ("weights.pretrained=yes", ["weights.pretrained", "'imagenet'"]),
    ],
)
def test_bad_override_names_the_key_and_the_allowed_values(override: str, must_name: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_recipe("tiny_cpu", [override])
    message = str(info.value)
    assert "\n" not in message
    for part in must_name:
        assert part in message, (part, message)


def test_bad_recipe_file(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("optim: {lr: 0.1, warp: 3}\n")
    with pytest.raises(ConfigError, match=r"optim: unknown key\(s\) \['warp'\]"):
        load_recipe(path)
    path.write_text("optim: [1, 2]\n")
    with pytest.raises(ConfigError, match="optim: expected a mapping"):
        load_recipe(path)
    path.write_text("nonsense: 1\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_recipe(path)
    with pytest.raises(ConfigError, match="tiny_cpu"):
        load_recipe("no_such_recipe")


def test_a_partial_recipe_takes_defaults_and_its_file_name(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("model: {arch: tiny}\noptim: {lr: 5e-4}\n")
    r = load_recipe(path, ["train.epochs=3"])
    assert (r.name, r.model.arch, r.optim.lr, r.train.epochs) == ("mine", "tiny", 5e-4, 3)
    assert r.train.batch_size == Recipe().train.batch_size


def test_every_allowed_key_is_overridable() -> None:
    base = load_recipe("tiny_cpu")
    data = base.to_dict()
    for key in allowed_keys():
        section, _, name = key.partition(".")
        value = data[section][name] if name else data[section]
        text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        assert base.with_overrides([f"{key}={text}"]) == base, key


def test_gpu_defaults_fast_kernels_and_data_workers() -> None:
    """Issue 21.7: deterministic algorithms only when asked; data workers on CUDA, none on the CPU."""
    import torch

    from cellseg_deploy.training.loop import available_cores, default_num_workers

    r = Recipe()
    assert r.train.deterministic is False
    assert r.train.tf32 is False
    assert r.data.num_workers is None  # auto
    assert default_num_workers(torch.device("cpu")) == 0
    cuda = default_num_workers(torch.device("cuda", 0))
    assert 1 <= cuda <= 4 and cuda <= max(1, available_cores() - 1)
    assert default_num_workers(torch.device("cuda", 0), local_processes=64) == 1
    for name in ("tiny_cpu", "r50_synth_cpu"):  # CPU recipes keep bitwise reproducibility (free there)
        assert load_recipe(name).train.deterministic is True
    for name in ("r50_fpn_plain", "r50_small_anchors_adamw"):
        gpu = load_recipe(name)
        assert gpu.train.deterministic is False and gpu.data.num_workers is None
    assert load_recipe("tiny_cpu", ["data.num_workers=3"]).data.num_workers == 3


def test_training_and_validation_run_without_tf32_unless_asked() -> None:
    """Issue 21.3: the run's torch settings turn TF32 off (fp32 training and validation are fp32 on a GPU)."""
    import torch

    from cellseg_deploy.backends.devices import restore_tf32, set_tf32
    from cellseg_deploy.training.loop import _torch_settings

    before = set_tf32(True)  # cuDNN TF32 is torch's own default
    try:
        with _torch_settings(1, deterministic=False):
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
        assert torch.backends.cudnn.allow_tf32 is True  # restored
        with _torch_settings(1, deterministic=False, allow_tf32=True):
            assert torch.backends.cudnn.allow_tf32 is True
        assert load_recipe("tiny_cpu", ["train.tf32=true"]).train.tf32 is True
    finally:
        restore_tf32(before)
