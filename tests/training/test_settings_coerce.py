"""One converter for YAML settings: the model config and the recipe sections read values the same way."""

from __future__ import annotations

from pathlib import Path

import pytest

from cellseg_deploy.errors import ConfigError
from cellseg_deploy.modeling.coerce import coerce, type_name
from cellseg_deploy.modeling.config import ModelConfig
from cellseg_deploy.training.recipe import load_recipe


def test_a_model_float_written_without_a_dot_reads_as_a_number(tmp_path: Path) -> None:
    # PyYAML (YAML 1.1) reads 1e-5 as the string "1e-5"; the recipe sections always took it, now model: does too.
    path = tmp_path / "r.yaml"
    path.write_text("model: {arch: tiny, frozen_bn_eps: 1e-5, score_thresh: 5e-2}\noptim: {lr: 1e-3}\n")
    recipe = load_recipe(path)
    assert recipe.model.frozen_bn_eps == pytest.approx(1e-5)
    assert recipe.model.score_thresh == pytest.approx(0.05)
    assert recipe.optim.lr == pytest.approx(1e-3)


def test_model_values_keep_their_types_and_round_trip() -> None:
    config = ModelConfig.from_dict(
        {"arch": "tiny", "aspect_ratios": [1, 2], "anchor_sizes": [[8], [16], [32], [64]], "extra": {"k": 1}}
    )
    assert config.aspect_ratios == (1.0, 2.0) and isinstance(config.aspect_ratios[0], float)
    assert config.anchor_sizes == ((8,), (16,), (32,), (64,))
    assert config.extra == {"k": 1}
    assert ModelConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"min_size": "x"}, "model.min_size: expected an integer, got 'x'"),
        ({"extra": [1]}, "model.extra: expected a mapping, got list"),
        ({"trainable_backbone_layers": 1.5}, "model.trainable_backbone_layers: expected an integer or null"),
        ({"frozen_bn_eps": True}, "model.frozen_bn_eps: expected a number or null, got True"),
        ({"image_mean": [0.5, 0.5]}, "model.image_mean: expected a list of 3 numbers"),
        ({"anchor_sizes": 3}, "model.anchor_sizes: expected a preset name"),
    ],
)
def test_a_wrong_model_value_names_the_key(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_dict(data)
    assert message in str(info.value)


def test_coerce_by_annotation() -> None:
    assert coerce("k", [1, "2e-1"], tuple[float, ...]) == (1.0, 0.2)
    assert coerce("k", None, int | None) is None
    assert coerce("k", "sgd", str, ("sgd", "adamw")) == "sgd"
    with pytest.raises(ConfigError, match=r"k: unknown value 'adam'; expected one of \['sgd', 'adamw'\]"):
        coerce("k", "adam", str, ("sgd", "adamw"))
    with pytest.raises(ConfigError, match="k: expected true/false, got 1"):
        coerce("k", 1, bool)
    assert type_name(tuple[float, float]) == "a list of 2 numbers"
