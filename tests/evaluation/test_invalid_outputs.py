"""Every runner's raw output is validated once, in the shared post-processing, before anything uses it.

Unit tests of :func:`cellseg_deploy.postprocess.validate_detections` on hand-made detections, then graphs
with the right signature (a real ONNX file run by ONNX Runtime, constant outputs) whose boxes are NaN, huge or
inverted, or whose scores are NaN: ``predict``, ``eval``, ``parity`` and ``bench`` each end with exit 1 and
one line naming the model, the image and what was wrong, and write no file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cellseg_deploy.cli.main import main
from cellseg_deploy.errors import InvalidModelOutput
from cellseg_deploy.postprocess import BOX_MARGIN_PX, PostprocessConfig, postprocess, validate_detections
from cellseg_deploy.structures import Detections

H, W = 64, 80


def det(
    boxes: list[list[float]], scores: list[float] | None = None, labels: list[int] | None = None
) -> Detections:
    n = len(boxes)
    return Detections(
        boxes=np.array(boxes, np.float32).reshape(n, 4),
        labels=np.array(labels or [1] * n, np.int64),
        scores=np.array(scores or [0.9] * n, np.float32),
        mask_probs=np.full((n, 28, 28), 0.9, np.float32),
        image_size=(H, W),
    )


GOOD = [[2.0, 3.0, 20.0, 30.0], [40.0, 10.0, 80.0, 64.0]]


def test_valid_output_passes_unchanged() -> None:
    d = det(GOOD, [0.9, 0.4], [1, 4])
    assert validate_detections(d) is d
    assert validate_detections(Detections.empty((H, W))) is not None


@pytest.mark.parametrize(
    ("boxes", "scores", "labels", "message"),
    [
        ([[np.nan, 3, 20, 30], GOOD[1]], None, None, "1 of 2 detections have non-finite boxes"),
        ([[2, 3, np.inf, 30]], None, None, "non-finite boxes"),
        ([[50, 50, 10, 10], GOOD[0]], None, None, "inverted boxes"),
        ([[2, 3, 20, 1e30]], None, None, f"outside the {W}x{H} image"),
        ([[-100, 3, 20, 30]], None, None, "outside"),
        ([GOOD[0]], [np.nan], None, "non-finite scores"),
        ([GOOD[0]], [1.5], None, "scores outside [0, 1]"),
        ([GOOD[0]], None, [0], "labels outside 1..4"),
        ([GOOD[0]], None, [5], "labels outside 1..4"),
    ],
)
def test_broken_outputs_are_refused_with_what_was_wrong(
    boxes: list[list[float]], scores: list[float] | None, labels: list[int] | None, message: str
) -> None:
    with pytest.raises(InvalidModelOutput, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
        postprocess(det(boxes, scores, labels))
    assert "\n" not in str(info.value)


def test_non_finite_mask_probabilities_are_refused() -> None:
    d = det(GOOD)
    d.mask_probs[1, 3, 4] = np.nan
    with pytest.raises(InvalidModelOutput, match="1 of 2 detections have non-finite mask probabilities"):
        validate_detections(d)


def test_rounding_at_the_border_is_clipped_not_refused() -> None:
    m = BOX_MARGIN_PX / 2
    d = det([[-m, -m, W + m, H + m]], [1.0 + 5e-4])
    raw_boxes = d.boxes.copy()
    v = validate_detections(d)
    assert v.boxes.tolist() == [[0.0, 0.0, float(W), float(H)]] and v.scores.tolist() == [1.0]
    np.testing.assert_array_equal(d.boxes, raw_boxes)  # the runner's own arrays are not modified
    inst = postprocess(d, PostprocessConfig())
    assert inst.boxes.tolist() == [[0.0, 0.0, float(W), float(H)]]


def test_the_error_names_model_and_image() -> None:
    from cellseg_deploy.errors import naming_model_output

    with pytest.raises(InvalidModelOutput) as info, naming_model_output(model="m.onnx", image="a.tif"):
        postprocess(det([[50, 50, 10, 10]]))
    assert str(info.value).startswith("invalid model output (model m.onnx, image a.tif): 1 of 1 detections")


def test_inconsistent_lengths_are_an_invalid_output() -> None:
    with pytest.raises(InvalidModelOutput, match="inconsistent detections"):
        Detections(
            boxes=np.zeros((2, 4), np.float32),
            labels=np.ones(3, np.int64),
            scores=np.ones(2, np.float32),
            mask_probs=np.zeros((2, 28, 28), np.float32),
            image_size=(H, W),
        )


# ----------------------------------------------------------------------------------------------------------
# Broken graphs through the commands
# ----------------------------------------------------------------------------------------------------------

BROKEN = {
    "nan-boxes": ([[np.nan, 5, 30, 30], [10, 10, 40, 40]], [0.9, 0.8]),
    "huge-boxes": ([[0, 0, 1e30, 1e30], [10, 10, 40, 40]], [0.9, 0.8]),
    "inverted-boxes": ([[50, 50, 10, 10], [10, 10, 40, 40]], [0.9, 0.8]),
    "nan-scores": ([[5, 5, 30, 30], [10, 10, 40, 40]], [np.nan, 0.8]),
}


def constant_graph(path: Path, boxes: list[list[float]], scores: list[float]) -> Path:
    """A single-graph export's signature (uint8 ``[H, W, 3]`` in; boxes, labels, scores, mask_probs out)
    whose outputs are constants."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n = len(boxes)
    consts = {
        "boxes": np.array(boxes, np.float32),
        "labels": np.ones(n, np.int64),
        "scores": np.array(scores, np.float32),
        "mask_probs": np.full((n, 1, 28, 28), 0.9, np.float32),
    }
    nodes = [
        helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name + "_value"))
        for name, value in consts.items()
    ]
    types = {"boxes": TensorProto.FLOAT, "labels": TensorProto.INT64, "scores": TensorProto.FLOAT}
    outputs = [
        helper.make_tensor_value_info(name, types.get(name, TensorProto.FLOAT), list(value.shape))
        for name, value in consts.items()
    ]
    image = helper.make_tensor_value_info("image", TensorProto.UINT8, ["H", "W", 3])
    graph = helper.make_graph(nodes, "broken", [image], outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cellseg_deploy.data.synth import SynthConfig, make_synthetic_dataset

    root = tmp_path_factory.mktemp("invalid") / "data"
    make_synthetic_dataset(
        root, SynthConfig(n_train=5, n_test=2, min_size=96, max_size=128, seed=3), progress=False
    )
    return root


def _one_line(err: str, kind: str) -> str:
    # progress bars (tqdm, "...%|") are not messages
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]
    assert "Traceback" not in err, err
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: invalid model output") or "invalid model output" in lines[0], lines
    assert kind.split("-")[0] in lines[0] or "non-finite" in lines[0] or "outside" in lines[0], lines
    return lines[0]


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_commands_stop_in_one_line_and_write_nothing(
    kind: str,
    small_data: Path,
    random_tiny_checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model = constant_graph(tmp_path / f"{kind}.onnx", *BROKEN[kind])
    expected = {
        "nan-boxes": "non-finite boxes",
        "huge-boxes": "outside the",
        "inverted-boxes": "inverted boxes",
        "nan-scores": "non-finite scores",
    }[kind]
    out = tmp_path / "out"
    commands = {
        "predict": ["predict", str(model), str(small_data / "test_release"), "--out", str(out / "sub.zip"), "--no-progress"],
        "eval": ["eval", str(model), "--data", str(small_data), "--split", "all", "--no-progress", "--json", str(out / "eval.json")],
        "parity": [
            "parity", str(random_tiny_checkpoint), "--candidate", str(model), "--data", str(small_data),
            "--split", "all", "--no-progress", "--json", str(out / "parity.json"),
        ],
        "bench": [
            "bench", "--engine", "onnx", "--model-for", f"onnx={model}", "--imgsz", "96", "--cells", "5",
            "--iters", "1", "--warmup", "1", "--no-memory", "--out", str(out / "bench"),
            "--cache", str(tmp_path / "cache"),
        ],
    }  # fmt: skip
    for name, argv in commands.items():
        capsys.readouterr()
        code = main(argv)
        line = _one_line(capsys.readouterr().err, kind)
        assert code == 1, (name, line)
        assert expected in line and str(model) in line and "image " in line, (name, line)
        written = sorted(p.name for p in out.rglob("*") if p.is_file()) if out.exists() else []
        assert written == [], (name, written)  # no submission, no COCO file, no bench table
