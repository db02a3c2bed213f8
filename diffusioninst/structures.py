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

    @classmethod
    def from_images(
        cls,
        images: list,
        size_divisibility: int = 32,
        orig_sizes: list | None = None,
        image_ids: list[int] | None = None,
    ) -> Batch:
        """Batch RGB uint8 images given as [H, W, 3] numpy arrays or [3, H, W] tensors (no targets)."""
        chw = [
            img if isinstance(img, Tensor) else torch.from_numpy(img).permute(2, 0, 1).contiguous() for img in images
        ]
        sizes = torch.tensor([[int(t.shape[1]), int(t.shape[2])] for t in chw], dtype=torch.int64).reshape(-1, 2)
        orig = torch.tensor([list(s) for s in orig_sizes], dtype=torch.int64) if orig_sizes is not None else sizes
        return cls(
            images=pad_images(chw, size_divisibility),
            image_sizes=sizes,
            orig_sizes=orig.reshape(-1, 2),
            image_ids=list(image_ids) if image_ids is not None else list(range(len(chw))),
        )


def pad_images(images: list[Tensor], size_divisibility: int = 32) -> Tensor:
    """Stack [C, h, w] images into [B, C, Hp, Wp], zero-padded bottom/right to a multiple of ``size_divisibility``."""
    if not images:
        raise ValueError("pad_images needs at least one image")
    d = max(int(size_divisibility), 1)
    h = -(-max(int(t.shape[1]) for t in images) // d) * d
    w = -(-max(int(t.shape[2]) for t in images) // d) * d
    out = images[0].new_zeros((len(images), int(images[0].shape[0]), h, w))
    for i, t in enumerate(images):
        out[i, :, : t.shape[1], : t.shape[2]] = t
    return out
