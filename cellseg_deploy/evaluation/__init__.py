"""Evaluation: COCO metrics (pycocotools' COCOeval with a configurable detection cap), dataset and folder
prediction with any runner, competition submissions and overlays.

- :mod:`~cellseg_deploy.evaluation.coco_eval`: :func:`instances_to_results`, :func:`gt_from_instances`,
  :func:`evaluate` -> :class:`EvalResult`.
- :mod:`~cellseg_deploy.evaluation.predict`: :func:`run_dataset`, :func:`evaluate_model`,
  :func:`predict_folder` -> :class:`PredictSummary`.
- :mod:`~cellseg_deploy.evaluation.submission`: :func:`write_submission`, :func:`read_submission`.
- :mod:`~cellseg_deploy.evaluation.overlays`: :func:`draw_overlay`, :func:`write_overlay`.
"""

from cellseg_deploy.evaluation.coco_eval import (
    DEFAULT_MAX_DETS,
    IOU_TYPES,
    EvalResult,
    evaluate,
    gt_from_instances,
    instances_to_results,
    predictions_to_results,
)
from cellseg_deploy.evaluation.predict import (
    PredictSummary,
    evaluate_model,
    infer_engine,
    predict_folder,
    resolve_images,
    run_dataset,
)
from cellseg_deploy.evaluation.submission import RESULTS_MEMBER, read_submission, write_submission

__all__ = [
    "DEFAULT_MAX_DETS",
    "IOU_TYPES",
    "RESULTS_MEMBER",
    "EvalResult",
    "PredictSummary",
    "evaluate",
    "evaluate_model",
    "gt_from_instances",
    "infer_engine",
    "instances_to_results",
    "predict_folder",
    "predictions_to_results",
    "read_submission",
    "resolve_images",
    "run_dataset",
    "write_submission",
]
