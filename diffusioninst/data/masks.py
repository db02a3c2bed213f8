"""Segmentation <-> bitmask/RLE conversions, all through pycocotools (the rasteriser COCO itself uses).

Conventions: masks are ``uint8`` ``[h, w]`` (or ``[G, h, w]``) with values 0/1; polygons are flat float
``[x0, y0, x1, y1, ...]`` lists in absolute pixels; a compressed RLE is ``{"size": [h, w], "counts": bytes}``
(``str`` counts are accepted everywhere and are what JSON and Parquet store).
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
from pycocotools import mask as mask_utils


def _to_c_order(fortran_hw: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """C-contiguous copy of a Fortran-ordered [h, w] mask (pycocotools' layout). ``cv2.transpose`` of the
    C-contiguous [w, h] view is ~10x faster than numpy's strided copy; ``out`` (C-contiguous uint8 [h, w])
    receives the result when given."""
    if out is None:
        out = np.empty(fortran_hw.shape, np.uint8)
    cv2.transpose(fortran_hw.T, out)
    return out


def _as_bytes_rle(rle: dict) -> dict:
    counts = rle["counts"]
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": counts}


def polygons_to_rle(polygons: Sequence[Sequence[float] | np.ndarray], height: int, width: int) -> dict:
    """Rasterise the union of ``polygons`` (each flat ``[2k]``, k >= 3) to one compressed RLE of size (h, w)."""
    if len(polygons) == 0:
        return mask_to_rle(np.zeros((height, width), np.uint8))
    rles = mask_utils.frPyObjects([np.asarray(p, dtype=np.float64).tolist() for p in polygons], height, width)
    return mask_utils.merge(rles)


def polygons_to_mask(
    polygons: Sequence[Sequence[float] | np.ndarray], height: int, width: int, out: np.ndarray | None = None
) -> np.ndarray:
    """uint8 [h, w] (C-contiguous) mask of the union of ``polygons``, exactly as ``COCO.annToMask`` rasterises
    them; written into ``out`` when given."""
    if len(polygons) == 0:
        if out is None:
            return np.zeros((height, width), np.uint8)
        out[...] = 0
        return out
    return _to_c_order(mask_utils.decode(polygons_to_rle(polygons, height, width)), out)


def segmentation_to_rle(segmentation: list | dict, height: int, width: int) -> dict:
    """A COCO ``segmentation`` (polygons, uncompressed RLE or compressed RLE) as one compressed RLE.

    Same rules as ``pycocotools.COCO.annToRLE``: polygons and uncompressed (list ``counts``) RLE are
    converted with ``frPyObjects``; compressed RLE is returned as is (``counts`` as bytes).
    """
    if isinstance(segmentation, list):
        return polygons_to_rle(segmentation, height, width)
    if isinstance(segmentation.get("counts"), list):
        return mask_utils.frPyObjects(segmentation, *segmentation["size"])
    return _as_bytes_rle(segmentation)


def rle_to_mask(rle: dict) -> np.ndarray:
    """uint8 [h, w] mask of a compressed RLE (``counts`` bytes or str)."""
    return mask_utils.decode(_as_bytes_rle(rle))


def rles_to_masks(rles: Sequence[dict], height: int, width: int) -> np.ndarray:
    """uint8 [G, h, w] masks of G compressed RLEs of size (h, w) (one decode call for all of them)."""
    out = np.empty((len(rles), height, width), np.uint8)
    if len(rles) == 0:
        return out
    decoded = mask_utils.decode([_as_bytes_rle(r) for r in rles])  # [h, w, G], Fortran order
    for g in range(len(rles)):
        _to_c_order(decoded[:, :, g], out[g])
    return out


def mask_to_rle(mask: np.ndarray) -> dict:
    """Compressed RLE (``counts`` bytes) of a 2-D 0/1 mask."""
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8, copy=False)))


def rle_counts_str(rle: dict) -> str:
    """The compressed ``counts`` of an RLE as an ASCII string (JSON/Parquet friendly)."""
    counts = rle["counts"]
    return counts.decode("ascii") if isinstance(counts, bytes) else counts


def rle_area(rle: dict) -> int:
    return int(mask_utils.area(_as_bytes_rle(rle)))


def rle_bbox_xywh(rle: dict) -> list[float]:
    """Tight box ``[x, y, w, h]`` of an RLE's foreground, as COCO computes it (``toBbox``)."""
    return [float(v) for v in mask_utils.toBbox(_as_bytes_rle(rle))]
