"""Retuned checkpoints: the same weights with another RPN proposal count, which the model then really uses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cellseg_deploy.cli.main import main
from cellseg_deploy.errors import ConfigError
from cellseg_deploy.io_utils import sha256_file
from cellseg_deploy.modeling import ModelConfig, load_checkpoint, retune_checkpoint, with_proposals


def test_with_proposals_sets_both_counts_and_checks_them() -> None:
    config = ModelConfig(arch="tiny")
    assert (config.rpn_pre_nms_top_n_test, config.rpn_post_nms_top_n_test) == (1000, 1000)
    fewer = with_proposals(config, 300)
    assert (fewer.rpn_pre_nms_top_n_test, fewer.rpn_post_nms_top_n_test) == (300, 300)
    split = with_proposals(config, 300, pre_nms=500)
    assert (split.rpn_pre_nms_top_n_test, split.rpn_post_nms_top_n_test) == (500, 300)
    assert split.rpn_post_nms_top_n_train == config.rpn_post_nms_top_n_train  # training settings untouched
    with pytest.raises(ConfigError, match="--proposals must be at least 1"):
        with_proposals(config, 0)


def _rois_per_image(model: torch.nn.Module, image: torch.Tensor) -> int:
    """How many RoIs the box head pooled for one image (the RPN's proposals after its NMS)."""
    seen: list[int] = []
    hook = model.roi_heads.box_roi_pool.register_forward_hook(
        lambda _m, args, _out: seen.append(sum(len(b) for b in args[1]))
    )
    try:
        with torch.no_grad():
            model([image])
    finally:
        hook.remove()
    return seen[0]


def test_retuned_checkpoint_has_the_same_weights_and_fewer_rois(
    random_tiny_checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "p40.pt"
    returned = retune_checkpoint(random_tiny_checkpoint, out, 40)
    src, new = load_checkpoint(random_tiny_checkpoint), load_checkpoint(out)
    assert src.state_dict.keys() == new.state_dict.keys()
    assert all(torch.equal(src.state_dict[k], new.state_dict[k]) for k in src.state_dict)
    record = new.model_config.extra["retuned"]
    assert returned == record
    assert record["from_sha256"] == sha256_file(random_tiny_checkpoint)
    assert record["changes"] == {"rpn_pre_nms_top_n_test": [1000, 40], "rpn_post_nms_top_n_test": [1000, 40]}
    assert new.metrics == {} and new.train_state is None
    # A random-weight RPN has far more than 40 candidates on any image, so it fills the new quota exactly.
    image = torch.rand(3, 256, 256, generator=torch.Generator().manual_seed(0))
    assert _rois_per_image(src.build_model(), image) > 40
    assert _rois_per_image(new.build_model(), image) == 40


def test_retune_refuses_to_replace_its_source(random_tiny_checkpoint: Path) -> None:
    with pytest.raises(ConfigError, match="must not replace its source"):
        retune_checkpoint(random_tiny_checkpoint, random_tiny_checkpoint, 40)


def test_retune_command(
    random_tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, out = str(random_tiny_checkpoint), tmp_path / "p50.pt"
    assert main(["retune", src, "--proposals", "50", "--pre-nms", "80", "--out", str(out)]) == 0
    assert "rpn_post_nms_top_n_test 1000 -> 50" in capsys.readouterr().out
    config = load_checkpoint(out).model_config
    assert (config.rpn_pre_nms_top_n_test, config.rpn_post_nms_top_n_test) == (80, 50)
    # an existing output is never replaced silently; a bad count is one line and writes nothing
    assert main(["retune", src, "--proposals", "50", "--out", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["retune", src, "--proposals", "0", "--out", str(tmp_path / "x.pt")]) == 2
    assert "--proposals must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()
