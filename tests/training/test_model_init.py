"""Starting from trained weights builds the model as torchvision does (issue 21.2): frozen BatchNorm in the
trunk, torchvision's trainable-stage count, the structure recorded in checkpoints, SyncBatchNorm where
BatchNorm trains under DDP. Weight files are made here (never downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import resnet18, resnet50
from torchvision.models.detection import maskrcnn_resnet50_fpn
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.misc import FrozenBatchNorm2d

from cellseg_deploy.distributed import DistInfo, sync_batchnorm
from cellseg_deploy.modeling import ModelConfig, build_model, load_checkpoint, save_checkpoint
from cellseg_deploy.modeling.builder import resolve_model_config

SMALL_R50 = ModelConfig(arch="r50-fpn", min_size=128, max_size=160)


def _norms(module: nn.Module) -> set[type]:
    return {type(m) for m in module.modules() if isinstance(m, nn.BatchNorm2d | FrozenBatchNorm2d)}


def _trainable(module: nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def coco_like_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torchvision Mask R-CNN R50-FPN state dict (91 COCO classes, random but non-trivial BN statistics),
    in the layout of torchvision's maskrcnn_resnet50_fpn_coco file."""
    torch.manual_seed(0)
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    state = model.state_dict()
    for key in state:
        if key.endswith("running_mean"):
            state[key] = torch.randn_like(state[key])
        elif key.endswith("running_var"):
            state[key] = torch.rand_like(state[key]) + 0.5
    path = tmp_path_factory.mktemp("weights") / "maskrcnn_resnet50_fpn_coco-like.pth"
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path)
    return path


def test_coco_init_freezes_batchnorm_and_trains_torchvisions_three_stages(coco_like_file: Path) -> None:
    model = build_model(SMALL_R50, init=coco_like_file)
    body = model.backbone.body
    assert _norms(body) == {FrozenBatchNorm2d}, "the trunk must not train BatchNorm statistics"
    # torchvision's own choice for trained weights: FrozenBatchNorm2d and 3 trainable stages.
    reference = _resnet_fpn_extractor(resnet50(weights=None, norm_layer=FrozenBatchNorm2d), 3).body
    assert _trainable(body) == _trainable(reference)
    assert {n.split(".")[0] for n in _trainable(body)} == {"layer2", "layer3", "layer4"}
    state = torch.load(coco_like_file, weights_only=True)
    assert torch.equal(body.bn1.running_mean, state["backbone.body.bn1.running_mean"])  # loaded, kept
    assert body.bn1.eps == pytest.approx(1e-5)


def test_checkpoint_rebuilds_the_frozen_structure(coco_like_file: Path, tmp_path: Path) -> None:
    config = resolve_model_config(SMALL_R50, init=coco_like_file)
    assert (config.backbone_norm, config.trainable_backbone_layers) == ("frozen", 3)
    model = build_model(config, init=coco_like_file)
    save_checkpoint(tmp_path / "m.pt", model, config)
    rebuilt = load_checkpoint(tmp_path / "m.pt").build_model()  # strict load
    assert _norms(rebuilt.backbone.body) == {FrozenBatchNorm2d}
    assert _trainable(rebuilt) == _trainable(model)


def test_random_init_keeps_trainable_batchnorm_and_every_stage() -> None:
    model = build_model(ModelConfig(arch="tiny", min_size=96, max_size=128))
    assert _norms(model.backbone.body) == {nn.BatchNorm2d}
    assert all(p.requires_grad for p in model.parameters())


def test_resolution_follows_torchvision() -> None:
    coco = resolve_model_config(SMALL_R50, pretrained="coco")
    assert (coco.backbone_norm, coco.trainable_backbone_layers, coco.frozen_bn_eps) == ("frozen", 3, 0.0)
    v2 = resolve_model_config(ModelConfig(arch="r50-fpn-v2"), pretrained="coco")
    assert (v2.backbone_norm, v2.trainable_backbone_layers, v2.frozen_bn_eps) == ("batch", 3, 1e-5)
    imagenet = resolve_model_config(ModelConfig(arch="tiny"), pretrained="imagenet")
    assert (imagenet.backbone_norm, imagenet.trainable_backbone_layers) == ("frozen", 3)
    explicit = resolve_model_config(
        SMALL_R50.replace(trainable_backbone_layers=5, backbone_norm="batch"), pretrained="coco"
    )
    assert (explicit.backbone_norm, explicit.trainable_backbone_layers) == ("batch", 5)
    untrained = resolve_model_config(SMALL_R50)
    assert (untrained.backbone_norm, untrained.trainable_backbone_layers) == ("batch", 5)
    # A resolved config (as a checkpoint records it) rebuilds the same structure without weights.
    assert resolve_model_config(coco) == coco
    assert resolve_model_config(coco, pretrained="coco") == coco  # idempotent


