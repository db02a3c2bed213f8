"""COCO / LVIS box and mask AP over the images that were evaluated.

Usage::

    ev = Evaluator("instances_val2017.json", kind="coco", tasks=("bbox", "segm"))
    for image_id, pred in predictions:         # pred in the ORIGINAL image frame (see results.py)
        ev.add(image_id, pred)
    result = ev.compute()                      # EvalResult; result["segm"]["AP"] -> 37.3

Faithful to the official evaluation (detectron2's COCOEvaluator / LVISEvaluator):

* only the added images are evaluated (``params.imgIds``), so a partial run gives the AP of that subset;
* contiguous labels map back to dataset category ids (default: sorted GT category ids, detectron2's order);
* segm results carry no ``bbox``, so the evaluator takes each detection's area from its mask (detectron2
  removes ``bbox`` for the same reason: with it, the area ranges s/m/l would use the box area);
* COCO: ``maxDets = [1, 10, 100]`` per image and category; LVIS: the 300 best detections per image.

Departure: with no predictions at all detectron2 returns NaN for everything; here the evaluator runs on the
empty result set, so every AP is 0 where GT exists (NaN only where a statistic has no GT), with a note.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from os import PathLike
from typing import Any

import numpy as np
import pycocotools.mask as mask_util

from diffusioninst.evaluation.backends import TaskOutput, evaluate_coco, evaluate_lvis
from diffusioninst.evaluation.eval_result import COCO_MAX_DETS, LVIS_MAX_DETS, TASKS, EvalResult
from diffusioninst.evaluation.ground_truth import BACKENDS, dataset_of, detect_kind, load_ground_truth, read_json
from diffusioninst.evaluation.results import category_id_lookup, instances_to_coco_results


def resolve_max_dets(kind: str, max_dets: int | Sequence[int] | None) -> list[int]:
    """COCO: three increasing ``maxDets`` (default ``[1, 10, 100]``); LVIS: one per-image cap (default 300)."""
    if kind == "coco":
        values = list(COCO_MAX_DETS) if max_dets is None else list(np.atleast_1d(max_dets).tolist())
        if len(values) != 3 or values != sorted(values) or min(values) < 1:
            raise ValueError(f"COCO max_dets must be three increasing positive ints like [1, 10, 100], got {max_dets}")
        return [int(v) for v in values]
    values = [LVIS_MAX_DETS] if max_dets is None else list(np.atleast_1d(max_dets).tolist())
    if len(values) != 1 or values[0] < 1:
        raise ValueError(f"LVIS max_dets must be one positive int (official 300), got {max_dets}")
    return [int(values[0])]


class Evaluator:
    """Collects predictions image by image and computes COCO/LVIS AP (see module doc).

    Args:
        gt: GT JSON path, parsed dict, or loaded ``pycocotools``/``lvis``/``faster_coco_eval`` object
            (reused without copying when it fits the backend; share one between evaluators).
        kind: ``coco``, ``lvis``, or ``auto`` (LVIS when the GT has LVIS federated fields).
        tasks: subset of ``("bbox", "segm")``.
        backend: ``pycocotools`` (reference: pycocotools COCOeval, or lvis-api LVISEval for LVIS) or
            ``faster_coco_eval`` (same numbers, ~2.5x faster).
        max_dets: COCO ``maxDets`` (three ints) or the LVIS per-image cap; ``None`` = official values.
        category_ids: contiguous label -> dataset category id (list or dict); default sorted GT category ids.
    """

    def __init__(
        self,
        gt: str | PathLike | dict | Any,
        kind: str = "coco",
        tasks: Sequence[str] = ("bbox", "segm"),
        backend: str = "pycocotools",
        max_dets: int | Sequence[int] | None = None,
        category_ids: Sequence[int] | Mapping[int, int] | None = None,
    ) -> None:
        tasks = tuple(tasks)
        if not tasks or len(set(tasks)) != len(tasks) or not set(tasks) <= set(TASKS):
            raise ValueError(f"tasks must be distinct values from {TASKS}, got {list(tasks)}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if isinstance(gt, (str, PathLike)):
            self.gt_source = str(gt)
            gt = read_json(gt)
        else:
            self.gt_source = "ground truth object"
        dataset = dataset_of(gt)
        if kind == "auto":
            kind = detect_kind(dataset)
        if kind not in ("coco", "lvis"):
            raise ValueError(f"kind must be 'coco', 'lvis' or 'auto', got {kind!r}")
        self.kind, self.tasks, self.backend = kind, tasks, backend
        self.max_dets = resolve_max_dets(kind, max_dets)
        self.gt = load_ground_truth(gt, kind, backend)

        self._image_sizes = {int(i["id"]): (int(i["height"]), int(i["width"])) for i in dataset["images"]}
        self._categories = sorted(dataset["categories"], key=lambda c: c["id"])
        gt_cat_ids = [int(c["id"]) for c in self._categories]
        self.category_ids = category_id_lookup(gt_cat_ids if category_ids is None else category_ids)
        unknown = sorted(set(self.category_ids[self.category_ids >= 0].tolist()) - set(gt_cat_ids))
        if unknown:
            raise ValueError(f"{self.gt_source}: category_ids {unknown[:10]} are not categories of the ground truth")
        self._gt_cat_ids = set(gt_cat_ids)
        self.reset()

    # ------------------------------------------------------------------ collecting
    def reset(self) -> None:
        """Forget every added prediction (the GT stays loaded)."""
        self._results: list[dict] = []
        self._image_ids: set[int] = set()

    @property
    def image_ids(self) -> list[int]:
        """Images added so far (sorted)."""
        return sorted(self._image_ids)

    @property
    def coco_results(self) -> list[dict]:
        """COCO result dicts collected so far (to gather from several workers into one evaluator)."""
        return list(self._results)

    def add(self, image_id: int, result: Mapping[str, Any]) -> None:
        """Add one image's predictions: ``boxes`` ``float32 [M,4]`` abs xyxy, ``scores [M]``, contiguous ``labels [M]``
        and, for segm, ``masks`` ``bool [M,H,W]`` or ``rles``; all in the original image frame."""
        image_id = int(image_id)
        self._check_new_images([image_id])
        converted = instances_to_coco_results(
            image_id,
            result,
            self.category_ids,
            with_masks="segm" in self.tasks,
            image_size=self._image_sizes[image_id],
        )
        self._image_ids.add(image_id)
        self._results.extend(converted)

    def add_coco_results(self, results: Iterable[Mapping[str, Any]], image_ids: Iterable[int] | None = None) -> None:
        """Add ready COCO result dicts (``image_id``, dataset ``category_id``, ``score``, ``bbox`` xywh and/or
        ``segmentation`` RLE). ``image_ids`` names the images they cover, so images without any detection are
        still evaluated; by default the images appearing in ``results``."""
        results = [dict(r) for r in results]
        need = {"image_id", "category_id", "score"} | {"bbox" if t == "bbox" else "segmentation" for t in self.tasks}
        for n, r in enumerate(results):
            missing = need - set(r)
            if missing:
                raise KeyError(f"result #{n} (image {r.get('image_id')}) lacks {sorted(missing)}")
            if int(r["category_id"]) not in self._gt_cat_ids:
                raise ValueError(f"result #{n}: category_id {r['category_id']} is not a ground-truth category")
            seg = r.get("segmentation")
            if isinstance(seg, dict) and isinstance(seg.get("counts"), bytes):
                r["segmentation"] = {"size": seg["size"], "counts": seg["counts"].decode("ascii")}
        ids = sorted({int(r["image_id"]) for r in results} | {int(i) for i in (image_ids or ())})
        self._check_new_images(ids)
        self._image_ids.update(ids)
        self._results.extend(results)

    def _check_new_images(self, image_ids: Sequence[int]) -> None:
        for image_id in image_ids:
            if image_id not in self._image_sizes:
                raise KeyError(f"image id {image_id} is not in the ground truth ({self.gt_source})")
            if image_id in self._image_ids:
                raise ValueError(f"image id {image_id} was already added to this evaluator")

    # ------------------------------------------------------------------ computing
    def compute(self) -> EvalResult:
        """Evaluate every task over the added images and return an :class:`EvalResult`."""
        if not self._image_ids:
            raise RuntimeError("nothing to evaluate: no image was added to the evaluator")
        image_ids = self.image_ids
        notes = self._coverage_notes(image_ids)
        results = self._results
        if self.kind == "lvis":
            results, capped = _cap_per_image(results, self.max_dets[0])
            if capped:
                notes.append(f"{capped} detection(s) beyond the top {self.max_dets[0]} per image were dropped")
        if not self._results:
            notes.append(
                "no predictions at all: AP is 0 for every category with ground truth (NaN marks statistics "
                "without ground truth)"
            )

        stats: dict[str, dict[str, float]] = {}
        category_ap: dict[str, dict[int, float]] = {}
        summaries: dict[str, str] = {}
        seconds: dict[str, float] = {}
        for task in self.tasks:
            task_results = _task_view(results, task)
            start = time.perf_counter()
            if self.kind == "coco":
                out: TaskOutput = evaluate_coco(self.gt, task_results, task, image_ids, self.max_dets, self.backend)
            else:
                task_results, dropped = _positive_area(task_results, task)
                if dropped:
                    notes.append(f"{task}: {dropped} zero-area detection(s) ignored, as lvis-api does")
                out = evaluate_lvis(self.gt, task_results, task, image_ids, self.max_dets[0], self.backend)
            seconds[task] = time.perf_counter() - start
            stats[task], category_ap[task], summaries[task] = out.stats, out.category_ap, out.summary

        return EvalResult(
            kind=self.kind,
            backend=self.backend,
            tasks=self.tasks,
            stats=stats,
            per_category=self._per_category(image_ids, category_ap),
            image_ids=image_ids,
            num_gt_images=len(self._image_sizes),
            num_detections=len(self._results),
            max_dets=list(self.max_dets),
            notes=notes,
            summaries=summaries,
            seconds=seconds,
        )

    def _annotations_of(self, image_ids: Sequence[int]) -> list[dict]:
        wanted = set(image_ids)
        return [a for a in self.gt.dataset["annotations"] if a["image_id"] in wanted]

    def _coverage_notes(self, image_ids: Sequence[int]) -> list[str]:
        total = len(self._image_sizes)
        if len(image_ids) < total:
            notes = [
                f"evaluated {len(image_ids)} of {total} ground-truth images "
                "(params.imgIds = the images given to the evaluator)"
            ]
        else:
            notes = [f"evaluated all {total} ground-truth images"]
        with_gt = {a["image_id"] for a in self._annotations_of(image_ids)}
        empty = len(set(image_ids) - with_gt)
        if empty:
            notes.append(f"{empty} evaluated image(s) have no ground-truth annotations")
        return notes

    def _per_category(self, image_ids: Sequence[int], category_ap: dict[str, dict[int, float]]) -> list[dict]:
        num_gt: dict[int, int] = defaultdict(int)
        for a in self._annotations_of(image_ids):
            if not a.get("iscrowd", 0):
                num_gt[int(a["category_id"])] += 1
        rows = []
        for cat in self._categories:
            cid = int(cat["id"])
            row: dict[str, Any] = {"category_id": cid, "name": cat.get("name", str(cid)), "num_gt": num_gt[cid]}
            if self.kind == "lvis":
                row["frequency"] = cat.get("frequency")
            for task in self.tasks:
                row[task] = category_ap[task].get(cid, float("nan"))
            rows.append(row)
        return rows


def _task_view(results: list[dict], task: str) -> list[dict]:
    """Fresh per-task dicts (the COCO/LVIS loaders annotate result dicts in place). segm results carry no
    ``bbox``, so areas (for s/m/l) come from the masks."""
    key = "bbox" if task == "bbox" else "segmentation"
    return [
        {"image_id": r["image_id"], "category_id": r["category_id"], key: r[key], "score": r["score"]} for r in results
    ]


def _cap_per_image(results: list[dict], cap: int) -> tuple[list[dict], int]:
    """Keep the ``cap`` highest-scoring detections of each image (stable on ties), as ``LVISResults`` does."""
    by_image: dict[int, list[dict]] = defaultdict(list)
    for r in results:
        by_image[r["image_id"]].append(r)
    kept, dropped = [], 0
    for anns in by_image.values():
        if len(anns) > cap:
            dropped += len(anns) - cap
            anns = sorted(anns, key=lambda a: a["score"], reverse=True)[:cap]
        kept.extend(anns)
    return kept, dropped


def _positive_area(results: list[dict], task: str) -> tuple[list[dict], int]:
    """Drop detections whose area (box w*h, or mask pixels) is not > 0: lvis-api never loads them
    (``get_ann_ids`` keeps ``0 < area < inf``), faster-coco-eval would count them as false positives."""
    if not results:
        return results, 0
    if task == "bbox":
        areas = np.array([r["bbox"][2] * r["bbox"][3] for r in results], np.float64)
    else:
        rles = [r["segmentation"] for r in results]
        # pycocotools 2.0.11 + numpy 2: area() of more than 255 RLEs at once raises OverflowError (a uint8 temp)
        areas = np.concatenate([mask_util.area(rles[i : i + 255]) for i in range(0, len(rles), 255)])
        areas = areas.astype(np.float64)
    keep = (areas > 0) & np.isfinite(areas)
    return [r for r, k in zip(results, keep) if k], int((~keep).sum())


def build_evaluator(
    gt: str | PathLike | dict | Any, cfg: Any, category_ids: Sequence[int] | Mapping[int, int] | None = None
) -> Evaluator:
    """Evaluator from an :class:`~diffusioninst.config.schema.EvalConfig` (``evaluator``, ``tasks``, ``backend``,
    ``coco_max_dets`` / ``lvis_max_dets``)."""
    kind = cfg.evaluator
    if kind == "auto":
        gt = read_json(gt) if isinstance(gt, (str, PathLike)) else gt
        kind = detect_kind(dataset_of(gt))
    max_dets = cfg.coco_max_dets if kind == "coco" else cfg.lvis_max_dets
    return Evaluator(gt, kind, tuple(cfg.tasks), cfg.backend, max_dets, category_ids)
