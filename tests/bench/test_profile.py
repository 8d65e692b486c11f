"""The per-layer profile's plain parts: model parts from node names, the summary, the runtimes' records."""

from __future__ import annotations

import datetime as dt
from types import SimpleNamespace

import pytest

from cellseg_deploy.backends.onnxrt.profiling import calls_from_trace, graph_origins
from cellseg_deploy.backends.openvino.profiling import kernel_precision, layer_times
from cellseg_deploy.bench.profile import UNATTRIBUTED, model_part, part_of_name, precision_shares, summarise
from cellseg_deploy.structures import LayerTime


@pytest.mark.parametrize(
    ("name", "part"),
    [
        ("/transform/Resize", "preprocess"),
        ("/Cast", "preprocess"),
        ("/backbone/body/layer1/layer1.0/conv1/Conv", "backbone"),
        ("/backbone/fpn/layer_blocks.0/layer_blocks.0.0/Conv", "fpn"),
        ("/rpn/head/conv/conv.0/conv.0.0/Conv", "rpn_head"),
        ("/rpn/anchor_generator/Concat", "rpn_head"),
        ("/rpn/TopK_1", "proposals_nms"),
        ("/roi_heads/box_roi_pool/RoiAlign", "roi_align"),
        ("/roi_heads/mask_roi_pool/Gather_14", "roi_align"),
        ("/roi_heads/box_head/fc6/Gemm", "box_head"),
        ("/roi_heads/box_predictor/cls_score/Gemm", "box_head"),
        ("/roi_heads/mask_head/mask_head.0/mask_head.0.0/Conv", "mask_head"),
        ("/roi_heads/mask_predictor/conv5_mask/ConvTranspose", "mask_head"),
        ("/roi_heads/Softmax", "detections_nms"),
        ("FakeQuantize_91523", None),
        ("NonMaxSuppression_2141", None),
    ],
)
def test_part_of_name(name: str, part: str | None) -> None:
    assert part_of_name(name) == part


def _layer(name: str, ms: float, precision: str = "fp32", origin: tuple[str, ...] = ()) -> LayerTime:
    return LayerTime(name=name, op="Op", kernel="k", precision=precision, ms=ms, origin=origin or (name,))


def test_a_runtime_made_layer_takes_the_part_of_the_first_name_that_places_it() -> None:
    fq = _layer(
        "FakeQuantize_1", 1.0, origin=("FakeQuantize_1", "Multiply_7", "/roi_heads/box_head/fc6/Gemm")
    )
    assert model_part(fq) == "box_head"
    assert model_part(_layer("Reorder_3", 1.0)) == UNATTRIBUTED


def test_summary_is_the_mean_per_call_by_part_and_precision() -> None:
    call = [
        _layer("/backbone/body/conv1/Conv", 6.0, "int8"),
        _layer("/backbone/body/layer1/Add", 2.0, "fp32"),
        _layer("/roi_heads/mask_predictor/conv5_mask/ConvTranspose", 10.0, "fp32"),
        _layer("Reorder_3", 2.0, "fp32"),
    ]
    slower = [LayerTime(**{**vars(layer), "ms": layer.ms * 3}) for layer in call]
    summary = summarise([call, slower])
    assert summary["calls"] == 2
    assert summary["layer_ms_per_call"] == pytest.approx(40.0)  # (20 + 60) / 2
    parts = summary["parts"]
    assert list(parts) == ["backbone", "mask_head", UNATTRIBUTED]  # pipeline order
    assert parts["backbone"]["ms"] == pytest.approx(16.0) and parts["backbone"]["layers"] == 2
    assert parts["backbone"]["precision_ms"] == {"int8": pytest.approx(12.0), "fp32": pytest.approx(4.0)}
    assert sum(p["share"] for p in parts.values()) == pytest.approx(1.0, abs=1e-3)
    assert summary["layers"][0]["name"].endswith("ConvTranspose") and summary["layers"][0]["ms"] == 20.0
    assert precision_shares(summary) == {"fp32": pytest.approx(0.7), "int8": pytest.approx(0.3)}
    # identical calls give the one call's figures exactly
    assert summarise([call, call])["parts"] == summarise([call])["parts"]


