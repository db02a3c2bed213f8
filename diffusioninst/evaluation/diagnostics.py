"""Where COCO AP is lost: classification against localisation (pycocotools ``COCOeval``).

Three scores of one set of COCO-format results on COCO ground truth:

* ``standard``: the usual class-aware AP;
* ``class_agnostic``: ``COCOeval`` with ``params.useCats = 0``: a detection may match any GT of its image,
  whatever the two classes are, so this is the AP of the localisation and the score ranking alone;
* ``oracle_class``: every detection relabelled with the class of the non-crowd GT box it overlaps most in
  its image (box IoU; detections overlapping none keep their class), then the standard AP.

``oracle_class`` well above ``standard`` means the boxes and masks are there and the classifier mislabels
them; ``class_agnostic`` near ``standard`` means the classes are right and localisation is what is missing.
COCO ground truth only (LVIS's federated annotation makes class-agnostic matching ill-defined).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np
import pycocotools.mask as mask_util

from diffusioninst.evaluation.backends import evaluate_coco
from diffusioninst.evaluation.eval_result import COCO_MAX_DETS

__all__ = ["class_error_breakdown", "relabel_by_overlap"]

_COLUMNS = ("AP", "AP50", "AP75")


def relabel_by_overlap(gt: Any, results: list[dict]) -> list[dict]:
    """Copies of ``results`` (COCO result dicts with ``bbox`` xywh) with ``category_id`` set to that of the
    non-crowd GT annotation of the same image with the highest box IoU (unchanged where it overlaps none).

    ``gt`` is a ``pycocotools.coco.COCO``.
    """
    by_image: dict[int, list[dict]] = defaultdict(list)
    for r in results:
        by_image[int(r["image_id"])].append(r)
    out = []
    for image_id, dets in by_image.items():
        anns = [a for a in gt.loadAnns(gt.getAnnIds(imgIds=[image_id])) if not a.get("iscrowd", 0)]
        if not anns:
            out.extend(dict(d) for d in dets)
            continue
        ious = np.asarray(
            mask_util.iou([list(d["bbox"]) for d in dets], [list(a["bbox"]) for a in anns], [0] * len(anns))
        ).reshape(len(dets), len(anns))
        best = ious.argmax(axis=1)
        for d, j, overlap in zip(dets, best, ious.max(axis=1)):
            d = dict(d)
            if overlap > 0:
                d["category_id"] = anns[int(j)]["category_id"]
            out.append(d)
    return out


def _ap(gt: Any, results: list[dict], task: str, use_cats: bool, image_ids: list[int]) -> dict[str, float]:
    """AP / AP50 / AP75 (0-100) through the evaluator's own pycocotools path; 0 when there are no detections."""
    if not results:
        return dict.fromkeys(_COLUMNS, 0.0)
    # shallow copies: loadRes writes "id" / "area" into each result dict
    out = evaluate_coco(gt, [dict(r) for r in results], task, image_ids, COCO_MAX_DETS, "pycocotools", use_cats)
    return {c: 0.0 if math.isnan(out.stats[c]) else out.stats[c] for c in _COLUMNS}


def class_error_breakdown(
    gt: Any, results: list[dict], tasks: tuple[str, ...] = ("bbox", "segm"), image_ids: list[int] | None = None
) -> dict[str, dict[str, dict[str, float]]]:
    """``{task: {"standard" | "class_agnostic" | "oracle_class": {"AP", "AP50", "AP75"}}}`` on the 0-100 scale.

    Args:
        gt: a ``pycocotools.coco.COCO``.
        results: COCO result dicts (``image_id``, ``category_id``, ``score``, ``bbox`` xywh, ``segmentation``
            RLE for ``segm``).
        image_ids: images to evaluate (default: every image of ``gt``).
    """
    ids = sorted(gt.getImgIds()) if image_ids is None else list(image_ids)
    oracle = relabel_by_overlap(gt, results)
    return {
        task: {
            "standard": _ap(gt, results, task, True, ids),
            "class_agnostic": _ap(gt, results, task, False, ids),
            "oracle_class": _ap(gt, oracle, task, True, ids),
        }
        for task in tasks
    }
