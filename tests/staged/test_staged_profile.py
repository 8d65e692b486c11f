"""Stage profiles: defaults from the model config, validation, shapes per stage, and that the default profile
covers every size torchvision's transform can produce."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from cellseg_deploy.backends.staged.stages import StageProfile
from cellseg_deploy.errors import ConfigError
from cellseg_deploy.modeling import ModelConfig

TINY = ModelConfig(arch="tiny", min_size=256, max_size=512)


def test_for_model_covers_the_configs_sizes_and_caps() -> None:
    p = StageProfile.for_model(TINY)
    assert p.batch == (1, 1, 1)
    assert p.height == (32, 256, 512) and p.width == (32, 256, 512)
    assert p.box_rois == (1, TINY.rpn_post_nms_top_n_test, TINY.rpn_post_nms_top_n_test)
    assert p.mask_rois == (1, TINY.detections_per_img, TINY.detections_per_img)
    assert (p.image_min, p.image_opt, p.image_max) == ((32, 32), (256, 256), (512, 512))


def test_for_model_scales_rois_with_batch_and_rounds_sizes_up() -> None:
    config = ModelConfig(arch="tiny", min_size=500, max_size=1000, detections_per_img=300)
    p = StageProfile.for_model(config, max_batch=3, opt_size=(450, 2000))
    assert p.batch == (1, 1, 3)
    assert p.height == (32, 480, 1024)  # 450 -> 480; max 1000 -> 1024
    assert p.width == (32, 1024, 1024)  # an optimum above the maximum is clipped to it
    assert p.box_rois[2] == 3 * config.rpn_post_nms_top_n_test
    assert p.mask_rois == (1, 300, 900)
    assert p.max_rois("mask_head") == 900 and p.max_rois("box_head") == 3000


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"height": (64, 32, 512)}, "min <= opt <= max"),
        ({"width": (32, 256, 500)}, "multiples of 32"),
        ({"box_rois": (0, 10, 20)}, "1 <= min"),
        ({"batch": (1, 2)}, "three integers"),
    ],
)
def test_invalid_profiles_name_the_field(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        StageProfile(**changes)


def test_max_batch_below_one_is_rejected() -> None:
    with pytest.raises(ConfigError, match="max_batch"):
        StageProfile.for_model(TINY, max_batch=0)


def test_input_shapes_per_stage() -> None:
    p = StageProfile(batch=(1, 2, 4), height=(32, 256, 512), width=(64, 320, 512), box_rois=(1, 500, 1000))
    assert p.input_shapes("backbone_rpn", 64, 0) == ((1, 3, 32, 64), (2, 3, 256, 320), (4, 3, 512, 512))
    assert p.input_shapes("box_head", 64, 7) == ((1, 64, 7, 7), (500, 64, 7, 7), (1000, 64, 7, 7))
    assert p.input_shapes("mask_head", 256, 14) == ((1, 256, 14, 14), (100, 256, 14, 14), (100, 256, 14, 14))
    with pytest.raises(ConfigError, match="unknown stage"):
        p.input_shapes("rpn", 64, 7)


def test_image_problem_names_the_axis_outside_the_range() -> None:
    p = StageProfile.for_model(TINY)
    assert p.image_problem(1, 256, 512) is None
    message = p.image_problem(2, 544, 256)
    assert message is not None
    assert "batch 2 outside [1, 1]" in message and "height 544 outside [32, 512]" in message
    assert "width" not in message.split("(")[1]
    assert "\n" not in message


def test_round_trip_and_unknown_keys() -> None:
    p = StageProfile.for_model(TINY, max_batch=2, opt_size=(320, 480))
    assert StageProfile.from_dict(p.to_dict()) == p
    with pytest.raises(ConfigError, match="unknown key"):
        StageProfile.from_dict({**p.to_dict(), "rois": [1, 2, 3]})
    with pytest.raises(ConfigError, match=r"\[min, opt, max\]"):
        StageProfile.from_dict({**p.to_dict(), "height": 512})


def test_default_profile_covers_every_size_the_transform_produces() -> None:
    """Sizes from 33 to 2500 px per side (the data's range), elongated both ways: the padded batch the host
    transform makes always lies inside the default profile."""
    from cellseg_deploy.backends.staged.runner import build_host_model

    transform: Any = build_host_model(TINY).transform
    profile = StageProfile.for_model(TINY)
    gen = torch.Generator().manual_seed(0)
    sizes: list[tuple[int, int]] = [(33, 2500), (2500, 33), (33, 33), (2500, 2500), (511, 513), (256, 257)]
    for _ in range(14):
        h, w = (int(v) for v in torch.randint(33, 2501, (2,), generator=gen))
        sizes.append((h, w))
    for h, w in sizes:
        batch, _ = transform([torch.zeros(3, h, w)])
        _, _, ph, pw = batch.tensors.shape
        assert profile.image_problem(1, ph, pw) is None, (h, w, ph, pw)
