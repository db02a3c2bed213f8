"""Datasets: COCO/LVIS readers, synthetic generator, transforms, loaders and Ray Data ingest.

Names are imported lazily (``from diffusioninst.data import build_train_loader``) so that light modules
(e.g. the Ray Data task bodies in ``ray_tasks``) can be imported without pulling in torch or Ray.
See docs/data.md.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ImageRecord": "records",
    "Instance": "records",
    "DatasetMeta": "records",
    "DatasetError": "validation",
    "read_coco": "coco",
    "read_lvis": "lvis",
    "fed_loss_class_weights": "lvis",
    "numpy_float_alias": "lvis_compat",
    "generate": "synthetic",
    "SyntheticPaths": "synthetic",
    "TrainDataset": "dataset",
    "EvalDataset": "dataset",
    "collate": "dataset",
    "ensure_dataset": "loaders",
    "load_split": "loaders",
    "build_train_loader": "loaders",
    "build_eval_dataset": "loaders",
    "EvalData": "loaders",
    "repeat_factors": "sampling",
    "preprocess": "preprocess",
    "build_ray_dataset": "ray_ingest",
    "iter_train_batches": "ray_ingest",
    "RayTrainCollate": "ray_ingest",
    "RayEvalCollate": "ray_ingest",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'diffusioninst.data' has no attribute '{name}'")
    return getattr(importlib.import_module(f"diffusioninst.data.{module}"), name)
