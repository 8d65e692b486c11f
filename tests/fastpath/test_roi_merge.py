"""The gather-based level merge equals torchvision's scatter-based one, and exports to an identical graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.ops.poolers as poolers

from cellseg_deploy.backends.onnxrt.roi_merge import gather_level_merge, merge_levels_by_gather


@pytest.mark.parametrize("counts", [(5, 0, 3, 1), (0, 0, 0, 4), (2, 2, 2, 2), (0, 0, 0, 0)])
def test_merge_equals_torchvision(counts: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(0)
    levels = torch.cat([torch.full((c,), lvl, dtype=torch.int64) for lvl, c in enumerate(counts)])
    levels = levels[torch.randperm(len(levels), generator=gen)]
    per_level = [
        torch.randn(int((levels == lvl).sum()), 3, 2, 2, generator=gen) for lvl in range(len(counts))
    ]
    expected = poolers._onnx_merge_levels(levels, per_level)
    got = merge_levels_by_gather(levels, per_level)
    assert got.shape == expected.shape
    assert torch.equal(got, expected)


def test_context_restores_torchvision() -> None:
    original = poolers._onnx_merge_levels
    with pytest.raises(RuntimeError), gather_level_merge():
        assert poolers._onnx_merge_levels is merge_levels_by_gather
        raise RuntimeError("boom")
    assert poolers._onnx_merge_levels is original


@pytest.mark.slow
def test_export_with_gather_merge_gives_identical_outputs(
    fast_checkpoint: Path,
    fast_onnx: Path,
    tmp_path: Path,
    fast_cell_images: dict[str, np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The exporter uses the gather merge by default; torchvision's own merge gives the same outputs."""
    import contextlib

    import onnx
    import onnxruntime as ort

    import cellseg_deploy.backends.onnxrt.roi_merge as roi_merge
    from cellseg_deploy.backends.onnxrt.export import export_onnx

    plain = tmp_path / "scatter.onnx"
    with monkeypatch.context() as m:
        m.setattr(roi_merge, "gather_level_merge", contextlib.nullcontext)
        export_onnx(fast_checkpoint, plain)

    def count(path: Path, op: str) -> int:
        return sum(n.op_type == op for n in onnx.load(str(path)).graph.node)

    assert count(plain, "ScatterElements") == 6  # torchvision: 3 pyramid levels x (box, mask) pools
    assert count(fast_onnx, "ScatterElements") == 2  # one 1-D index scatter per pool
    patched = fast_onnx
    fast_onnx = plain
    sessions = [
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (fast_onnx, patched)
    ]
    for name, image in fast_cell_images.items():
        plain, gathered = (s.run(None, {"image": image}) for s in sessions)
        assert len(plain[0]) > 0, name
        for a, b in zip(plain, gathered, strict=True):
            np.testing.assert_array_equal(a, b, err_msg=name)
