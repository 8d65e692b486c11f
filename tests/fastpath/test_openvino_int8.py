"""int8 for the CPU: ``cellseg-deploy export --format openvino-int8`` and the ``openvino`` runner at ``int8``.

A trained tiny model is quantised with calibration on its dataset's training split and must pass parity with
the ``int8`` profile against PyTorch (segm AP50 against the ground truth included); precision and model file
must match (an int8 IR runs only at ``int8``, and ``int8`` runs only an int8 IR); the benchmark makes the
int8 IR itself for ``openvino:int8``. Skipped with the reason when OpenVINO is not installed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from cellseg_deploy.cli.main import main
from cellseg_deploy.errors import ModelFileError, UserError
from cellseg_deploy.evaluation.parity import PROFILES, min_gt_for_ap_gate

ov = pytest.importorskip(
    "openvino", reason="OpenVINO is not installed: pip install 'cellseg-deploy[openvino]'"
)


def _int8_capable() -> bool:
    from cellseg_deploy.backends.openvino.runner import cpu_capabilities

    return "INT8" in cpu_capabilities()["capabilities"]


@pytest.fixture(scope="module")
def trained_int8(trained_tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:  # type: ignore[no-untyped-def]
    checkpoint, data = trained_tiny
    out = tmp_path_factory.mktemp("int8") / "tiny.int8.xml"
    code = main(
        ["export", str(checkpoint), "--format", "openvino-int8", "--calib-data", str(data), "--out", str(out)]
    )
    assert code == 0
    return out


def test_export_writes_a_quantised_ir_atomically(trained_int8: Path) -> None:
    from cellseg_deploy.backends.openvino.ir import read_quantisation

    assert trained_int8.is_file() and trained_int8.with_suffix(".bin").is_file()
    leftovers = [p.name for p in trained_int8.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers  # no temporary folder or file left behind
    model = ov.Core().read_model(str(trained_int8))
    record = read_quantisation(model)
    assert record is not None
    n_fq = sum(op.get_type_name() == "FakeQuantize" for op in model.get_ordered_ops())
    # one FakeQuantize per layer's weights, one per quantised activation tensor (shared by its consumers)
    assert record["layers"] >= 10 and n_fq == record["layers"] + record["activations"], (record, n_fq)
    assert record["activations"] < 2 * record["layers"]  # shared: fewer tensors than consumers
    assert record["calibration"]["images"] >= 1
    assert "training split" in record["calibration"]["source"]
    assert len(record["onnx_sha256"]) == 64


@pytest.mark.skipif("not _int8_capable()", reason="OpenVINO reports no int8 support on this CPU")
def test_int8_passes_parity_and_the_ap50_gate(trained_tiny, trained_int8: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    checkpoint, data = trained_tiny
    report_path = tmp_path / "parity.json"
    code = main(
        [
            "parity",
            str(checkpoint),
            "--candidate",
            str(trained_int8),
            "--engine",
            "openvino",
            "--precision",
            "int8",
            "--data",
            str(data),
            # every image of the set: the 2 validation images hold ~40 cells, where one flipped instance
            # moves AP50 by ~0.025 and the gate would measure noise (it differed by CPU kind)
            "--split",
            "all",
            "--no-progress",
            "--json",
            str(report_path),
        ]
    )
    report = json.loads(report_path.read_text())
    assert code == 0, report["failures"]
    assert report["candidate"]["execution_precision"].startswith("int8+")
    # which int8 instructions this CPU gave the kernels (AVX2-only and AVX-512-without-VNNI CPUs: "none")
    from cellseg_deploy.cpu import cpu_flags, int8_instructions

    assert report["candidate"]["int8_instructions"] == (int8_instructions(cpu_flags()) or "none")
    assert report["ap50_gt"]["reference"] > 0.2
    gate = next(c for c in report["checks"] if c["key"] == "ap50_gt_diff")
    assert gate["judged"], gate  # enough ground truth behind it for the int8 tolerance
    assert gate["n"] >= min_gt_for_ap_gate(PROFILES["int8"].max_ap50_gt_diff)
    assert abs(report["ap50_gt"]["diff"]) <= PROFILES["int8"].max_ap50_gt_diff


@pytest.mark.skipif("not _int8_capable()", reason="OpenVINO reports no int8 support on this CPU")
def test_precision_and_model_must_match(trained_tiny, trained_int8: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from cellseg_deploy.backends import create_runner

    checkpoint, _ = trained_tiny
    onnx_path = tmp_path / "model.onnx"
    assert main(["export", str(checkpoint), "--format", "onnx", "--out", str(onnx_path)]) == 0
    with pytest.raises(ModelFileError, match=r"needs an int8 OpenVINO IR.*--format openvino-int8"):
        create_runner("openvino", onnx_path, precision="int8").load()
    with pytest.raises(ModelFileError, match=r"is an int8 model.*--precision int8"):
        create_runner("openvino", trained_int8, precision="bf16").load()


def test_calibration_images_come_from_the_training_split(trained_tiny) -> None:  # type: ignore[no-untyped-def]
    from cellseg_deploy.backends.openvino.int8 import calibration_images
    from cellseg_deploy.data.layout import list_train_ids, split_train_val

    _, data = trained_tiny
    train_ids, val_ids = split_train_val(list_train_ids(data))
    images, source = calibration_images(data, count=100)
    assert val_ids and len(images) == len(train_ids) and "training split" in source  # never the val images
    assert all(im.dtype == np.uint8 and im.ndim == 3 and im.shape[2] == 3 for im in images)
    synthetic, what = calibration_images(None, count=3)
    assert len(synthetic) == 3 and "synthetic" in what and synthetic[0].shape == (512, 512, 3)
    with pytest.raises(UserError, match="at least 1"):
        calibration_images(None, count=0)


def test_export_rejects_bad_options(random_tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    ckpt = str(random_tiny_checkpoint)
    assert main(["export", ckpt, "--format", "openvino-int8", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "must end in .xml" in capsys.readouterr().err
    assert (
        main(["export", ckpt, "--format", "onnx", "--calib-images", "4", "--out", str(tmp_path / "m.onnx")])
        == 2
    )
    assert "--calib-images applies to --format openvino-int8, not onnx" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_bench_exports_an_int8_ir_for_openvino_int8(random_tiny_checkpoint: Path, tmp_path: Path) -> None:
    from cellseg_deploy.bench.models import resolve_engine_models

    models = resolve_engine_models(
        ["openvino:int8", "openvino:bf16"], checkpoint=random_tiny_checkpoint, cache_dir=tmp_path
    )
    assert models["openvino:int8"].path.name == "model.int8.xml"
    assert models["openvino:bf16"].path.suffix == ".onnx"
    again = resolve_engine_models(["openvino:int8"], checkpoint=random_tiny_checkpoint, cache_dir=tmp_path)
    assert "reused" in again["openvino:int8"].note


def test_the_same_inputs_give_the_same_ir_bytes(fast_onnx: Path, tmp_path: Path) -> None:
    """An IR is reproducible: nothing of the run (such as how long calibration took) is written into it.

    Each export runs in its own process, as the CLI does: OpenVINO numbers the constants it creates with a
    counter global to the process, so a second export in the same process names them differently."""
    import subprocess
    import sys

    from cellseg_deploy.io_utils import sha256_file

    code = (
        "import sys; from pathlib import Path; "
        "from cellseg_deploy.backends.openvino.int8 import quantize_onnx; "
        "from cellseg_deploy.data.synth import fluorescence_cell_image; "
        "images = [fluorescence_cell_image(160, 160, seed=s) for s in range(2)]; "
        "r = quantize_onnx(Path(sys.argv[1]), Path(sys.argv[2]), images, source='test images'); "
        "assert 'seconds' in r.calibration"
    )
    outs = [tmp_path / "a.xml", tmp_path / "b.xml"]
    for out in outs:
        subprocess.run([sys.executable, "-c", code, str(fast_onnx), str(out)], check=True, timeout=300)
    assert sha256_file(outs[0]) == sha256_file(outs[1])
    assert sha256_file(outs[0].with_suffix(".bin")) == sha256_file(outs[1].with_suffix(".bin"))


def test_the_transposed_convolution_is_quantised_per_output_channel(trained_int8: Path) -> None:
    """The mask head's upsampling (ConvTranspose in ONNX, ConvolutionBackpropData in OpenVINO) gets int8
    inputs like the convolutions: its weights ``[C_in, C_out, kH, kW]`` are quantised per *output* channel
    (axis 1), so the range of one output channel never sets another's."""
    model = ov.Core().read_model(str(trained_int8))
    deconvs = [op for op in model.get_ordered_ops() if op.get_type_name() == "ConvolutionBackpropData"]
    assert len(deconvs) == 1
    data_fq, weight_fq = (deconvs[0].input_value(i).get_node() for i in (0, 1))
    assert data_fq.get_type_name() == weight_fq.get_type_name() == "FakeQuantize"
    c_out = int(deconvs[0].get_input_partial_shape(1).to_shape()[1])
    low = weight_fq.input_value(1).get_node().get_data()
    assert low.shape == (1, c_out, 1, 1), (low.shape, c_out)
    assert np.all(low < 0)  # symmetric: [-max|w|, max|w|] of each channel


