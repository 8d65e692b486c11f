"""Stage export: files, manifest, float32 boundaries with FP16 insides, dynamic axes, provenance, BatchNorm
folding, and the stage folder's integrity checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
from torch import nn

from cellseg_deploy.backends.staged.stages import (
    STAGES,
    build_stage_modules,
    fold_batchnorm,
    load_stage_folder,
    stage_file,
)
from cellseg_deploy.errors import ModelFileError
from cellseg_deploy.io_utils import sha256_file

pytestmark = pytest.mark.slow


def test_manifest_lists_every_graph_with_its_hash_and_the_source(
    stage_dir: Path, random_tiny_checkpoint: Path
) -> None:
    manifest = json.loads((stage_dir / "manifest.json").read_text())
    assert manifest["format"] == "cellseg-deploy/staged/1"
    assert manifest["precisions"] == ["fp32", "fp16"]
    assert manifest["boundary_dtype"] == "float32"
    for stage in STAGES:
        for precision in ("fp32", "fp16"):
            entry = manifest["stages"][stage]["graphs"][precision]
            assert entry["file"] == stage_file(stage, precision)
            assert entry["sha256"] == sha256_file(stage_dir / entry["file"])
    assert manifest["checkpoint"]["sha256"] == sha256_file(random_tiny_checkpoint)
    assert manifest["model_config"]["arch"] == "tiny"
    assert manifest["geometry"]["levels"] == ["0", "1", "2", "pool"]
    assert manifest["geometry"]["mask_size"] == 28 and manifest["geometry"]["num_classes"] == 5
    assert manifest["profile"]["height"] == [32, 256, 512]
    assert {"torch", "torchvision", "onnx"} <= set(manifest["versions"])
    check = manifest["finite_check"]["fp16"]
    assert check["finite"] is True and check["image"] == [512, 512]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_graphs_keep_float32_boundaries_and_dynamic_axes(stage_dir: Path, precision: str) -> None:
    folder = load_stage_folder(stage_dir)
    for stage, path in folder.graphs(precision).items():
        proto = onnx.load(str(path))
        io = list(proto.graph.input) + list(proto.graph.output)
        assert [v.name for v in proto.graph.output] == folder.output_names(stage)
        for value in io:
            assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT, (stage, value.name)
        dims = proto.graph.input[0].type.tensor_type.shape.dim
        symbolic = [d.dim_param for d in dims if d.dim_param]
        expected = ["batch", "height", "width"] if stage == "backbone_rpn" else ["rois"]
        assert symbolic == expected, (stage, symbolic)
        float_types = {i.data_type for i in proto.graph.initializer if i.data_type in (1, 10)}
        want = onnx.TensorProto.FLOAT16 if precision == "fp16" else onnx.TensorProto.FLOAT
        assert float_types == {want}, (stage, float_types)
        meta = {p.key: p.value for p in proto.metadata_props}
        assert meta["stage"] == stage and meta["precision"] == precision
        assert meta["source_sha256"] == folder.manifest["checkpoint"]["sha256"]


def test_batchnorm_folding_preserves_outputs_and_removes_every_batchnorm() -> None:
    from torchvision.ops.misc import FrozenBatchNorm2d

    from cellseg_deploy.modeling import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="tiny", min_size=256, max_size=512)).eval()
    for module in model.modules():  # give BatchNorm non-trivial statistics
        if isinstance(module, nn.BatchNorm2d | FrozenBatchNorm2d):
            stats: Any = module
            stats.running_mean.uniform_(-0.5, 0.5)
            stats.running_var.uniform_(0.5, 2.0)
    stages = build_stage_modules(model, "fp32")
    assert not any(
        isinstance(m, nn.BatchNorm2d | FrozenBatchNorm2d) for s in stages.values() for m in s.modules()
    )
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the model itself is untouched
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        ref = list(model.backbone(x).values())
        got = stages["backbone_rpn"](x)[: len(ref)]
    for r, g in zip(ref, got, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


def test_fold_batchnorm_leaves_unrelated_pairs_alone() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv_a = nn.Conv2d(3, 4, 1)
            self.norm_b = nn.BatchNorm2d(4)  # not named bnN after convN, and not in a Sequential

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv_a(x) + self.norm_b(x.repeat(1, 2, 1, 1)[:, :4])

    assert fold_batchnorm(Branchy().eval()) == 0
    seq = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU()).eval()
    bn: Any = seq[1]
    bn.running_var.fill_(4.0)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = seq(x)
        assert fold_batchnorm(seq) == 1
        torch.testing.assert_close(seq(x), ref)
    assert isinstance(seq[1], nn.Identity)


def test_stage_folder_refuses_changed_graphs_and_missing_precisions(stage_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "stages"
    shutil.copytree(stage_dir, copy)
    with open(copy / "box_head.fp16.onnx", "ab") as fh:
        fh.write(b"\0")
    folder = load_stage_folder(copy / "manifest.json")
    folder.graphs("fp32")  # untouched precision still loads
    with pytest.raises(ModelFileError, match=r"box_head\.fp16\.onnx does not match the SHA-256"):
        folder.graphs("fp16")

    manifest = json.loads((copy / "manifest.json").read_text())
    for stage in STAGES:
        del manifest["stages"][stage]["graphs"]["fp16"]
    manifest["precisions"] = ["fp32"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFileError, match="no fp16 graphs"):
        load_stage_folder(copy).graphs("fp16")


def test_not_a_stage_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="not a stage folder"):
        load_stage_folder(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "cellseg-deploy/checkpoint/1"}')
    with pytest.raises(ModelFileError, match="not a stage manifest"):
        load_stage_folder(tmp_path)


def test_export_fails_when_fp16_overflows(tmp_path: Path) -> None:
    """Mask-logit weights scaled by 1e4 push the logits past FP16's 65504: the export's finite check on the
    largest profile image catches it (FP32 would be fine), and says which stage."""
    from cellseg_deploy.backends.staged.export import export_staged
    from cellseg_deploy.errors import CheckFailed
    from cellseg_deploy.modeling import ModelConfig, build_model, save_checkpoint

    torch.manual_seed(0)
    config = ModelConfig(arch="tiny", min_size=128, max_size=192)
    model: Any = build_model(config)
    with torch.no_grad():
        model.roi_heads.mask_predictor.mask_fcn_logits.weight.mul_(1e4)
    checkpoint = save_checkpoint(tmp_path / "overflow.pt", model, config)
    with pytest.raises(
        CheckFailed, match=r"fp16 stage graph\(s\) \['mask_head'\] produced inf/NaN on a \[192, 192\]"
    ):
        export_staged(checkpoint, tmp_path / "stages")


def test_staged_torch_needs_the_exact_source_checkpoint(stage_dir: Path, tmp_path: Path) -> None:
    from cellseg_deploy.backends.staged.runner import load_stage_checkpoint

    folder = load_stage_folder(stage_dir)
    assert load_stage_checkpoint(folder).model_config.arch == "tiny"
    with pytest.raises(ModelFileError, match="does not exist here"):
        load_stage_checkpoint(folder, tmp_path / "moved.pt")
    other = tmp_path / "other.pt"
    other.write_bytes(b"not the checkpoint")
    with pytest.raises(ModelFileError, match="is not the one the stage graphs"):
        load_stage_checkpoint(folder, other)


def test_fp16_storage_modules_match_native_fp16_and_catch_an_overflow_inside_a_stage() -> None:
    """The finite check's stage modules (FP16 between layers, FP32 arithmetic) agree with the native FP16
    modules to FP16 precision; and a hidden activation past 65504 (first mask conv x1e5, the next x1e-5, so
    FP32 is fine) is inf in their output though the stage's own output would be in range."""
    from cellseg_deploy.backends.staged.stages import fp16_storage_stage_modules
    from cellseg_deploy.modeling import ModelConfig, build_model

    torch.manual_seed(0)
    model: Any = build_model(ModelConfig(arch="tiny", min_size=128, max_size=192))
    storage, native = fp16_storage_stage_modules(model), build_stage_modules(model, "fp16")
    x = torch.randn(1, 3, 64, 96)
    with torch.inference_mode():
        got, ref = storage["backbone_rpn"](x), native["backbone_rpn"](x)
    assert len(got) == len(ref) > 0
    for g, r in zip(got, ref, strict=True):
        assert g.dtype == r.dtype == torch.float32 and g.shape == r.shape
        torch.testing.assert_close(g, r, rtol=2e-2, atol=2e-2 * float(r.abs().max()))

    with torch.no_grad():
        model.roi_heads.mask_head[0][0].weight.mul_(1e5)
        model.roi_heads.mask_head[0][0].bias.mul_(1e5)
        model.roi_heads.mask_head[1][0].weight.mul_(1e-5)
    feats = torch.rand(2, 64, 14, 14)
    with torch.inference_mode():
        fp32 = build_stage_modules(model, "fp32")["mask_head"](feats)
        fp16 = fp16_storage_stage_modules(model)["mask_head"](feats)
    assert all(bool(torch.isfinite(t).all()) for t in fp32)
    assert not all(bool(torch.isfinite(t).all()) for t in fp16)
