"""Export: one ONNX graph (:mod:`~cellseg_deploy.export.onnx_export`), stage graphs
(:mod:`~cellseg_deploy.export.staged`), TensorRT engines (:mod:`~cellseg_deploy.export.tensorrt`), and the
provenance every exported file carries (:mod:`~cellseg_deploy.export.metadata`).

Nothing heavy is imported here: ``from cellseg_deploy.export.onnx_export import export_onnx``.
"""

EXPORT_FORMATS: tuple[str, ...] = ("onnx", "staged", "trt")
"""Formats of ``cellseg-deploy export --format``."""
