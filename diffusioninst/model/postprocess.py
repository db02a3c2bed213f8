"""Render detections in the output frame (official ``detector_postprocess`` + ``clip_mask``).

Boxes: scaled by (W/w, H/h) (input (h, w) -> output (H, W)), clipped to the output image; detections
whose clipped box is empty are removed. Masks: ``sigmoid(mask head)`` on F_mask (stride 4 of the padded
image) -> :func:`aligned_bilinear` x4 -> crop to the input size -> bilinear (align_corners=False) resize to
the output size -> ``> threshold`` -> zeroed outside the integer-truncated output box.

Fast path (default): because the mask is zero outside its box, only the F_mask window that feeds the
box is evaluated and upsampled, per instance, with the two bilinear stages written out per axis. The
index/weight tables and the arithmetic (``addcmul(b * w1, a, w0)``) reproduce PyTorch's CPU bilinear kernel
bit for bit (checked by the tests against the reference path), so both paths give the same masks.
``reference=True`` runs the straightforward full-image pipeline.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusioninst.model.dynamic_mask_head import DynamicMaskHead
from diffusioninst.model.mask_branch import aligned_bilinear
from diffusioninst.model.structures import Detections

__all__ = ["output_boxes", "postprocess"]

_STRIDE = 4
_CHUNK_ELEMS = 1 << 23  # elements of the largest per-chunk intermediate
_BIN_RATIO = 1.25  # windows in one chunk differ by less than this factor in height and in width


def output_boxes(boxes: Tensor, input_size: tuple[int, int], output_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Scale [M, 4] input-frame xyxy boxes to the output frame and clip; returns (boxes, nonempty mask [M])."""
    (h, w), (oh, ow) = input_size, output_size
    out = boxes.clone()
    out[:, 0::2] *= ow / w
    out[:, 1::2] *= oh / h
    out[:, 0].clamp_(min=0, max=ow)
    out[:, 1].clamp_(min=0, max=oh)
    out[:, 2].clamp_(min=0, max=ow)
    out[:, 3].clamp_(min=0, max=oh)
    keep = ((out[:, 2] - out[:, 0]) > 0) & ((out[:, 3] - out[:, 1]) > 0)
    return out, keep