def test_imagenet_backbone_file_on_tiny(tmp_path: Path) -> None:
    torch.manual_seed(1)
    path = tmp_path / "resnet18-like.pth"
    torch.save(resnet18(weights=None).state_dict(), path)
    model = build_model(ModelConfig(arch="tiny", min_size=96, max_size=128), pretrained_backbone=path)
    assert _norms(model.backbone.body) == {FrozenBatchNorm2d}
    assert {n.split(".")[0] for n in _trainable(model.backbone.body)} == {"layer2", "layer3"}


def test_sync_batchnorm_only_where_batchnorm_trains_under_ddp(coco_like_file: Path) -> None:
    two_gpus = DistInfo(rank=0, world_size=2)
    cuda0 = torch.device("cuda", 0)
    random_tiny = build_model(ModelConfig(arch="tiny", min_size=96, max_size=128))
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in random_tiny.modules())
    assert sync_batchnorm(random_tiny, DistInfo(), cuda0) == 0  # one process
    assert sync_batchnorm(random_tiny, two_gpus, torch.device("cpu")) == 0  # gloo: no SyncBatchNorm kernel
    params = {id(p) for p in random_tiny.parameters()}
    assert sync_batchnorm(random_tiny, two_gpus, cuda0) == n_bn > 0
    assert _norms(random_tiny) == set()
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in random_tiny.modules()) == n_bn
    assert {id(p) for p in random_tiny.parameters()} == params, "an optimizer made before must still work"
    frozen = build_model(SMALL_R50, init=coco_like_file)
    assert sync_batchnorm(frozen, two_gpus, cuda0) == 0
    assert _norms(frozen.backbone.body) == {FrozenBatchNorm2d}


@pytest.mark.slow
def test_fine_tuning_keeps_the_trunk_statistics_and_resumes(tmp_path: Path) -> None:
    """A short run from an ImageNet-like backbone file: BatchNorm statistics stay those of the file, the
    checkpoint records the frozen structure, and --resume rebuilds it (strict load)."""
    from cellseg_deploy.data.synth import SynthConfig, make_synthetic_dataset
    from cellseg_deploy.training import load_recipe, train

    root = tmp_path / "data"
    make_synthetic_dataset(
        root, SynthConfig(n_train=6, n_test=0, min_size=64, max_size=96, seed=5), progress=False
    )
    torch.manual_seed(2)
    trunk = resnet18(weights=None)
    state = trunk.state_dict()
    for key in state:
        if key.endswith("running_mean"):
            state[key] = torch.randn_like(state[key]) * 0.1
    backbone_file = tmp_path / "resnet18-like.pth"
    torch.save(state, backbone_file)
    overrides = [
        "model.min_size=96",
        "model.max_size=128",
        "train.threads=1",
        "train.time_limit_min=0",
        "schedule.time_aware=false",
        "data.max_train_images=4",
        "data.max_val_images=2",
        "train.epochs=2",
        "train.max_steps=2",
        f"weights.pretrained_backbone={backbone_file}",
    ]
    run = tmp_path / "run"
    train(load_recipe("tiny_cpu", [*overrides, "train.max_steps=1"]), root, run, progress=False)
    result = train(load_recipe("tiny_cpu", overrides), root, run, resume=True, progress=False)
    assert result.steps == 2
    ckpt = load_checkpoint(run / "last.pt")
    assert (ckpt.model_config.backbone_norm, ckpt.model_config.trainable_backbone_layers) == ("frozen", 3)
    for key in ("bn1.running_mean", "layer1.0.bn1.running_mean", "layer3.1.bn2.running_var"):
        assert torch.equal(ckpt.state_dict[f"backbone.body.{key}"], state[key]), key
    assert not torch.equal(
        ckpt.state_dict["backbone.body.layer3.0.conv1.weight"], state["layer3.0.conv1.weight"]
    )
    assert torch.equal(ckpt.state_dict["backbone.body.layer1.0.conv1.weight"], state["layer1.0.conv1.weight"])
