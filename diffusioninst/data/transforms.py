"""The official augmentation recipe (DiffusionInst/DiffusionDet dataset mapper, detectron2 semantics).

Training: ``Flip(p=0.5)`` -> [with probability ``crop_prob``: ``ResizeShortestEdge(crop_resize)`` ->
``RandomCrop(crop_type, crop_size)``] -> ``ResizeShortestEdge(min_size_train, max_size_train)``.
Test: ``ResizeShortestEdge(min_size_test, max_size_test)``.

Random draws come from an explicit ``numpy.random.Generator`` in this order: crop decision, flip,
crop-resize size, crop size, crop offset, final size. A sampled transform is a list of plain ops
(:class:`Flip`, :class:`Resize`, :class:`Crop`) applied to every part of a sample:

* image: flips/crops by slicing; resize bilinear with PIL as detectron2 (``resize_backend: pil``) or cv2;
* boxes (absolute xyxy): the 4 corners go through every op, then min/max, then clipped to the output
  image (detectron2 ``transform_instance_annotations``); a box is never recomputed from its mask;
* polygon masks: vertices move geometrically (crops clip each ring to the window, as detectron2's
  shapely-based ``CropTransform.apply_polygons``) and are rasterised once at the output size with
  pycocotools -- sharper than resizing a bitmask and exactly what detectron2 does for polygons;
* RLE masks (and anything without polygons): decoded at the original size, flipped/cropped by slicing and
  resized nearest-neighbour with PIL's pixel-centre rule (detectron2 ``apply_segmentation``).

Instances whose box or mask becomes empty are dropped (detectron2 ``filter_empty_instances``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image

from diffusioninst.config.schema import AugmentationConfig
from diffusioninst.data.masks import polygons_to_mask, rles_to_masks
from diffusioninst.data.records import ImageRecord, Instance

EMPTY_BOX_THRESHOLD = 1e-5  # detectron2 Boxes.nonempty threshold used by filter_empty_instances


@dataclass(frozen=True)
class Flip:
    """Mirror an image of size (height, width): horizontal ``x -> width - x`` or vertical ``y -> height - y``."""

    horizontal: bool
    height: int
    width: int


@dataclass(frozen=True)
class Resize:
    """Resize (in_h, in_w) -> (out_h, out_w); coordinates scale by out/in."""

    in_h: int
    in_w: int
    out_h: int
    out_w: int


@dataclass(frozen=True)
class Crop:
    """Keep the window x in [x0, x0 + w), y in [y0, y0 + h) of the current image."""

    x0: int
    y0: int
    w: int
    h: int


Op = Flip | Resize | Crop


def shortest_edge_size(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    """detectron2 ``ResizeShortestEdge.get_output_shape``: scale the short side to ``short``, shrink further
    if the long side would exceed ``max_size``, then round each side with ``int(x + 0.5)``."""
    scale = short / min(h, w)
    newh, neww = (short, scale * w) if h < w else (scale * h, short)
    if max(newh, neww) > max_size:
        s = max_size / max(newh, neww)
        newh, neww = newh * s, neww * s
    return int(newh + 0.5), int(neww + 0.5)


def _draw_short(rng: np.random.Generator, sizes: Sequence[int], style: str) -> int:
    if style == "range":
        return int(rng.integers(sizes[0], sizes[-1] + 1))
    return int(sizes[int(rng.integers(len(sizes)))])


def crop_size(h: int, w: int, crop_type: str, size: Sequence[float], rng: np.random.Generator) -> tuple[int, int]:
    """detectron2 ``RandomCrop.get_crop_size`` for an (h, w) image; returns (crop_h, crop_w)."""
    if crop_type == "relative":
        return int(h * size[0] + 0.5), int(w * size[1] + 0.5)
    if crop_type == "relative_range":
        ch, cw = np.asarray(size[:2], np.float64) + rng.random(2) * (1 - np.asarray(size[:2], np.float64))
        return int(h * ch + 0.5), int(w * cw + 0.5)
    if crop_type == "absolute":
        return min(int(size[0]), h), min(int(size[1]), w)
    lo, hi = int(size[0]), int(size[1])  # absolute_range
    return int(rng.integers(min(h, lo), min(h, hi) + 1)), int(rng.integers(min(w, lo), min(w, hi) + 1))


def sample_train_ops(aug: AugmentationConfig, h: int, w: int, rng: np.random.Generator) -> list[Op]:
    """Draw one training transform for an (h, w) image (see the module docstring for the order of draws)."""
    use_crop = aug.crop_enabled and rng.random() < aug.crop_prob
    ops: list[Op] = []
    if aug.flip != "none" and rng.random() < 0.5:
        ops.append(Flip(aug.flip == "horizontal", h, w))
    if use_crop:
        nh, nw = shortest_edge_size(h, w, _draw_short(rng, aug.crop_resize, "choice"), 2**62)
        ops.append(Resize(h, w, nh, nw))
        h, w = nh, nw
        ch, cw = crop_size(h, w, aug.crop_type, aug.crop_size, rng)
        y0, x0 = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
        ops.append(Crop(x0, y0, cw, ch))
        h, w = ch, cw
    nh, nw = shortest_edge_size(
        h, w, _draw_short(rng, aug.min_size_train, aug.min_size_train_sampling), aug.max_size_train
    )
    ops.append(Resize(h, w, nh, nw))
    return ops


def eval_ops(aug: AugmentationConfig, h: int, w: int) -> list[Op]:
    nh, nw = shortest_edge_size(h, w, aug.min_size_test, aug.max_size_test)
    return [Resize(h, w, nh, nw)]


def output_size(ops: Sequence[Op], h: int, w: int) -> tuple[int, int]:
    for op in ops:
        if isinstance(op, Resize):
            h, w = op.out_h, op.out_w
        elif isinstance(op, Crop):
            h, w = op.h, op.w
    return h, w


# ----------------------------------------------------------------------------------------------
# applying ops


def apply_image(image: np.ndarray, ops: Sequence[Op], backend: str = "pil") -> np.ndarray:
    """uint8 [h, w, 3] -> uint8 [h', w', 3] (may be a view; copy before writing)."""
    for op in ops:
        if isinstance(op, Flip):
            image = image[:, ::-1] if op.horizontal else image[::-1]
        elif isinstance(op, Crop):
            image = image[op.y0 : op.y0 + op.h, op.x0 : op.x0 + op.w]
        elif (op.out_h, op.out_w) != image.shape[:2]:
            if backend == "pil":
                pil = Image.fromarray(np.ascontiguousarray(image))
                image = np.asarray(pil.resize((op.out_w, op.out_h), Image.BILINEAR))
            else:
                image = cv2.resize(image, (op.out_w, op.out_h), interpolation=cv2.INTER_LINEAR)
    return image


def apply_coords(xy: np.ndarray, ops: Sequence[Op]) -> np.ndarray:
    """float64 [N, 2] absolute (x, y) points through every op (no clipping)."""
    xy = np.array(xy, np.float64, copy=True).reshape(-1, 2)
    for op in ops:
        if isinstance(op, Flip):
            if op.horizontal:
                xy[:, 0] = op.width - xy[:, 0]
            else:
                xy[:, 1] = op.height - xy[:, 1]
        elif isinstance(op, Resize):
            xy[:, 0] *= op.out_w / op.in_w
            xy[:, 1] *= op.out_h / op.in_h
        else:
            xy -= (op.x0, op.y0)
    return xy


def apply_boxes(boxes: np.ndarray, ops: Sequence[Op], out_hw: tuple[int, int]) -> np.ndarray:
    """float64 [G, 4] abs xyxy -> transformed, clipped to the (h, w) output image. float64 [G, 4]."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    corners = boxes[:, [0, 1, 2, 1, 0, 3, 2, 3]].reshape(-1, 2)
    pts = apply_coords(corners, ops).reshape(-1, 4, 2)
    out = np.concatenate([pts.min(1), pts.max(1)], 1)
    h, w = out_hw
    return np.minimum(np.maximum(out, 0.0), [w, h, w, h])


