"""cellseg-deploy: Mask R-CNN for cell instance segmentation, from training to verified, fast deployment.

The library is layered (each layer imports only those below it; ``lint-imports`` checks it in CI), from the
command line (:mod:`cellseg_deploy.cli`, a thin layer over the rest) down:

- :mod:`cellseg_deploy.demo`: the whole pipeline on synthetic data.
- :mod:`cellseg_deploy.bench`: latency and throughput, environment capture, reports, the scorecard;
  :mod:`cellseg_deploy.training`: the training loop (AMP, schedules, augmentation, DDP).
- :mod:`cellseg_deploy.evaluation`: prediction, COCO evaluation, instance parity, submissions.
- :mod:`cellseg_deploy.backends`: one folder per backend (``pytorch``, ``onnxrt``, ``openvino``, ``staged``,
  ``tensorrt``), each with what it needs to export and to run; the runner interface and the registry.
- :mod:`cellseg_deploy.modeling`: architectures, the model builder, checkpoints;
  :mod:`cellseg_deploy.postprocess`: the one post-processing path (thresholds, mask pasting, RLE).
- :mod:`cellseg_deploy.structures` (detections, instances), :mod:`cellseg_deploy.data` (the real dataset
  layout, validation, synthetic data, COCO conversion, RLE).
- :mod:`cellseg_deploy.distributed`, :mod:`cellseg_deploy.plots`, :mod:`cellseg_deploy.tables`,
  :mod:`cellseg_deploy.io_utils` (atomic writes), :mod:`cellseg_deploy.errors` (typed errors, exit codes).
"""

__version__ = "0.1.0"

CLASS_NAMES: tuple[str, ...] = ("class1", "class2", "class3", "class4")
"""Names of the four cell classes; label ``k`` (1-based) is ``CLASS_NAMES[k - 1]``, file ``class{k}.tif``."""
