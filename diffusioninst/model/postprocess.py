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

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusioninst.model.dynamic_mask_head import DynamicMaskHead
from diffusioninst.model.mask_branch import aligned_bilinear
from diffusioninst.model.structures import Detections

__all__ = ["output_boxes", "postprocess"]

_STRIDE = 4
_CHUNK_ELEMS = 1 << 23  # elements of the largest per-chunk intermediate


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


def _lerp_gather(x: Tensor, dim: int, i0: Tensor, i1: Tensor, w0: Tensor, w1: Tensor) -> Tensor:
    """Per-instance 2-tap interpolation along ``dim`` (1 or 2) of x [M, A, B]; indices/weights [M, L]."""
    if dim == 1:
        shape = (x.shape[0], i0.shape[1], x.shape[2])
        a = torch.gather(x, 1, i0[:, :, None].expand(shape))
        b = torch.gather(x, 1, i1[:, :, None].expand(shape))
        return torch.addcmul(b * w1[:, :, None], a, w0[:, :, None])
    shape = (x.shape[0], x.shape[1], i0.shape[1])
    a = torch.gather(x, 2, i0[:, None, :].expand(shape))
    b = torch.gather(x, 2, i1[:, None, :].expand(shape))
    return torch.addcmul(b * w1[:, None, :], a, w0[:, None, :])