def clip_ring(ring: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """Sutherland-Hodgman clip of a closed ring (flat float64 [2k]) to the box [x0, x1] x [y0, y1].
    Returns a flat array (empty when nothing is inside)."""
    pts = ring.reshape(-1, 2)
    for axis, bound, keep_above in ((0, x0, True), (0, x1, False), (1, y0, True), (1, y1, False)):
        if len(pts) == 0:
            break
        inside = pts[:, axis] >= bound if keep_above else pts[:, axis] <= bound
        nxt = np.roll(pts, -1, axis=0)
        nxt_inside = np.roll(inside, -1)
        out = []
        for p, q, p_in, q_in in zip(pts, nxt, inside, nxt_inside):
            if p_in:
                out.append(p)
            if p_in != q_in:
                t = (bound - p[axis]) / (q[axis] - p[axis])
                r = p + t * (q - p)
                r[axis] = bound
                out.append(r)
        pts = np.array(out, np.float64).reshape(-1, 2)
    return pts.reshape(-1)


def apply_polygons(polygons: Sequence[np.ndarray], ops: Sequence[Op]) -> list[np.ndarray]:
    """Flat polygon rings through every op; crops clip rings to the window and drop rings left with < 3
    vertices."""
    rings = [np.asarray(p, np.float64) for p in polygons]
    for op in ops:
        if isinstance(op, Crop):
            clipped = [clip_ring(r, op.x0, op.y0, op.x0 + op.w, op.y0 + op.h) for r in rings]
            rings = [r for r in clipped if len(r) >= 6]
        rings = [apply_coords(r, [op]).reshape(-1) for r in rings]
    return rings


def _resize_nearest(masks: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """uint8 [G, h, w] -> [G, out_h, out_w], nearest with PIL's pixel-centre rule (INTER_NEAREST_EXACT)."""
    out = np.empty((masks.shape[0], out_h, out_w), np.uint8)
    for g in range(masks.shape[0]):
        cv2.resize(masks[g], (out_w, out_h), out[g], interpolation=cv2.INTER_NEAREST_EXACT)
    return out


def apply_bitmasks(masks: np.ndarray, ops: Sequence[Op]) -> np.ndarray:
    """uint8 [G, h, w] bitmasks through every op. uint8 [G, h', w']."""
    for op in ops:
        if isinstance(op, Flip):
            masks = masks[:, :, ::-1] if op.horizontal else masks[:, ::-1]
        elif isinstance(op, Crop):
            masks = masks[:, op.y0 : op.y0 + op.h, op.x0 : op.x0 + op.w]
        elif (op.out_h, op.out_w) != masks.shape[1:] and masks.shape[0]:
            masks = _resize_nearest(masks, op.out_h, op.out_w)
    return np.ascontiguousarray(masks)


def transform_instances(
    instances: Sequence[Instance], ops: Sequence[Op], in_hw: tuple[int, int]
) -> dict[str, torch.Tensor]:
    """Targets of ``instances`` (original frame, size ``in_hw``) in the output frame of ``ops``.

    Returns:
        ``boxes`` float32 [G, 4] abs xyxy, ``labels`` int64 [G], ``masks`` uint8 [G, h, w]; instances whose
        box (w or h <= 1e-5) or mask became empty are removed.
    """
    h, w = output_size(ops, *in_hw)
    g = len(instances)
    masks_t = torch.empty((g, h, w), dtype=torch.uint8)
    masks = masks_t.numpy()  # every slot is fully written below
    rle_idx = [i for i, inst in enumerate(instances) if inst.polygons is None]
    for i, inst in enumerate(instances):
        if inst.polygons is not None:
            polygons_to_mask(apply_polygons(inst.polygons, ops), h, w, out=masks[i])
    if rle_idx:
        decoded = rles_to_masks([instances[i].rle for i in rle_idx], *in_hw)
        masks[rle_idx] = apply_bitmasks(decoded, ops)
    boxes = apply_boxes(np.array([inst.box_xyxy for inst in instances]).reshape(-1, 4), ops, (h, w))
    labels = np.array([inst.label for inst in instances], np.int64)
    keep = (boxes[:, 2] - boxes[:, 0] > EMPTY_BOX_THRESHOLD) & (boxes[:, 3] - boxes[:, 1] > EMPTY_BOX_THRESHOLD)
    keep &= masks.reshape(g, -1).max(1, initial=0) > 0
    if not keep.all():
        masks_t = masks_t[torch.from_numpy(keep)]
    return {
        "boxes": torch.from_numpy(boxes[keep].astype(np.float32)),
        "labels": torch.from_numpy(labels[keep]),
        "masks": masks_t,
    }


def to_chw_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 [h, w, 3] (any strides) -> contiguous uint8 tensor [3, h, w] (``cv2.split`` into the planes: several
    times faster than a strided numpy transpose)."""
    out = torch.empty((3, *image.shape[:2]), dtype=torch.uint8)
    planes = out.numpy()
    cv2.split(image, [planes[0], planes[1], planes[2]])
    return out


def train_sample(
    image: np.ndarray, record: ImageRecord, aug: AugmentationConfig, rng: np.random.Generator
) -> tuple[torch.Tensor, dict]:
    """One augmented training sample.

    Args:
        image: uint8 [H, W, 3] RGB, the original (upright) image of ``record``.
        rng: the sample's generator (see ``sampling.augmentation_seed``).

    Returns:
        image uint8 [3, h, w] and ``{"boxes": float32 [G, 4] abs xyxy (input frame), "labels": int64 [G],
        "masks": uint8 [G, h, w], "image_id": int, "orig_size": (H, W)}``; crowd instances excluded.
    """
    in_hw = image.shape[:2]
    if in_hw != (record.height, record.width):
        raise ValueError(
            f"{record.file_name}: decoded size {in_hw[0]}x{in_hw[1]} != annotated {record.height}x{record.width}"
        )
    ops = sample_train_ops(aug, *in_hw, rng)
    out: dict = transform_instances(record.training_instances(), ops, in_hw)
    out.update(image_id=record.image_id, orig_size=(record.height, record.width))
    return to_chw_tensor(apply_image(image, ops, aug.resize_backend)), out


def eval_image(image: np.ndarray, aug: AugmentationConfig) -> torch.Tensor:
    """uint8 [H, W, 3] -> uint8 [3, h, w] resized for inference (shortest edge ``min_size_test``)."""
    return to_chw_tensor(apply_image(image, eval_ops(aug, *image.shape[:2]), aug.resize_backend))
