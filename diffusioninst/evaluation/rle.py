"""Binary masks -> COCO compressed RLE, fast.

COCO RLE runs over the mask in column-major (Fortran) order, starting with a run of zeros. The reference
way to get it is ``pycocotools.mask.encode`` on a Fortran-ordered ``uint8 [H, W, M]`` array
(:func:`encode_masks_dense`). For detector output that is slow: building the Fortran copy of ``M``
full-resolution masks costs about 3x the encoding itself (~120 ms for 100 masks at 800x1200 on one core).

Predicted instance masks are small compared with the image, so :func:`encode_masks_cropped` only touches
each mask's bounding rectangle: it finds the rows/columns holding foreground, computes the run boundaries
inside that rectangle with numpy, shifts them to full-image column-major offsets, and lets
``pycocotools.mask.frPyObjects`` compress the counts. The output is byte-identical to the dense path (tested
on random and edge-case masks). :func:`encode_masks` picks the cropped path unless the rectangles cover most
of the image.

All functions take masks as ``bool`` (or 0/1 integer) ``[M, H, W]`` numpy arrays in the image frame and return
``M`` dicts ``{"size": [H, W], "counts": str}`` (counts decoded to ``str`` so they can be written to JSON).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pycocotools.mask as mask_util

# Above this fraction of M*H*W covered by the masks' bounding rectangles, the dense path is cheaper.
_DENSE_FRACTION = 0.5


def _as_bool_masks(masks: np.ndarray) -> np.ndarray:
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be [M, H, W], got shape {tuple(masks.shape)}")
    if masks.dtype != np.bool_:
        masks = masks != 0
    return masks


def _decoded(rles: list[dict]) -> list[dict]:
    for rle in rles:
        if isinstance(rle["counts"], bytes):
            rle["counts"] = rle["counts"].decode("ascii")
    return rles


def encode_masks_dense(masks: np.ndarray) -> list[dict]:
    """Reference encoder: one ``pycocotools.mask.encode`` call on a Fortran-ordered ``uint8 [H, W, M]`` array.

    Args:
        masks: ``bool [M, H, W]``.
    Returns:
        ``M`` RLE dicts with ``counts`` as ``str``.
    """
    masks = _as_bool_masks(masks)
    if masks.shape[0] == 0:
        return []
    # [M, W, H] C-order has exactly the memory layout of [H, W, M] Fortran-order.
    fortran = np.ascontiguousarray(masks.transpose(0, 2, 1)).view(np.uint8).transpose(2, 1, 0)
    return _decoded(mask_util.encode(fortran))


def _foreground_rectangles(masks: np.ndarray) -> np.ndarray:
    """``int64 [M, 4]`` rows ``(y0, y1, x0, x1)`` (half-open) of each mask's foreground; all zero for empty masks."""
    rects = np.zeros((masks.shape[0], 4), np.int64)
    rows_any = masks.any(axis=2)  # [M, H]; a contiguous reduction, the only full pass over the masks
    for i in range(masks.shape[0]):
        ys = np.flatnonzero(rows_any[i])
        if ys.size == 0:
            continue
        y0, y1 = ys[0], ys[-1] + 1
        xs = np.flatnonzero(masks[i, y0:y1].any(axis=0))
        rects[i] = (y0, y1, xs[0], xs[-1] + 1)
    return rects


def _counts_in_rectangle(mask: np.ndarray, rect: np.ndarray) -> np.ndarray:
    """Uncompressed COCO RLE counts of a ``[H, W]`` mask that is zero outside ``rect = (y0, y1, x0, x1)``."""
    height, width = mask.shape
    y0, y1, x0, x1 = (int(v) for v in rect)
    h = y1 - y0
    if h == 0:
        return np.array([height * width], np.uint32)
    # One row per image column of the rectangle, with a trailing 0 so no run crosses a column boundary here.
    columns = np.zeros((x1 - x0, h + 1), np.int8)
    columns[:, :h] = mask[y0:y1, x0:x1].T
    steps = np.diff(columns.ravel(), prepend=np.int8(0))
    starts = np.flatnonzero(steps == 1)
    ends = np.flatnonzero(steps == -1)
    # Position (column c, row r) of the rectangle -> full-image column-major offset (x0 + c) * H + y0 + r.
    starts = (starts // (h + 1) + x0) * height + y0 + starts % (h + 1)
    ends = (ends // (h + 1) + x0) * height + y0 + ends % (h + 1)
    if h == height and starts.size > 1:
        # Full-height rectangle: a run ending at the bottom of one column continues at the top of the next.
        joined = ends[:-1] == starts[1:]
        if joined.any():
            starts = np.concatenate([starts[:1], starts[1:][~joined]])
            ends = np.concatenate([ends[:-1][~joined], ends[-1:]])
    bounds = np.empty(2 * starts.size + 2, np.int64)
    bounds[0] = 0
    bounds[1:-1:2] = starts
    bounds[2:-1:2] = ends
    bounds[-1] = height * width
    counts = np.diff(bounds)
    if counts[-1] == 0:  # the last run reaches the last pixel
        counts = counts[:-1]
    return counts.astype(np.uint32)


def encode_masks_cropped(masks: np.ndarray, rects: np.ndarray | None = None) -> list[dict]:
    """Encode each mask from its foreground rectangle only; byte-identical to :func:`encode_masks_dense`.

    Args:
        masks: ``bool [M, H, W]``.
        rects: optional precomputed foreground rectangles ``int64 [M, 4]`` ``(y0, y1, x0, x1)``; they must
            contain every foreground pixel.
    Returns:
        ``M`` RLE dicts with ``counts`` as ``str``.
    """
    masks = _as_bool_masks(masks)
    if masks.shape[0] == 0:
        return []
    height, width = masks.shape[1:]
    if rects is None:
        rects = _foreground_rectangles(masks)
    uncompressed = [
        {"size": [height, width], "counts": _counts_in_rectangle(mask, rect)} for mask, rect in zip(masks, rects)
    ]
    return _decoded(mask_util.frPyObjects(uncompressed, height, width))


def encode_masks(masks: np.ndarray, method: Literal["auto", "cropped", "dense"] = "auto") -> list[dict]:
    """Encode ``bool [M, H, W]`` masks (image frame) as COCO compressed RLE with ``str`` counts.

    ``auto`` uses the cropped encoder unless the foreground rectangles cover more than half of ``M*H*W``
    (large masks), where the single dense ``pycocotools`` call is cheaper.
    """
    masks = _as_bool_masks(masks)
    if masks.shape[0] == 0:
        return []
    if method == "dense":
        return encode_masks_dense(masks)
    if method not in ("auto", "cropped"):
        raise ValueError(f"method must be 'auto', 'cropped' or 'dense', got {method!r}")
    rects = _foreground_rectangles(masks)
    if method == "auto":
        covered = float(((rects[:, 1] - rects[:, 0]) * (rects[:, 3] - rects[:, 2])).sum())
        if covered > _DENSE_FRACTION * masks.size:
            return encode_masks_dense(masks)
    return encode_masks_cropped(masks, rects)
