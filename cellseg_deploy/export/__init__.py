"""Export: one ONNX graph (:mod:`~cellseg_deploy.export.onnx_export`), stage graphs
(:mod:`~cellseg_deploy.export.staged`), TensorRT engines (:mod:`~cellseg_deploy.export.tensorrt`), an int8
OpenVINO IR for the CPU (:mod:`~cellseg_deploy.export.openvino_int8`), and the
provenance every exported file carries (:mod:`~cellseg_deploy.export.metadata`).

Nothing heavy is imported here: ``from cellseg_deploy.export.onnx_export import export_onnx``.
"""

EXPORT_FORMATS: tuple[str, ...] = ("onnx", "staged", "trt", "openvino-int8")
"""Formats of ``cellseg-deploy export --format``."""
