"""Ground truth for the evaluation backends: loading, kind detection, and the lvis/numpy-2 shim.

Each backend wants its own GT object: ``pycocotools.coco.COCO`` (COCO, reference), ``lvis.LVIS`` (LVIS,
reference) or ``faster_coco_eval.COCO`` (both kinds, fast). :func:`load_ground_truth` builds the right one from
a JSON path, an already parsed dict, or another loaded object (reusing the object when it already has the
right type, so one GT load can serve several evaluators, e.g. one per sampling-step count).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import threading
import warnings
from collections.abc import Iterator
from os import PathLike
from pathlib import Path
from typing import Any, Literal

import numpy as np

Kind = Literal["coco", "lvis"]
Backend = Literal["pycocotools", "faster_coco_eval"]
KINDS = ("coco", "lvis")
BACKENDS = ("pycocotools", "faster_coco_eval")

_NUMPY_SHIM_LOCK = threading.Lock()


@contextlib.contextmanager
def numpy_float_alias() -> Iterator[None]:
    """Make ``np.float`` (removed in numpy 1.24) resolve to ``float`` inside the block only.

    lvis 0.5.3 (the last PyPI release) calls ``.astype(dtype=np.float)`` in ``LVISEval.accumulate``; the fix
    exists only in lvis-api git (commit 7d7f07d). The alias is set on entry and deleted on exit (also on
    error), under a lock; on numpy versions that still have ``np.float`` nothing is touched.
    """
    with _NUMPY_SHIM_LOCK:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                np.float  # noqa: B018 - probing for the alias
                native = True
            except AttributeError:
                native = False
        if native:
            yield
            return
        np.float = float  # type: ignore[attr-defined]
        try:
            yield
        finally:
            if np.__dict__.get("float") is float:
                del np.float  # type: ignore[attr-defined]


def read_json(path: str | PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ground-truth file not found: {path}")
    with path.open() as f:
        data = json.load(f)
    if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= set(data):
        raise ValueError(f"{path}: not a COCO/LVIS instances file (needs images, annotations, categories)")
    return data


def dataset_of(gt: Any) -> dict:
    """The parsed JSON dict behind a GT source (path, dict, or a COCO/LVIS object with ``.dataset``)."""
    if isinstance(gt, (str, PathLike)):
        return read_json(gt)
    if isinstance(gt, dict):
        return gt
    dataset = getattr(gt, "dataset", None)
    if not isinstance(dataset, dict):
        raise TypeError(f"ground truth must be a JSON path, a dict or a COCO/LVIS object, got {type(gt).__name__}")
    return dataset


def detect_kind(dataset: dict) -> Kind:
    """``lvis`` when the GT carries LVIS federated fields (category ``frequency``, image
    ``not_exhaustive_category_ids``/``neg_category_ids``), else ``coco``."""
    cats = dataset.get("categories", [])
    imgs = dataset.get("images", [])
    if cats and all("frequency" in c for c in cats):
        return "lvis"
    if imgs and all("neg_category_ids" in i or "not_exhaustive_category_ids" in i for i in imgs):
        return "lvis"
    return "coco"


def check_lvis_fields(dataset: dict, source: str) -> None:
    """LVIS evaluation needs ``frequency`` in r/c/f per category and federated lists per image."""
    bad_cats = [c.get("id") for c in dataset["categories"] if c.get("frequency") not in ("r", "c", "f")]
    if bad_cats:
        raise ValueError(
            f"{source}: LVIS categories need 'frequency' in r/c/f; missing/invalid for ids {bad_cats[:10]}"
        )
    for key in ("neg_category_ids", "not_exhaustive_category_ids"):
        missing = [i.get("id") for i in dataset["images"] if key not in i]
        if missing:
            raise ValueError(f"{source}: LVIS images need '{key}'; missing for image ids {missing[:10]}")


def _quiet() -> contextlib.AbstractContextManager:
    return contextlib.redirect_stdout(io.StringIO())


def load_ground_truth(gt: Any, kind: Kind, backend: Backend) -> Any:
    """GT object for ``(kind, backend)``: pycocotools COCO, lvis LVIS, or faster_coco_eval COCO.

    ``gt`` may be a JSON path, a parsed dict, or a loaded COCO/LVIS object (returned as is when its type
    already fits; otherwise rebuilt from its ``.dataset``). COCOeval/LVISEval annotate the GT annotations in
    place while evaluating (``ignore`` flags, RLE conversion); that is harmless to re-evaluation.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCO as FasterCOCO

        target: type = FasterCOCO
    elif kind == "coco":
        from pycocotools.coco import COCO as target
    else:
        from lvis import LVIS as target
    if type(gt) is target:
        obj = gt
    else:
        obj = _build(target, gt, backend, kind)
    if kind == "lvis":
        check_lvis_fields(obj.dataset, str(gt) if isinstance(gt, (str, PathLike)) else "ground truth")
    return obj


def _build(target: type, gt: Any, backend: Backend, kind: Kind) -> Any:
    if backend == "faster_coco_eval":
        source = str(gt) if isinstance(gt, (str, PathLike)) else dataset_of(gt)
        if isinstance(source, str):
            read_json(source)  # clear error for a missing or malformed file
        return target(source)
    dataset = dataset_of(gt)
    if kind == "coco":  # pycocotools.coco.COCO: an empty object, then the index over our dict
        with _quiet():
            obj = target()
            obj.dataset = dataset
            obj.createIndex()
        return obj
    # lvis.LVIS only loads from a path; fill in what its __init__ would
    obj = target.__new__(target)
    obj.logger = logging.getLogger("lvis.lvis")
    obj.dataset = dataset
    obj._create_index()
    return obj
