"""Plain containers passed between data, model and engine.

See docs/architecture.md for the conventions: images are RGB uint8 CHW; boxes are absolute-pixel xyxy in
the frame of the image they belong to.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Batch:
    """A collated batch of images (and, in training, their targets).

    Attributes:
        images: uint8 [B, 3, Hp, Wp], RGB, zero-padded bottom/right to a multiple of size_divisibility.
        image_sizes: int64 [B, 2], (h, w) of each unpadded network-input image.
        orig_sizes: int64 [B, 2], (h, w) of each original image (the evaluation/output frame).
        image_ids: dataset image id of each image.
        targets: per image ``{"boxes": float32 [G, 4] abs xyxy (input frame), "labels": int64 [G],
            "masks": uint8 [G, h, w] (input frame, unpadded)}``; None at inference.
    """

    images: Tensor
    image_sizes: Tensor
    orig_sizes: Tensor
    image_ids: list[int] = field(default_factory=list)
    targets: list[dict[str, Tensor]] | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        targets = None
        if self.targets is not None:
            targets = [{k: v.to(device, non_blocking=non_blocking) for k, v in t.items()} for t in self.targets]
        return Batch(
            images=self.images.to(device, non_blocking=non_blocking),
            image_sizes=self.image_sizes.to(device),
            orig_sizes=self.orig_sizes.to(device),
            image_ids=list(self.image_ids),
            targets=targets,
        )

    def __len__(self) -> int:
        return int(self.images.shape[0])