def _stage_a(grid: int, length: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """aligned_bilinear x4 along one axis, cropped to ``length``: F_mask indices (i0, i1) and weights (w0, w1)."""
    p = torch.clamp(torch.arange(length, device=device) - _STRIDE // 2, min=0)
    i0 = torch.div(p, _STRIDE, rounding_mode="floor")
    i1 = torch.clamp(i0 + 1, max=grid - 1)
    w1 = (p % _STRIDE).to(torch.float32) * (1.0 / _STRIDE)
    return i0, i1, 1 - w1, w1


def _stage_b(in_len: int, out_len: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Bilinear resize (align_corners=False) along one axis, PyTorch's float32 index/weight computation."""
    scale = torch.tensor(in_len, dtype=torch.float32) / torch.tensor(out_len, dtype=torch.float32)
    src = torch.clamp(scale * (torch.arange(out_len, dtype=torch.float32) + 0.5) - 0.5, min=0).to(device)
    i0 = src.to(torch.int64)
    i1 = torch.clamp(i0 + 1, max=in_len - 1)
    w1 = src - i0.to(torch.float32)
    return i0, i1, 1 - w1, w1


def _lerp_rows(x: Tensor, i0: Tensor, i1: Tensor, w0: Tensor, w1: Tensor) -> Tensor:
    """Per-instance 2-tap interpolation along dim 1 of x [M, A, B]; indices/weights [M, L] -> [M, L, B].

    Advanced indexing copies whole rows (much faster than ``gather`` on CPU); the arithmetic is PyTorch's.
    """
    inst = torch.arange(x.shape[0], device=x.device)[:, None]
    return torch.addcmul(x[inst, i1] * w1[:, :, None], x[inst, i0], w0[:, :, None])


def _lerp_cols(x: Tensor, i0: Tensor, i1: Tensor, w0: Tensor, w1: Tensor) -> Tensor:
    """Same along dim 2: x [M, A, B], indices/weights [M, L] -> [M, A, L] (via contiguous transposes)."""
    return _lerp_rows(x.transpose(1, 2).contiguous(), i0, i1, w0, w1).transpose(1, 2).contiguous()


def _span(lo: Tensor, n: int, limit: int) -> Tensor:
    """Per instance ``n`` consecutive indices from ``lo`` [M] (clamped to ``limit - 1``): [M, n]."""
    return torch.clamp(lo[:, None] + torch.arange(n, device=lo.device), max=limit - 1)


def _local_taps(table: tuple[Tensor, ...], at: Tensor, lo: Tensor, n: int) -> tuple[Tensor, ...]:
    """Interpolation taps of positions ``at`` [M, L] as indices into windows starting at ``lo`` [M] of size n."""
    i0 = (table[0][at] - lo[:, None]).clamp(0, n - 1)
    i1 = (table[1][at] - lo[:, None]).clamp(0, n - 1)
    return i0, i1, table[2][at], table[3][at]


def _similar_size_chunks(sizes: Tensor, channels: int) -> list[Tensor]:
    """Group instances whose windows have similar height and width (little padding), bounded in memory."""
    shape_bin = torch.floor(torch.log(sizes[:, :2].double()) / math.log(_BIN_RATIO)).long()
    order = torch.argsort(shape_bin[:, 0] * 4096 + shape_bin[:, 1], stable=True)
    chunks, start = [], 0
    while start < len(order):
        end = start + 1
        while end < len(order) and bool((shape_bin[order[end]] == shape_bin[order[start]]).all()):
            end += 1
        peak = sizes[order[start:end]].max(0).values.tolist()
        per = max(peak[0] * peak[1], peak[2] * peak[3], channels * peak[4] * peak[5], 1)
        step = max(1, _CHUNK_ELEMS // per)
        chunks += [order[i : min(i + step, end)] for i in range(start, end, step)]
        start = end
    return chunks


def _windowed_masks(
    masks: Tensor, which: Tensor, det: Detections, int_boxes: Tensor, in_size: tuple[int, int], thr: float, head
) -> None:
    """Render instances ``which`` into ``masks`` [M, H, W] (zeros), evaluating only the F_mask window feeding
    each box; the work is batched over chunks of similar-size windows, only the final copy loops."""
    feat = det.mask_feat
    device = feat.device
    (h, w), (oh, ow) = in_size, tuple(masks.shape[-2:])
    gy, gx = feat.shape[-2:]
    ay, ax = _stage_a(gy, h, device), _stage_a(gx, w, device)
    by, bx = _stage_b(h, oh, device), _stage_b(w, ow, device)
    x1, y1, x2, y2 = int_boxes[which].unbind(1)
    # window bounds per instance: output box -> input-size grid (A) -> F_mask grid (P)
    a_ylo, a_yhi, a_xlo, a_xhi = by[0][y1], by[1][y2 - 1], bx[0][x1], bx[1][x2 - 1]
    p_ylo, p_yhi, p_xlo, p_xhi = ay[0][a_ylo], ay[1][a_yhi], ax[0][a_xlo], ax[1][a_xhi]
    sizes = torch.stack(
        [y2 - y1, x2 - x1, a_yhi - a_ylo + 1, a_xhi - a_xlo + 1, p_yhi - p_ylo + 1, p_xhi - p_xlo + 1], 1
    )
    for sel in _similar_size_chunks(sizes, head.hidden_channels):
        ny, nx, nay, nax, npy, npx = sizes[sel].max(0).values.tolist()
        rows, cols = _span(p_ylo[sel], npy, gy), _span(p_xlo[sel], npx, gx)
        window = feat[:, rows[:, :, None], cols[:, None, :]].permute(1, 0, 2, 3)  # [Mc, C, npy, npx]
        t = head.per_instance(window, det.kernels[which[sel]]).sigmoid()
        # stage A (aligned x4 to the input grid), width then height
        t = _lerp_cols(t, *_local_taps(ax, _span(a_xlo[sel], nax, w), p_xlo[sel], npx))
        t = _lerp_rows(t, *_local_taps(ay, _span(a_ylo[sel], nay, h), p_ylo[sel], npy))
        # stage B (resize to the output size), width then height; equal sizes make it exactly the identity
        if ow != w:
            t = _lerp_cols(t, *_local_taps(bx, _span(x1[sel], nx, ow), a_xlo[sel], nax))
        if oh != h:
            t = _lerp_rows(t, *_local_taps(by, _span(y1[sel], ny, oh), a_ylo[sel], nay))
        t = t > thr
        for j, k in enumerate(sel.tolist()):
            ya, yb, xa, xb = int(y1[k]), int(y2[k]), int(x1[k]), int(x2[k])
            masks[int(which[k]), ya:yb, xa:xb] = t[j, : yb - ya, : xb - xa]


def _full_masks(
    masks: Tensor, which: Tensor, det: Detections, int_boxes: Tensor, in_size: tuple[int, int], thr: float, head
) -> None:
    """Render instances ``which`` into ``masks`` [M, H, W] with the straightforward whole-image pipeline
    (official order of operations), chunked over instances."""
    (h, w), (oh, ow) = in_size, tuple(masks.shape[-2:])
    device = det.mask_feat.device
    chunk = max(1, _CHUNK_ELEMS // max(oh * ow, 1))
    rows = torch.arange(oh, device=device)[None, :, None]
    cols = torch.arange(ow, device=device)[None, None, :]
    for s in range(0, len(which), chunk):
        part = which[s : s + chunk]
        ker = det.kernels[part]
        feat = det.mask_feat[None].expand(ker.shape[0], *det.mask_feat.shape)
        probs = head.per_instance(feat, ker).sigmoid()[:, None]
        up = aligned_bilinear(probs, _STRIDE)[:, :, :h, :w]
        inside = F.interpolate(up, size=(oh, ow), mode="bilinear", align_corners=False)[:, 0] > thr
        x1, y1, x2, y2 = (v[:, None, None] for v in int_boxes[part].unbind(1))
        masks[part] = inside & (rows >= y1) & (rows < y2) & (cols >= x1) & (cols < x2)


@torch.no_grad()
def postprocess(
    det: Detections,
    input_size: tuple[int, int] | None = None,
    output_size: tuple[int, int] | None = None,
    mask_threshold: float = 0.5,
    mask_head: DynamicMaskHead | None = None,
    reference: bool = False,
) -> dict[str, Tensor]:
    """Detections (input frame) -> output frame.

    Args:
        det: one image's :class:`Detections`.
        input_size: (h, w) of the unpadded network input (default ``det.image_size``).
        output_size: (H, W) to render at (default: the input size).
        mask_threshold: probability threshold (strict ``>``).
        mask_head: the dynamic mask head (default: ``det.mask_head``, else the official 8 -> 8 -> 8 -> 1 sizes).
        reference: use the straightforward full-image pipeline instead of the windowed one.
    Returns:
        ``boxes`` float32 [M, 4] abs xyxy (output frame, clipped), ``scores`` [M], ``labels`` int64 [M],
        ``masks`` bool [M, H, W].
    """
    input_size = tuple(int(v) for v in (input_size or det.image_size))
    output_size = tuple(int(v) for v in (output_size or input_size))
    if min(input_size) <= 0 or min(output_size) <= 0:
        raise ValueError(f"postprocess: sizes must be positive, got input {input_size}, output {output_size}")
    head = mask_head or det.mask_head or DynamicMaskHead(in_channels=det.mask_feat.shape[0])
    boxes, keep = output_boxes(det.boxes, input_size, output_size)
    boxes = boxes[keep]
    kept = Detections(
        boxes=boxes,
        scores=det.scores[keep],
        labels=det.labels[keep],
        kernels=det.kernels[keep],
        mask_feat=det.mask_feat,
        image_size=det.image_size,
    )
    int_boxes = boxes.long()
    masks = torch.zeros((len(boxes), *output_size), dtype=torch.bool, device=boxes.device)
    area = (int_boxes[:, 2] - int_boxes[:, 0]).clamp(min=0) * (int_boxes[:, 3] - int_boxes[:, 1]).clamp(min=0)
    render = _full_masks if reference else _windowed_masks
    render(masks, torch.nonzero(area > 0).squeeze(1), kept, int_boxes, input_size, mask_threshold, head)
    return {"boxes": boxes, "scores": kept.scores, "labels": kept.labels, "masks": masks}
