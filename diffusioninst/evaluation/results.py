"""One image's predictions -> COCO result dicts.

Input (from ``diffusioninst.model.postprocess``), everything in the ORIGINAL image frame (``orig_sizes``):

* ``boxes``  ``float32 [M, 4]`` absolute-pixel ``xyxy``
* ``scores`` ``float32 [M]``
* ``labels`` ``int64 [M]`` contiguous 0-based class indices
* ``masks``  ``bool [M, H, W]`` (optional), or ``rles``: ``M`` pycocotools RLE dicts already encoded

numpy arrays or torch tensors (any device) are accepted. Output: one dict per detection,
``{"image_id", "category_id", "bbox": [x, y, w, h], "score"[, "segmentation": {"size", "counts": str}]}``,
exactly what ``COCO.loadRes`` / ``LVISResults`` read. ``bbox`` and ``score`` are the float32 values written
as Python floats, as detectron2's ``instances_to_coco_json`` does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from diffusioninst.evaluation.rle import encode_masks


def to_numpy(value: Any) -> np.ndarray:
    """numpy view/copy of a numpy array, list or torch tensor (detached, moved to CPU, low floats upcast)."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def category_id_lookup(category_ids: Sequence[int] | Mapping[int, int]) -> np.ndarray:
    """``int64 [K]`` array mapping contiguous label -> dataset category id (-1 where a mapping has a hole)."""
    if isinstance(category_ids, Mapping):
        if not category_ids:
            raise ValueError("category_ids mapping is empty")
        keys = [int(k) for k in category_ids]
        if min(keys) < 0:
            raise ValueError(f"contiguous labels must be >= 0, got {min(keys)}")
        lookup = np.full(max(keys) + 1, -1, np.int64)
        for k, v in category_ids.items():
            lookup[int(k)] = int(v)
        return lookup
    lookup = np.asarray(list(category_ids), np.int64)
    if lookup.ndim != 1 or lookup.size == 0:
        raise ValueError("category_ids must be a non-empty list of dataset category ids")
    return lookup


def instances_to_coco_results(
    image_id: int,
    instances: Mapping[str, Any],
    category_ids: Sequence[int] | Mapping[int, int] | np.ndarray,
    *,
    with_masks: bool = True,
    image_size: tuple[int, int] | None = None,
) -> list[dict]:
    """Convert one image's detections to COCO result dicts.

    Args:
        image_id: dataset image id.
        instances: ``boxes``/``scores``/``labels`` and, if ``with_masks``, ``masks`` or ``rles`` (see module doc).
        category_ids: contiguous label -> dataset category id (list, dict, or a lookup from
            :func:`category_id_lookup`).
        with_masks: also produce ``segmentation`` (compressed RLE, ``counts`` as ``str``).
        image_size: ``(H, W)`` of the original image; masks of another size are an error.
    Returns:
        ``M`` result dicts, in the input order.
    """
    for key in ("boxes", "scores", "labels"):
        if key not in instances:
            raise KeyError(f"image {image_id}: predictions lack '{key}' (have {sorted(instances)})")
    boxes = to_numpy(instances["boxes"]).astype(np.float32, copy=False)
    scores = to_numpy(instances["scores"]).astype(np.float32, copy=False).reshape(-1)
    labels = to_numpy(instances["labels"]).astype(np.int64, copy=False).reshape(-1)
    num = scores.shape[0]
    if boxes.shape != (num, 4) or labels.shape != (num,):
        raise ValueError(
            f"image {image_id}: expected boxes [M, 4], scores [M], labels [M]; got boxes {tuple(boxes.shape)}, "
            f"scores {tuple(scores.shape)}, labels {tuple(labels.shape)}"
        )
    lookup = category_ids if isinstance(category_ids, np.ndarray) else category_id_lookup(category_ids)
    if num and (labels.min() < 0 or labels.max() >= lookup.size or (lookup[labels] < 0).any()):
        bad = sorted({int(x) for x in labels if x < 0 or x >= lookup.size or lookup[x] < 0})
        raise ValueError(
            f"image {image_id}: labels {bad[:10]} have no category id (category_ids maps {lookup.size} labels)"
        )
    cats = lookup[labels].tolist()

    xywh = boxes.copy()
    xywh[:, 2:] -= xywh[:, :2]
    bbox_list = xywh.tolist()
    score_list = scores.tolist()
    results = [
        {"image_id": int(image_id), "category_id": c, "bbox": b, "score": s}
        for c, b, s in zip(cats, bbox_list, score_list)
    ]
    if not with_masks:
        return results

    rles = _rles_of(image_id, instances, num, image_size)
    for result, rle in zip(results, rles):
        result["segmentation"] = rle
    return results


def _rles_of(image_id: int, instances: Mapping[str, Any], num: int, image_size: tuple[int, int] | None) -> list[dict]:
    if "rles" in instances and instances["rles"] is not None:
        rles = []
        for rle in instances["rles"]:
            counts = rle["counts"]
            if isinstance(counts, list):
                raise ValueError(f"image {image_id}: 'rles' must be compressed RLE (counts str/bytes), got a list")
            rles.append({"size": [int(s) for s in rle["size"]], "counts": _as_str(counts)})
        sizes = {tuple(r["size"]) for r in rles}
    elif "masks" in instances and instances["masks"] is not None:
        masks = to_numpy(instances["masks"])
        if masks.ndim != 3 or masks.shape[0] != num:
            raise ValueError(f"image {image_id}: masks must be [M={num}, H, W], got {tuple(masks.shape)}")
        rles = encode_masks(masks)
        sizes = {tuple(masks.shape[1:])} if num else set()
    else:
        raise KeyError(f"image {image_id}: segm evaluation needs 'masks' [M, H, W] or 'rles' in the predictions")
    if len(rles) != num:
        raise ValueError(f"image {image_id}: {len(rles)} RLEs for {num} detections")
    if image_size is not None and sizes and sizes != {tuple(image_size)}:
        raise ValueError(
            f"image {image_id}: masks have size {sorted(sizes)} but the image is {tuple(image_size)} (H, W); "
            "predictions must be in the original image frame"
        )
    return rles


def _as_str(counts: str | bytes) -> str:
    return counts.decode("ascii") if isinstance(counts, bytes) else counts