def _windowed_masks(
    det: Detections, int_boxes: Tensor, in_size: tuple[int, int], out_size: tuple[int, int], thr: float, head
) -> Tensor:
    feat, kernels = det.mask_feat, det.kernels
    device = feat.device
    m = int_boxes.shape[0]
    (h, w), (oh, ow) = in_size, out_size
    masks = torch.zeros((m, oh, ow), dtype=torch.bool, device=device)
    gy, gx = feat.shape[-2:]
    ay = _stage_a(gy, h, device)
    ax = _stage_a(gx, w, device)
    by = _stage_b(h, oh, device)
    bx = _stage_b(w, ow, device)
    x1, y1, x2, y2 = int_boxes.unbind(1)
    valid = (x2 > x1) & (y2 > y1)
    idx = torch.nonzero(valid).squeeze(1)
    if idx.numel() == 0:
        return masks
    x1, y1, x2, y2 = x1[idx], y1[idx], x2[idx], y2[idx]
    # window bounds on each grid, per instance
    a_ylo, a_yhi = by[0][y1], by[1][y2 - 1]
    a_xlo, a_xhi = bx[0][x1], bx[1][x2 - 1]
    p_ylo, p_yhi = ay[0][a_ylo], ay[1][a_yhi]
    p_xlo, p_xhi = ax[0][a_xlo], ax[1][a_xhi]
    sizes = torch.stack([y2 - y1, x2 - x1, a_yhi - a_ylo + 1, a_xhi - a_xlo + 1, p_yhi - p_ylo + 1, p_xhi - p_xlo + 1], 1)
    order = torch.argsort((sizes[:, 0] * sizes[:, 1]).cpu(), descending=True).to(device)
    start = 0
    while start < len(order):
        # greedy chunk: as many instances as fit the element budget at the chunk's largest window
        biggest = sizes[order[start]].tolist()
        per = max(biggest[0] * biggest[1], biggest[2] * biggest[3], head.hidden_channels * biggest[4] * biggest[5], 1)
        count = max(1, _CHUNK_ELEMS // per)
        sel = order[start : start + count]
        start += count
        ny, nx, nay, nax, npy, npx = sizes[sel].max(0).values.tolist()
        ar = lambda n: torch.arange(n, device=device)  # noqa: E731
        rows = torch.clamp(p_ylo[sel, None] + ar(npy), max=gy - 1)
        cols = torch.clamp(p_xlo[sel, None] + ar(npx), max=gx - 1)
        window = feat[:, rows[:, :, None], cols[:, None, :]].permute(1, 0, 2, 3)  # [Mc, C, npy, npx]
        probs = head.per_instance(window, kernels[idx[sel]]).sigmoid()
        # stage A (aligned x4), width then height, on A-grid windows
        a_cols = torch.clamp(a_xlo[sel, None] + ar(nax), max=w - 1)
        i0, i1 = (ax[0][a_cols] - p_xlo[sel, None]).clamp(0, npx - 1), (ax[1][a_cols] - p_xlo[sel, None]).clamp(0, npx - 1)
        t = _lerp_gather(probs, 2, i0, i1, ax[2][a_cols], ax[3][a_cols])
        a_rows = torch.clamp(a_ylo[sel, None] + ar(nay), max=h - 1)
        i0, i1 = (ay[0][a_rows] - p_ylo[sel, None]).clamp(0, npy - 1), (ay[1][a_rows] - p_ylo[sel, None]).clamp(0, npy - 1)
        t = _lerp_gather(t, 1, i0, i1, ay[2][a_rows], ay[3][a_rows])
        # stage B (resize to the output size), width then height
        o_cols = torch.clamp(x1[sel, None] + ar(nx), max=ow - 1)
        i0, i1 = (bx[0][o_cols] - a_xlo[sel, None]).clamp(0, nax - 1), (bx[1][o_cols] - a_xlo[sel, None]).clamp(0, nax - 1)
        t = _lerp_gather(t, 2, i0, i1, bx[2][o_cols], bx[3][o_cols])
        o_rows = torch.clamp(y1[sel, None] + ar(ny), max=oh - 1)
        i0, i1 = (by[0][o_rows] - a_ylo[sel, None]).clamp(0, nay - 1), (by[1][o_rows] - a_ylo[sel, None]).clamp(0, nay - 1)
        t = _lerp_gather(t, 1, i0, i1, by[2][o_rows], by[3][o_rows]) > thr
        for j, (k, ya, yb, xa, xb) in enumerate(zip(idx[sel].tolist(), y1[sel].tolist(), y2[sel].tolist(), x1[sel].tolist(), x2[sel].tolist())):
            masks[k, ya:yb, xa:xb] = t[j, : yb - ya, : xb - xa]
    return masks


def _reference_masks(
    det: Detections, int_boxes: Tensor, in_size: tuple[int, int], out_size: tuple[int, int], thr: float, head
) -> Tensor:
    (h, w), (oh, ow) = in_size, out_size
    m = int_boxes.shape[0]
    masks = torch.zeros((m, oh, ow), dtype=torch.bool, device=det.mask_feat.device)
    chunk = max(1, _CHUNK_ELEMS // max(oh * ow, 1))
    for s in range(0, m, chunk):
        ker = det.kernels[s : s + chunk]
        feat = det.mask_feat[None].expand(ker.shape[0], *det.mask_feat.shape)
        probs = head.per_instance(feat, ker).sigmoid()[:, None]
        up = aligned_bilinear(probs, _STRIDE)[:, :, :h, :w]
        masks[s : s + chunk] = F.interpolate(up, size=(oh, ow), mode="bilinear", align_corners=False)[:, 0] > thr
    keep = torch.zeros_like(masks)
    for k, (x1, y1, x2, y2) in enumerate(int_boxes.tolist()):
        keep[k, y1:y2, x1:x2] = True
    return masks & keep


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
        mask_head: the dynamic mask head (default: the official 8 -> 8 -> 8 -> 1 sizes inferred from F_mask).
        reference: use the straightforward full-image pipeline instead of the windowed one.
    Returns:
        ``boxes`` float32 [M, 4] abs xyxy (output frame, clipped), ``scores`` [M], ``labels`` int64 [M],
        ``masks`` bool [M, H, W].
    """
    input_size = tuple(int(v) for v in (input_size or det.image_size))
    output_size = tuple(int(v) for v in (output_size or input_size))
    if min(input_size) <= 0 or min(output_size) <= 0:
        raise ValueError(f"postprocess: sizes must be positive, got input {input_size}, output {output_size}")
    head = mask_head or DynamicMaskHead(in_channels=det.mask_feat.shape[0])
    boxes, keep = output_boxes(det.boxes, input_size, output_size)
    boxes = boxes[keep]
    kept = Detections(
        boxes=boxes, scores=det.scores[keep], labels=det.labels[keep], kernels=det.kernels[keep],
        mask_feat=det.mask_feat, image_size=det.image_size,
    )
    int_boxes = boxes.long()
    render = _reference_masks if reference else _windowed_masks
    masks = render(kept, int_boxes, input_size, output_size, mask_threshold, head)
    return {"boxes": boxes, "scores": kept.scores, "labels": kept.labels, "masks": masks}
