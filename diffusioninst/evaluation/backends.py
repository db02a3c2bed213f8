"""Run one AP evaluation (one task) with one library, and read out the statistics.

* COCO, ``pycocotools``: ``pycocotools.cocoeval.COCOeval`` (the reference; what detectron2 runs).
* COCO, ``faster_coco_eval``: ``COCOeval_faster`` (C++ evaluate/accumulate, same statistics).
* LVIS, ``pycocotools``: lvis-api ``LVISEval`` (the reference, built on ``pycocotools.mask``), with numpy 2
  handled by :func:`~diffusioninst.evaluation.ground_truth.numpy_float_alias` around ``accumulate`` only.
* LVIS, ``faster_coco_eval``: ``COCOeval_faster(lvis_style=True)`` with ``maxDets = [cap]``; the caller caps
  detections per image beforehand exactly as ``LVISResults`` does, so both LVIS paths see the same input.

Each function returns the statistics already named and on the 0-100 scale (-1 -> NaN), the AP of every GT
category (area "all", largest maxDets) and the evaluator's own printed summary.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from diffusioninst.evaluation.eval_result import COCO_AP_COLUMNS, LVIS_AP_COLUMNS, ar_columns
from diffusioninst.evaluation.ground_truth import numpy_float_alias


@dataclass
class TaskOutput:
    stats: dict[str, float]  # column -> 0-100 value, NaN when undefined
    category_ap: dict[int, float]  # GT category id -> AP 0-100, NaN when the category has no GT
    summary: str


def _scaled(value: float) -> float:
    value = float(value)
    return math.nan if value < 0 else value * 100.0


def _category_ap(precision: np.ndarray, cat_ids: Sequence[int]) -> dict[int, float]:
    """AP per category from ``precision [T, R, K, A(, M)]`` at area "all" (and the largest maxDets)."""
    out: dict[int, float] = {}
    for k, cat_id in enumerate(cat_ids):
        p = precision[:, :, k, 0, -1] if precision.ndim == 5 else precision[:, :, k, 0]
        p = p[p > -1]
        out[int(cat_id)] = float(np.mean(p)) * 100.0 if p.size else math.nan
    return out


def evaluate_coco(
    gt: Any,
    results: list[dict],
    task: str,
    image_ids: list[int],
    max_dets: Sequence[int],
    backend: str,
    use_cats: bool = True,
) -> TaskOutput:
    """COCO AP for ``task`` over ``image_ids`` (``params.imgIds``) with ``params.maxDets = max_dets`` (3 values).

    ``use_cats=False`` sets ``params.useCats = 0`` (a detection may match a GT of any class: class-agnostic AP);
    ``category_ap`` is then empty, since the evaluator pools every class into one.
    """
    names = (*COCO_AP_COLUMNS, *ar_columns("coco", max_dets))
    if backend == "pycocotools":
        from pycocotools.cocoeval import COCOeval

        with contextlib.redirect_stdout(io.StringIO()):
            dt = gt.loadRes(results) if results else _empty_pycocotools_results(gt)
            ev = COCOeval(gt, dt, task)
            ev.params.imgIds = list(image_ids)
            ev.params.maxDets = list(max_dets)
            ev.params.useCats = int(use_cats)
            ev.evaluate()
            ev.accumulate()
        summary = io.StringIO()
        with contextlib.redirect_stdout(summary):
            ev.summarize()
        text = summary.getvalue()
    elif backend == "faster_coco_eval":
        from faster_coco_eval import COCOeval_faster

        lines: list[str] = []
        dt = gt.loadRes(results)  # an empty list gives an empty, evaluable result set
        ev = COCOeval_faster(gt, dt, task, print_function=lines.append)
        ev.params.imgIds = list(image_ids)
        ev.params.maxDets = list(max_dets)
        ev.params.useCats = int(use_cats)
        ev.evaluate()
        ev.accumulate()
        lines.clear()
        ev.summarize()
        text = "\n".join(lines) + "\n"
    else:
        raise ValueError(f"unknown backend {backend!r}")
    stats = {name: _scaled(v) for name, v in zip(names, ev.stats[: len(names)])}
    category_ap = _category_ap(ev.eval["precision"], ev.params.catIds) if use_cats else {}
    return TaskOutput(stats, category_ap, text)


def _empty_pycocotools_results(gt: Any) -> Any:
    """A result set without detections (``COCO.loadRes`` cannot load an empty list)."""
    from pycocotools.coco import COCO

    dt = COCO()
    dt.dataset = {
        "images": list(gt.dataset["images"]),
        "categories": copy.deepcopy(gt.dataset["categories"]),
        "annotations": [],
    }
    dt.createIndex()
    return dt


def evaluate_lvis(
    gt: Any, results: list[dict], task: str, image_ids: list[int], max_dets: int, backend: str
) -> TaskOutput:
    """LVIS AP for ``task`` over ``image_ids``. ``results`` must already be capped at ``max_dets`` per image and
    free of zero-area detections (see ``Evaluator``), so both backends see what ``LVISResults`` would keep."""
    names = (*LVIS_AP_COLUMNS, *ar_columns("lvis", [max_dets]))
    if backend == "pycocotools":
        from lvis import LVISEval

        dt = _lvis_results(gt, results, max_dets)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)  # lvis uses logger.warn
            ev = LVISEval(gt, dt, task)
            ev.params.img_ids = sorted(image_ids)
            ev.params.max_dets = max_dets
            ev.evaluate()
            with numpy_float_alias():
                ev.accumulate()
            ev.summarize()
        summary = io.StringIO()
        with contextlib.redirect_stdout(summary):
            ev.print_results()
        r = ev.results
        keys = (*LVIS_AP_COLUMNS, f"AR@{max_dets}", f"ARs@{max_dets}", f"ARm@{max_dets}", f"ARl@{max_dets}")
        stats = {name: _scaled(r[key]) for name, key in zip(names, keys)}
        return TaskOutput(stats, _category_ap(ev.eval["precision"], ev.params.cat_ids), summary.getvalue())
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCOeval_faster

        lines: list[str] = []
        dt = gt.loadRes(results)
        ev = COCOeval_faster(gt, dt, task, lvis_style=True, print_function=lines.append)
        ev.params.imgIds = sorted(image_ids)
        ev.params.maxDets = [max_dets]
        ev.evaluate()
        ev.accumulate()
        lines.clear()
        ev.summarize()
        d = ev.stats_as_dict
        keys = ("AP_all", "AP_50", "AP_75", "AP_small", "AP_medium", "AP_large", "APr", "APc", "APf")
        keys += ("AR_all", "AR_small", "AR_medium", "AR_large")
        stats = {name: _scaled(d[key]) for name, key in zip(names, keys)}
        return TaskOutput(stats, _category_ap(ev.eval["precision"], ev.params.catIds), "\n".join(lines) + "\n")
    raise ValueError(f"unknown backend {backend!r}")


def _lvis_results(gt: Any, results: list[dict], max_dets: int) -> Any:
    """``LVISResults`` over ``results`` without deep-copying the GT annotations.

    ``LVISResults`` deep-copies the whole GT dataset only to reuse its images and categories; handing it a
    GT view without annotations keeps its own result preparation (areas, ids, per-image cap) and skips
    copying every GT polygon (seconds on LVIS val).
    """
    from lvis import LVIS, LVISResults

    header = LVIS.__new__(LVIS)
    header.dataset = {"images": gt.dataset["images"], "categories": gt.dataset["categories"], "annotations": []}
    if results:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            return LVISResults(header, results, max_dets=max_dets)
    dt = LVISResults.__new__(LVISResults)  # LVISResults cannot be built from an empty list
    dt.logger = logging.getLogger("lvis.results")
    dt.dataset = copy.deepcopy(header.dataset)
    dt._create_index()
    return dt
