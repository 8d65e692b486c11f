"""cellseg-deploy: Mask R-CNN for cell instance segmentation, from training to verified, fast deployment.

The library is split by pipeline stage; the CLI (:mod:`cellseg_deploy.cli`) is a thin layer over it.

- :mod:`cellseg_deploy.data`: the real dataset layout, validation, synthetic data, COCO conversion, RLE.
- :mod:`cellseg_deploy.modeling`: the architecture registry, the model builder, checkpoints.
- :mod:`cellseg_deploy.training`: the training loop (AMP, schedules, augmentation, DDP).
- :mod:`cellseg_deploy.export`: ONNX (one graph), staged graphs, TensorRT engines.
- :mod:`cellseg_deploy.runners`: one runner interface per backend, and their registry.
- :mod:`cellseg_deploy.postprocess`: the one post-processing path (thresholds, mask pasting, RLE).
- :mod:`cellseg_deploy.evaluation`: COCO evaluation, instance parity, submissions.
- :mod:`cellseg_deploy.bench`: latency and throughput measurement, environment capture, reports.
"""

__version__ = "0.1.0"

CLASS_NAMES: tuple[str, ...] = ("class1", "class2", "class3", "class4")
"""Names of the four cell classes; label ``k`` (1-based) is ``CLASS_NAMES[k - 1]``, file ``class{k}.tif``."""
