"""Validation of model inputs, with errors that say which image/target is wrong and what was expected."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_images", "check_targets"]


def check_images(images: Tensor, image_sizes: Tensor) -> None:
    """images: uint8/float [B, 3, Hp, Wp] RGB 0..255; image_sizes: integer [B, 2] (h, w), 1 <= h <= Hp, 1 <= w <= Wp."""
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor [B, 3, H, W], got {type(images).__name__}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise TypeError(f"images must be uint8 or floating point (RGB 0..255), got {images.dtype}")
    if images.dim() != 4:
        raise ValueError(f"images must be [B, 3, H, W], got shape {list(images.shape)}")
    if images.shape[1] != 3:
        raise ValueError(f"images must have 3 (RGB) channels in dim 1, got shape {list(images.shape)}")
    b, _, hp, wp = images.shape
    if b == 0:
        raise ValueError("images: empty batch")
    if hp == 0 or wp == 0:
        raise ValueError(f"images have zero height or width: shape {list(images.shape)}")
    if not isinstance(image_sizes, Tensor) or image_sizes.shape != (b, 2) or image_sizes.is_floating_point():
        got = list(image_sizes.shape) if isinstance(image_sizes, Tensor) else type(image_sizes).__name__
        raise ValueError(f"image_sizes must be an integer tensor [{b}, 2] of (h, w), got {got}")
    for i, (h, w) in enumerate(image_sizes.tolist()):
        if h <= 0 or w <= 0:
            raise ValueError(f"image {i} is empty: image_sizes[{i}] = ({h}, {w}); every image needs h, w >= 1")
        if h > hp or w > wp:
            raise ValueError(f"image_sizes[{i}] = ({h}, {w}) exceeds the padded tensor ({hp}, {wp})")


def check_targets(targets: list[dict[str, Tensor]], image_sizes: Tensor, num_classes: int) -> None:
    """Per image: boxes float [G, 4] (xyxy, x2 >= x1, y2 >= y1), labels int [G] in [0, K), masks [G, h', w'] with
    (h', w') >= the image size (unpadded or padded masks)."""
    if len(targets) != image_sizes.shape[0]:
        raise ValueError(f"got {len(targets)} targets for {image_sizes.shape[0]} images")
    for i, (t, (h, w)) in enumerate(zip(targets, image_sizes.tolist())):
        for key in ("boxes", "labels", "masks"):
            if key not in t:
                raise KeyError(f"targets[{i}] has no '{key}' (needs boxes, labels, masks)")
        boxes, labels, masks = t["boxes"], t["labels"], t["masks"]
        g = boxes.shape[0] if boxes.dim() == 2 else -1
        if boxes.dim() != 2 or boxes.shape[1] != 4:
            raise ValueError(f"targets[{i}]['boxes'] must be [G, 4] xyxy, got {list(boxes.shape)}")
        if not torch.isfinite(boxes).all():
            raise ValueError(f"targets[{i}]['boxes'] contains NaN or inf")
        if g and ((boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any()):
            raise ValueError(f"targets[{i}]['boxes'] must be xyxy with x2 >= x1 and y2 >= y1")
        if labels.shape != (g,) or labels.is_floating_point():
            raise ValueError(
                f"targets[{i}]['labels'] must be an integer tensor [{g}], got {labels.dtype} {list(labels.shape)}"
            )
        if g and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"targets[{i}]['labels'] must be in [0, {num_classes}), got {labels.tolist()}")
        if masks.dim() != 3 or masks.shape[0] != g:
            raise ValueError(f"targets[{i}]['masks'] must be [{g}, h, w], got {list(masks.shape)}")
        if masks.shape[1] < h or masks.shape[2] < w:
            raise ValueError(f"targets[{i}]['masks'] {list(masks.shape[1:])} smaller than the image ({h}, {w})")
