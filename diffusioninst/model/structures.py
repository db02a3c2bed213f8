"""Containers passed between the encoder, the sampler and post-processing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["Detections", "Encoded"]


@dataclass
class Encoded:
    """Encoder output of B images, computed once and reused by every sampling call.

    Attributes:
        features: the FPN levels the head pools from (p2..p5), each [B, d, Hp/s, Wp/s].
        mask_feat: F_mask [B, C, Hp/4, Wp/4] (stride 4 of the padded image).
        image_sizes: int64 [B, 2] (h, w) of the unpadded network-input images.
        fpn: every FPN level by name (p2..p6), for inspection.
        sink: in CPU training, the :class:`~diffusioninst.model.pooler.GradientSink` that ``features`` were
            wrapped in (before the mask branch read them), for the head's poolings; else None.
    """

    features: list[Tensor]
    mask_feat: Tensor
    image_sizes: Tensor
    fpn: dict[str, Tensor] = field(default_factory=dict)
    sink: Any = None

    def __len__(self) -> int:
        return int(self.image_sizes.shape[0])

    def select(self, i: int) -> Encoded:
        """Image ``i`` alone (views, batch size 1)."""
        return Encoded(
            features=[f[i : i + 1] for f in self.features],
            mask_feat=self.mask_feat[i : i + 1],
            image_sizes=self.image_sizes[i : i + 1],
            fpn={k: v[i : i + 1] for k, v in self.fpn.items()},
        )

    @property
    def whwh(self) -> Tensor:
        """float32 [B, 4] = (w, h, w, h) of each unpadded image."""
        h, w = self.image_sizes[:, 0], self.image_sizes[:, 1]
        return torch.stack([w, h, w, h], dim=1).to(torch.float32)


@dataclass
class Detections:
    """Detections of one image in the network-input frame, before mask rendering.

    Attributes:
        boxes: float32 [M, 4] abs xyxy (input frame, unclipped).
        scores: float32 [M] sigmoid class scores, sorted decreasing after NMS.
        labels: int64 [M] contiguous 0-based class indices.
        kernels: [M, P] dynamic mask-head parameters of each detection.
        mask_feat: [C, Hp/4, Wp/4] F_mask of the image.
        image_size: (h, w) of the unpadded input image.
        trace: per-step internals when sampling was asked to record them (tests / debugging).
        mask_head: the dynamic mask head that reads ``kernels`` (set by the sampler).
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    kernels: Tensor
    mask_feat: Tensor
    image_size: tuple[int, int]
    trace: dict | None = None
    mask_head: object | None = None

    def __len__(self) -> int:
        return int(self.boxes.shape[0])