def test_an_empty_profile_is_no_result() -> None:
    with pytest.raises(ValueError, match="no profiled layer"):
        summarise([])
    with pytest.raises(ValueError, match="no profiled layer"):
        summarise([[], []])


@pytest.mark.parametrize(
    ("exec_type", "precision"),
    [
        ("jit_avx2_I8", "int8"),
        ("brgconv_avx512_amx_I8", "int8"),
        ("jit_avx512_amx_bf16", "bf16"),
        ("brgconv_avx2_1x1_f32", "fp32"),
        ("ref_any_i32", "int32"),
        ("jit_uni_u8", "int8"),
        ("undef", "unknown"),
    ],
)
def test_openvino_kernel_precision(exec_type: str, precision: str) -> None:
    assert kernel_precision(exec_type) == precision


def test_openvino_records_keep_only_executed_layers() -> None:
    def record(name: str, status: str, us: int) -> SimpleNamespace:
        return SimpleNamespace(
            node_name=name,
            node_type="Convolution",
            exec_type="jit_avx2_I8",
            real_time=dt.timedelta(microseconds=us),
            status=f"Status.{status}",
        )

    records = [record("a", "EXECUTED", 1500), record("b", "NOT_RUN", 0), record("c", "OPTIMIZED_OUT", 0)]
    layers = layer_times(records, {"a": ("a", "/backbone/body/conv1/Conv")})
    assert [(x.name, x.ms, x.precision, x.origin[-1]) for x in layers] == [
        ("a", 1.5, "int8", "/backbone/body/conv1/Conv")
    ]


def _node(name: str, ts: int, dur: int, op: str = "Conv", element: str = "float") -> dict[str, object]:
    return {
        "cat": "Node",
        "name": f"{name}_kernel_time",
        "ts": ts,
        "dur": dur,
        "args": {"op_name": op, "provider": "CPUExecutionProvider", "output_type_shape": [{element: [1]}]},
    }


def test_onnxruntime_trace_is_split_into_runs_and_reorders_join_their_neighbours() -> None:
    events = [
        {"cat": "Session", "name": "session_initialization", "ts": 0, "dur": 90},
        _node("/Constant", 10, 5),  # during initialisation: in no run
        {"cat": "Session", "name": "model_run", "ts": 100, "dur": 100},
        _node("ReorderInput_token_1", 101, 2, "ReorderInput"),
        _node("fused /backbone/body/conv1/Conv", 104, 50, "FusedConv"),
        _node("NonMaxSuppression_9", 160, 30, "NonMaxSuppression", "int64"),
        {"cat": "Session", "name": "model_run", "ts": 300, "dur": 100},
        _node("fused /backbone/body/conv1/Conv", 304, 40, "FusedConv"),
    ]
    calls = calls_from_trace(events, {"NonMaxSuppression_9": ("/rpn/Gather_3",)})
    assert [[x.name for x in call] for call in calls] == [
        ["ReorderInput_token_1", "fused /backbone/body/conv1/Conv", "NonMaxSuppression_9"],
        ["fused /backbone/body/conv1/Conv"],
    ]
    first = calls[0]
    assert [model_part(x) for x in first] == ["backbone", "backbone", "proposals_nms"]
    assert first[1].ms == pytest.approx(0.05) and first[2].precision == "int64"


def test_onnx_graph_origins_reach_into_if_branches() -> None:
    from onnx import TensorProto, helper

    then_graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"], name="Identity_5")],
        "then",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    nodes = [
        helper.make_node("Relu", ["in"], ["x"], name="/rpn/Relu"),
        helper.make_node("NonMaxSuppression", ["x"], ["n"], name="NonMaxSuppression_2"),
        helper.make_node("If", ["c"], ["z"], name="If_3", then_branch=then_graph, else_branch=then_graph),
        helper.make_node("Add", ["n", "z"], ["out"], name="/rpn/Add"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("in", TensorProto.FLOAT, [1]),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1])],
    )
    origins = graph_origins(helper.make_model(graph))
    assert origins["NonMaxSuppression_2"][:2] == ("/rpn/Add", "/rpn/Relu")  # consumers first, then producers
    assert origins["Identity_5"][0] == "If_3" and "/rpn/Add" in origins["Identity_5"]
