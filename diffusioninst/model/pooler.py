"""Multi-level RoIAlign (detectron2 ``ROIPooler`` with ``ROIAlignV2`` semantics) over FPN levels.

Each box is assigned to level ``floor(canonical_level + log2(sqrt(area) / canonical_box_size + 1e-8))``
clamped to the available levels, then pooled with torchvision ``roi_align(aligned=True)`` on that level.
Boxes are cast to float32 first (detectron2 ``Boxes`` does), so float64 diffusion boxes pool identically.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.ops import roi_align

__all__ = ["MultiLevelRoIAlign", "assign_levels"]


def assign_levels(
    boxes: Tensor, min_level: int, max_level: int, canonical_box_size: float, canonical_level: int
) -> Tensor:
    """boxes [R, 4] abs xyxy (float32) -> int64 [R] level index relative to ``min_level``."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    level = torch.floor(canonical_level + torch.log2(torch.sqrt(area) / canonical_box_size + 1e-8))
    return torch.clamp(level, min=min_level, max=max_level).to(torch.int64) - min_level


class MultiLevelRoIAlign:
    """Pool ``output_size`` x ``output_size`` features for boxes from a list of FPN maps.

    Args:
        strides: stride of each feature map, finest first (4, 8, 16, 32 for p2..p5).
        output_size: pooled resolution (official 7).
        sampling_ratio: RoIAlign samples per bin side (official 2).
    """

    def __init__(
        self,
        strides: list[int],
        output_size: int = 7,
        sampling_ratio: int = 2,
        canonical_box_size: float = 224.0,
        canonical_level: int = 4,
    ):
        levels = [math.log2(s) for s in strides]
        if any(abs(level - round(level)) > 1e-6 for level in levels) or any(
            round(b) - round(a) != 1 for a, b in zip(levels, levels[1:])
        ):
            raise ValueError(f"RoI pooler needs consecutive power-of-two strides, got {strides}")
        self.scales = [1.0 / s for s in strides]
        self.min_level = int(round(levels[0]))
        self.max_level = int(round(levels[-1]))
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio
        self.canonical_box_size = canonical_box_size
        self.canonical_level = canonical_level

    def __call__(self, features: list[Tensor], boxes: Tensor) -> Tensor:
        """features: per level [B, C, H_l, W_l]; boxes: [B, N, 4] abs xyxy -> [B*N, C, S, S] (image-major)."""
        b, n = boxes.shape[:2]
        flat = boxes.reshape(b * n, 4).to(torch.float32)
        index = torch.arange(b, device=flat.device, dtype=flat.dtype).repeat_interleave(n)
        rois = torch.cat([index[:, None], flat], dim=1)
        feat0 = features[0]
        out = feat0.new_zeros((b * n, feat0.shape[1], self.output_size, self.output_size))
        if len(features) == 1:
            return roi_align(feat0, rois, self.output_size, self.scales[0], self.sampling_ratio, aligned=True)
        levels = assign_levels(flat, self.min_level, self.max_level, self.canonical_box_size, self.canonical_level)
        for level, (feat, scale) in enumerate(zip(features, self.scales)):
            idx = torch.nonzero(levels == level).squeeze(1)  # pooled even when empty: keeps the level in the graph
            pooled = roi_align(
                feat, rois[idx].to(feat.dtype), self.output_size, scale, self.sampling_ratio, aligned=True
            )
            out.index_put_((idx,), pooled)
        return out
