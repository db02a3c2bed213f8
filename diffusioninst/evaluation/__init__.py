"""COCO / LVIS box and mask AP (pycocotools, lvis-api, faster-coco-eval) and AP tables.

* :class:`Evaluator` / :func:`build_evaluator`: collect predictions per image, compute an :class:`EvalResult`.
* :func:`instances_to_coco_results`, :func:`encode_masks`: predictions -> COCO result dicts / RLE.
* :func:`write_ap_tables`, :func:`format_ap_table`, :func:`flat_metrics`: tables and MLflow metric names.
"""

from diffusioninst.evaluation.eval_result import (
    COCO_AP_COLUMNS,
    LVIS_AP_COLUMNS,
    EvalResult,
    ap_columns,
    ar_columns,
)
from diffusioninst.evaluation.evaluator import Evaluator, build_evaluator, resolve_max_dets
from diffusioninst.evaluation.ground_truth import detect_kind, load_ground_truth, numpy_float_alias
from diffusioninst.evaluation.results import instances_to_coco_results
from diffusioninst.evaluation.rle import encode_masks, encode_masks_cropped, encode_masks_dense
from diffusioninst.evaluation.tables import flat_metrics, format_ap_table, write_ap_tables

__all__ = [
    "COCO_AP_COLUMNS",
    "LVIS_AP_COLUMNS",
    "EvalResult",
    "Evaluator",
    "ap_columns",
    "ar_columns",
    "build_evaluator",
    "detect_kind",
    "encode_masks",
    "encode_masks_cropped",
    "encode_masks_dense",
    "flat_metrics",
    "format_ap_table",
    "instances_to_coco_results",
    "load_ground_truth",
    "numpy_float_alias",
    "resolve_max_dets",
    "write_ap_tables",
]
