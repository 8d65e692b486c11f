"""The ``openvino`` runner on the project's ONNX export: precision honesty, parity with PyTorch, edge cases.

Skipped with the reason when OpenVINO is not installed (``pip install 'cellseg-deploy[openvino]'``); CI
installs the extra, so these run there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fastpath_helpers import grey_image

from cellseg_deploy.backends import create_runner, get_runner_class, list_runners
from cellseg_deploy.errors import ModelFileError, UserError

ov = pytest.importorskip(
    "openvino", reason="OpenVINO is not installed: pip install 'cellseg-deploy[openvino]'"
)


def _raw(det: object) -> list[np.ndarray]:
    return [det.boxes, det.labels, det.scores, det.mask_probs]  # type: ignore[attr-defined]


def _has_bf16() -> bool:
    from cellseg_deploy.backends.openvino.runner import cpu_capabilities

    return "BF16" in cpu_capabilities()["capabilities"]


@pytest.mark.parametrize("size", [(165, 283), (296, 188), (165, 165)])
def test_fp32_matches_pytorch_where_float32_size_arithmetic_is_one_pixel_short(
    fast_checkpoint: Path, fast_onnx: Path, size: tuple[int, int]
) -> None:
    """``side * scale`` is a whole number for these sizes (165 * 256/165 = 256): in float32 it is 255.99998,
    and OpenVINO resized such images to 255 px (every box moved) until the runner fed the size itself."""
    import numpy as np

    from cellseg_deploy.backends.onnxrt.export import compare_raw_outputs
    from cellseg_deploy.data.synth import fluorescence_cell_image

    h, w = size
    scale = np.float32(256) / np.float32(min(h, w))
    assert int(np.floor(np.float32(min(h, w)) * scale)) == 255  # the precondition: float32 is one short
    image = fluorescence_cell_image(h, w, seed=5, n_cells=30)
    with (
        create_runner("torch", fast_checkpoint, threads=1) as ref,
        create_runner("openvino", fast_onnx, precision="fp32", threads=1) as cand,
    ):
        assert cand.info()["resize_size_from_host"] is True
        r, c = ref.infer(image), cand.infer(image)
    assert len(r) > 0
    cmp = compare_raw_outputs(_raw(r), _raw(c))
    assert cmp["ok"], cmp["reason"]
    assert cmp["max_box_diff"] < 0.05 and cmp["max_score_diff"] < 1e-3, cmp


def test_eager_resized_size_is_torchvisions() -> None:
    """The size the runner feeds is the size eager torchvision resizes to, for many shapes and both limits."""
    import torch
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    from cellseg_deploy.backends.openvino.ir import eager_resized_size

    rng = np.random.default_rng(0)
    shapes = [
        (165, 283),
        (296, 188),
        (2500, 1900),
        *(tuple(s) for s in rng.integers(8, 1500, (60, 2))),
    ]
    for min_size, max_size in [(256, 512), (800, 1333)]:
        transform = GeneralizedRCNNTransform(min_size, max_size, [0.0] * 3, [1.0] * 3).eval()
        for h, w in shapes:
            resized, _ = transform.resize(torch.zeros(3, int(h), int(w)), None)
            assert eager_resized_size(int(h), int(w), min_size, max_size) == tuple(resized.shape[-2:]), (h, w)


def test_registered_and_lazy() -> None:
    assert "openvino" in list_runners()
    cls = get_runner_class("openvino")
    assert cls.precisions == ("fp32", "bf16", "int8")
    assert cls.unavailable_reason() is None


def test_fp32_matches_pytorch_and_reports_f32(
    fast_checkpoint: Path, fast_onnx: Path, fast_cell_images: dict[str, np.ndarray]
) -> None:
    from cellseg_deploy.backends.onnxrt.export import compare_raw_outputs

    with (
        create_runner("torch", fast_checkpoint, threads=1) as ref,
        create_runner("openvino", fast_onnx, precision="fp32", threads=1) as cand,
    ):
        info = cand.info()
        assert info["execution_precision"] == "f32"
        assert info["inference_num_threads"] == 1
        assert info["arch"] == "tiny"  # provenance read from the ONNX metadata
        for name, image in fast_cell_images.items():
            r, c = ref.infer(image), cand.infer(image)
            assert len(r) > 0, name
            cmp = compare_raw_outputs(_raw(r), _raw(c))
            assert cmp["ok"], f"{name}: {cmp['reason']}"
            assert cmp["max_box_diff"] < 0.05 and cmp["max_score_diff"] < 1e-3, (name, cmp)
            assert set(c.timings) >= {"preprocess", "network"}


def test_bf16_runs_bf16_and_gives_well_formed_detections(
    fast_onnx: Path, fast_cell_images: dict[str, np.ndarray]
) -> None:
    if not _has_bf16():
        with pytest.raises(UserError, match="bf16"), create_runner("openvino", fast_onnx, precision="bf16"):
            pass
        return
    with (
        create_runner("openvino", fast_onnx, precision="fp32", threads=1) as f32,
        create_runner("openvino", fast_onnx, precision="bf16", threads=1) as b16,
    ):
        assert b16.info()["execution_precision"] == "bf16"
        for name, image in fast_cell_images.items():
            a, b = f32.infer(image), b16.infer(image)
            h, w = image.shape[:2]
            # scores of a random model sit near its threshold: counts move a little under bf16
            assert len(b) > 0 and abs(len(a) - len(b)) <= max(8, len(a) // 4), (name, len(a), len(b))
            assert (
                b.boxes.dtype == np.float32
                and b.labels.dtype == np.int64
                and b.mask_probs.shape[1:] == (28, 28)
            )
            assert (
                (b.boxes >= 0).all() and (b.boxes[:, [0, 2]] <= w).all() and (b.boxes[:, [1, 3]] <= h).all()
            )
            assert (b.mask_probs >= 0).all() and (b.mask_probs <= 1).all()
            assert set(np.unique(b.labels)) <= {1, 2, 3, 4}
            # bf16 really ran: the numbers differ from fp32, but not wildly (same top detection box)
            assert not np.array_equal(a.mask_probs[: len(b)], b.mask_probs[: len(a)])
            best = np.abs(b.boxes[:, None, :] - a.boxes[0][None, None, :]).max(axis=2).min()
            assert best < 4.0, (name, best)


def test_bf16_keeps_the_roialign_coordinates_fp32(fast_onnx: Path) -> None:
    """Without the repair OpenVINO rounds the RoI boxes to bf16 before RoIAlign (4 px steps beyond 512 px)."""
    if not _has_bf16():
        pytest.skip("this CPU has no bf16: OpenVINO runs fp32 throughout")
    from cellseg_deploy.backends.openvino.runner import OUTPUT_NAMES

    def precision(node: object) -> str:
        return node.get_rt_info()["runtimePrecision"].astype(str)  # type: ignore[attr-defined]

    with create_runner("openvino", fast_onnx, precision="bf16", threads=1) as runner:
        runtime = runner.compiled.get_runtime_model()  # type: ignore[attr-defined]
        roi_aligns = [
            op for op in runtime.get_ordered_ops() if op.get_rt_info()["layerType"].astype(str) == "ROIAlign"
        ]
        assert len(roi_aligns) == runner.info()["fp32_roi_inputs"] > 0
        assert precision(roi_aligns[0]) == "bf16", "the features are still sampled in bf16"
        for op in roi_aligns:
            source = op.input_value(1).get_node()
            while source.get_rt_info()["layerType"].astype(str) == "Reorder":
                source = source.input_value(0).get_node()
            assert precision(source) == "f32", (op.get_friendly_name(), source.get_friendly_name())
        assert sorted(runner.outputs) == sorted(OUTPUT_NAMES)  # type: ignore[attr-defined]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_grey_image_gives_no_detections(fast_onnx: Path, precision: str) -> None:
    """No detection means N = 0 (OpenVINO alone returns one garbage row here: see repair_empty_branches)."""
    import onnxruntime as ort

    if precision == "bf16" and not _has_bf16():
        pytest.skip("this CPU has no bf16 support")
    session = ort.InferenceSession(str(fast_onnx), providers=["CPUExecutionProvider"])
    for size in ((96, 120), (300, 200)):
        assert len(session.run(None, {"image": grey_image(*size)})[0]) == 0  # the reference: nothing
    with create_runner("openvino", fast_onnx, precision=precision, threads=1) as runner:
        assert runner.info()["repaired_empty_branches"] == 2  # RPN and box NMS
        for size in ((96, 120), (300, 200)):
            det = runner.infer(grey_image(*size))
            assert len(det) == 0 and det.mask_probs.shape == (0, 28, 28) and det.image_size == size
            assert len(runner.predict(grey_image(*size))) == 0


def test_predict_goes_through_the_shared_postprocess(
    fast_onnx: Path, fast_cell_images: dict[str, np.ndarray]
) -> None:
    from cellseg_deploy.postprocess import postprocess

    image = fast_cell_images["cells 200x264"]
    with create_runner("openvino", fast_onnx, precision="fp32", threads=1) as runner:
        det = runner.infer(image)
        inst = runner.predict(image)
    assert inst.rles == postprocess(det).rles and len(inst) == len(det)


def test_saved_ir_and_model_cache(
    fast_onnx: Path, tmp_path: Path, fast_cell_images: dict[str, np.ndarray]
) -> None:
    """An IR saved from the ONNX model runs the same, and the model cache fills on the first load."""
    xml = tmp_path / "model.xml"
    ov.save_model(ov.Core().read_model(str(fast_onnx)), str(xml), compress_to_fp16=False)
    cache = tmp_path / "cache"
    image = fast_cell_images["cells 257x190"]
    with create_runner("openvino", fast_onnx, threads=1, options={"cache_dir": str(cache)}) as a:
        det_a = a.infer(image)
        assert a.info()["cache_dir"] == str(cache)
    assert any(cache.iterdir())
    with create_runner("openvino", xml, threads=1) as b:
        det_b = b.infer(image)
        assert b.info()["arch"] == "tiny"
    np.testing.assert_array_equal(det_a.boxes, det_b.boxes)
    np.testing.assert_array_equal(det_a.mask_probs, det_b.mask_probs)


def test_bad_inputs_are_one_line_errors(fast_checkpoint: Path, fast_onnx: Path, tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    with pytest.raises(ModelFileError, match="checkpoint"):
        create_runner("openvino", fast_checkpoint)
    with pytest.raises(UserError, match="precision"):
        create_runner("openvino", fast_onnx, precision="fp16")
    with pytest.raises(UserError, match="CPU only"), create_runner("openvino", fast_onnx, device="cuda"):
        pass
    xml = tmp_path / "lonely.xml"
    xml.write_text("<net/>")
    with pytest.raises(ModelFileError, match=r"\.bin"):
        create_runner("openvino", xml)
    other = tmp_path / "other.onnx"
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(other))
    with pytest.raises(ModelFileError, match="single-graph export"), create_runner("openvino", other):
        pass
    with create_runner("openvino", fast_onnx, threads=1) as runner, pytest.raises(UserError, match="uint8"):
        runner.infer(np.zeros((8, 8, 3), np.float32))