@pytest.mark.skipif("not _int8_capable()", reason="OpenVINO reports no int8 support on this CPU")
def test_the_transposed_convolution_runs_in_int8_on_avx512(trained_int8: Path) -> None:
    """OpenVINO's CPU plugin runs a quantised ConvolutionBackpropData with int8 inputs when the CPU has AVX-512
    (``avx512_core``: F, BW, VL, DQ); without it, only for static shapes, and the mask head's RoI count is
    dynamic (``Deconvolution::canBeExecutedInInt8`` in ``src/plugins/intel_cpu/src/nodes/deconv.cpp``)."""
    from cellseg_deploy.cpu import cpu_flags

    if not {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= cpu_flags():
        pytest.skip(
            "no AVX-512 on this CPU: OpenVINO keeps a dynamic-shape transposed convolution in bf16/fp32"
        )
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()  # oneDNN's limit, which OpenVINO honours
    if limit not in ("ALL", "DEFAULT") and not limit.startswith(("AVX512", "AVX10", "AMX")):
        pytest.skip(f"ONEDNN_MAX_CPU_ISA={limit} keeps OpenVINO below AVX-512")
    compiled = ov.Core().compile_model(str(trained_int8), "CPU", {"INFERENCE_NUM_THREADS": 1})
    kinds = {
        op.get_rt_info()["runtimePrecision"].astype(str).lower()
        for op in compiled.get_runtime_model().get_ordered_ops()
        if op.get_rt_info()["layerType"].astype(str) == "Deconvolution"
    }
    assert kinds and kinds <= {"u8", "i8"}, kinds  # the precision of the layer's (quantised) input
