"""Box math used by the head, the diffusion process, the matcher, the losses and post-processing.

Conventions: ``xyxy`` = (x1, y1, x2, y2), ``cxcywh`` = (center x, center y, width, height). "abs" = pixels
of the unpadded network-input image, "norm" = divided by (w, h, w, h) of that image, "signal" = the
diffusion space ``(cxcywh_norm * 2 - 1) * scale``. Every function works on any leading shape ``[..., 4]``
and keeps the input dtype (the official code mixes float32 and float64; we keep its promotion rules).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou, generalized_box_iou

__all__ = [
    "apply_deltas",
    "box_iou",
    "cxcywh_to_xyxy",
    "generalized_box_iou",
    "paired_generalized_box_iou",
    "signal_to_xyxy_abs",
    "xyxy_abs_to_signal",
    "xyxy_to_cxcywh",
]


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """[..., 4] cxcywh -> [..., 4] xyxy (same units)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """[..., 4] xyxy -> [..., 4] cxcywh (same units)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)


def signal_to_xyxy_abs(signal: Tensor, whwh: Tensor, scale: float) -> Tensor:
    """Diffusion signal -> absolute xyxy boxes.

    Args:
        signal: [B, N, 4] signal-space cxcywh (any real values; clamped to [-scale, scale] first).
        whwh: [B, 4] (w, h, w, h) of each unpadded image.
        scale: signal scale (``model.diffusion.signal_scale``).
    Returns:
        [B, N, 4] absolute xyxy; dtype follows torch promotion of ``signal`` and ``whwh``.
    """
    x = torch.clamp(signal, min=-scale, max=scale)
    x = ((x / scale) + 1) / 2
    return cxcywh_to_xyxy(x) * whwh[:, None, :]


def xyxy_abs_to_signal(boxes: Tensor, whwh: Tensor, scale: float) -> Tensor:
    """Absolute xyxy boxes [B, N, 4] -> signal-space cxcywh [B, N, 4], clamped to [-scale, scale]."""
    x = xyxy_to_cxcywh(boxes / whwh[:, None, :])
    x = (x * 2 - 1.0) * scale
    return torch.clamp(x, min=-scale, max=scale)


def apply_deltas(deltas: Tensor, boxes: Tensor, weights: tuple[float, ...], scale_clamp: float) -> Tensor:
    """Decode Faster R-CNN box deltas.

    Args:
        deltas: [R, 4] (dx, dy, dw, dh), scaled by ``weights`` = (wx, wy, ww, wh).
        boxes: [R, 4] absolute xyxy reference boxes; cast to ``deltas.dtype`` first (as official).
        scale_clamp: upper clamp of dw/dh before ``exp``.
    Returns:
        [R, 4] absolute xyxy predicted boxes in ``deltas.dtype``.
    """
    boxes = boxes.to(deltas.dtype)
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx = deltas[:, 0] / wx
    dy = deltas[:, 1] / wy
    dw = torch.clamp(deltas[:, 2] / ww, max=scale_clamp)
    dh = torch.clamp(deltas[:, 3] / wh, max=scale_clamp)
    pred_ctr_x = dx * widths + ctr_x
    pred_ctr_y = dy * heights + ctr_y
    pred_w = torch.exp(dw) * widths
    pred_h = torch.exp(dh) * heights
    return torch.stack(
        [pred_ctr_x - 0.5 * pred_w, pred_ctr_y - 0.5 * pred_h, pred_ctr_x + 0.5 * pred_w, pred_ctr_y + 0.5 * pred_h],
        dim=-1,
    )


def paired_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """GIoU of matched pairs: [M, 4] xyxy x [M, 4] xyxy -> [M] (the diagonal of ``generalized_box_iou``)."""
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    lt = torch.max(boxes1[:, :2], boxes2[:, :2])
    rb = torch.min(boxes1[:, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = area1 + area2 - inter
    iou = inter / union
    lt_c = torch.min(boxes1[:, :2], boxes2[:, :2])
    rb_c = torch.max(boxes1[:, 2:], boxes2[:, 2:])
    wh_c = (rb_c - lt_c).clamp(min=0)
    area_c = wh_c[:, 0] * wh_c[:, 1]
    return iou - (area_c - union) / area_c
