"""What an evaluation returns: :class:`EvalResult`, and the column names of COCO/LVIS AP tables.

Every value is on the 0-100 scale as COCO tables print it. A statistic the evaluator reports as -1 (nothing
to average: no ground truth in that area range / category group) is ``NaN`` here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

TASKS = ("bbox", "segm")
COCO_AP_COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
LVIS_AP_COLUMNS = (*COCO_AP_COLUMNS, "APr", "APc", "APf")
COCO_MAX_DETS = (1, 10, 100)
LVIS_MAX_DETS = 300


def ap_columns(kind: str) -> tuple[str, ...]:
    """The AP columns of a table: COCO ``AP AP50 AP75 APs APm APl``; LVIS adds ``APr APc APf``."""
    if kind == "coco":
        return COCO_AP_COLUMNS
    if kind == "lvis":
        return LVIS_AP_COLUMNS
    raise ValueError(f"kind must be 'coco' or 'lvis', got {kind!r}")


def ar_columns(kind: str, max_dets: Sequence[int]) -> tuple[str, ...]:
    """Average-recall columns: COCO ``AR1 AR10 AR100 ARs ARm ARl`` (one ``AR<n>`` per maxDets, area ones at the
    largest); LVIS ``AR300 ARs ARm ARl``."""
    if kind == "coco":
        return (*(f"AR{n}" for n in max_dets), "ARs", "ARm", "ARl")
    return (f"AR{max_dets[-1]}", "ARs", "ARm", "ARl")


@dataclass
class EvalResult:
    """Metrics of one evaluation run (one model / one sampling-step count).

    Attributes:
        kind: ``coco`` or ``lvis``.
        backend: ``pycocotools`` (COCO: pycocotools COCOeval; LVIS: lvis-api LVISEval) or ``faster_coco_eval``.
        tasks: evaluated tasks, subset of ``("bbox", "segm")``.
        stats: ``task -> column -> value``: the AP columns of :func:`ap_columns` then the AR columns of
            :func:`ar_columns`, 0-100, ``NaN`` where undefined.
        per_category: one dict per GT category: ``category_id``, ``name``, ``num_gt`` (non-crowd GT instances in
            the evaluated images), ``frequency`` (LVIS only) and ``<task>``: AP (0-100, ``NaN`` without GT).
        image_ids: the images evaluated (``params.imgIds``), i.e. those given to the evaluator.
        num_gt_images: images in the ground-truth file.
        num_detections: detections given to the evaluator (before any per-image cap).
        max_dets: COCO ``maxDets`` (per image and category) or, for LVIS, the per-image cap.
        notes: plain-language remarks (subset evaluated, no predictions, dropped detections, ...).
        summaries: the evaluator's own printed summary per task.
        seconds: wall time of the evaluator per task.
    """

    kind: str
    backend: str
    tasks: tuple[str, ...]
    stats: dict[str, dict[str, float]]
    per_category: list[dict[str, Any]]
    image_ids: list[int]
    num_gt_images: int
    num_detections: int
    max_dets: list[int]
    notes: list[str] = field(default_factory=list)
    summaries: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def __getitem__(self, task: str) -> dict[str, float]:
        if task not in self.stats:
            raise KeyError(f"task {task!r} was not evaluated (tasks: {list(self.stats)})")
        return self.stats[task]

    @property
    def ap_columns(self) -> tuple[str, ...]:
        return ap_columns(self.kind)

    @property
    def ar_columns(self) -> tuple[str, ...]:
        return ar_columns(self.kind, self.max_dets)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``NaN`` -> ``None``, so the output is strict JSON)."""
        return _nan_to_none(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalResult:
        """Inverse of :meth:`to_dict` (``None`` metric values come back as ``NaN``)."""
        data = dict(data)
        data["tasks"] = tuple(data["tasks"])
        data["stats"] = {t: {k: _none_to_nan(v) for k, v in s.items()} for t, s in data["stats"].items()}
        data["per_category"] = [
            {k: (_none_to_nan(v) if k in data["tasks"] else v) for k, v in row.items()} for row in data["per_category"]
        ]
        return cls(**data)


def _none_to_nan(value: Any) -> float:
    return math.nan if value is None else float(value)


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj
