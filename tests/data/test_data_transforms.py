"""Transforms against closed-form coordinates, PIL (detectron2's resizer) and pycocotools rasterisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from diffusioninst.config.schema import AugmentationConfig
from diffusioninst.data.masks import mask_to_rle, polygons_to_mask
from diffusioninst.data.records import ImageRecord, Instance
from diffusioninst.data.transforms import (
    Crop,
    Flip,
    Resize,
    apply_bitmasks,
    apply_boxes,
    apply_image,
    apply_polygons,
    clip_ring,
    crop_size,
    eval_ops,
    sample_train_ops,
    shortest_edge_size,
    train_sample,
    transform_instances,
)


def test_shortest_edge_size_closed_form():
    assert shortest_edge_size(480, 640, 800, 1333) == (800, 1067)  # 640 * 800/480 = 1066.67 -> int(+0.5)
    assert shortest_edge_size(640, 480, 800, 1333) == (1067, 800)
    assert shortest_edge_size(100, 1000, 800, 1333) == (133, 1333)  # long side capped: 100 * 1333/1000
    assert shortest_edge_size(427, 640, 800, 1333) == (800, 1199)  # 640 * 800/427 = 1199.06
    assert shortest_edge_size(500, 500, 600, 2**62) == (600, 600)


def test_box_ops_closed_form():
    boxes = np.array([[10.0, 20.0, 50.0, 60.0], [0.0, 0.0, 100.0, 80.0]])
    # horizontal flip of a 100 x 200 (h x w) image: x -> 200 - x
    out = apply_boxes(boxes, [Flip(True, 100, 200)], (100, 200))
    np.testing.assert_allclose(out, [[150, 20, 190, 60], [100, 0, 200, 80]])
    out = apply_boxes(boxes, [Flip(False, 100, 200)], (100, 200))
    np.testing.assert_allclose(out, [[10, 40, 50, 80], [0, 20, 100, 100]])
    # resize 100x200 -> 150x250: x * 1.25, y * 1.5
    out = apply_boxes(boxes, [Resize(100, 200, 150, 250)], (150, 250))
    np.testing.assert_allclose(out, [[12.5, 30, 62.5, 90], [0, 0, 125, 120]])
    # crop window x0=30, y0=10, 40 x 45 (w x h): shift then clip to [0, 40] x [0, 45]
    out = apply_boxes(boxes, [Crop(30, 10, 40, 45)], (45, 40))
    np.testing.assert_allclose(out, [[0, 10, 20, 45], [0, 0, 40, 45]])
    # the whole chain: flip, resize, crop, resize
    ops = [Flip(True, 100, 200), Resize(100, 200, 200, 400), Crop(100, 50, 200, 100), Resize(100, 200, 50, 100)]
    x0, y0, x1, y1 = 10.0, 20.0, 50.0, 60.0
    fx0, fx1 = 200 - x1, 200 - x0  # flip
    ex = [(fx0 * 2 - 100) / 2, (y0 * 2 - 50) / 2, (fx1 * 2 - 100) / 2, (y1 * 2 - 50) / 2]  # resize, crop, resize
    ex = np.clip(ex, 0, [100, 50, 100, 50])
    np.testing.assert_allclose(apply_boxes(boxes[:1], ops, (50, 100))[0], ex)


def test_clip_ring_closed_form():
    square = np.array([10, 10, 50, 10, 50, 50, 10, 50], np.float64)
    ring = clip_ring(square, 30, 0, 130, 100).reshape(-1, 2)
    assert sorted(map(tuple, ring.tolist())) == sorted([(30, 10), (50, 10), (50, 50), (30, 50)])
    assert len(clip_ring(square, 60, 0, 100, 100)) == 0  # fully outside
    np.testing.assert_array_equal(clip_ring(square, 0, 0, 100, 100), square)  # fully inside: unchanged
    tri = np.array([0, 0, 40, 0, 0, 40], np.float64)  # right triangle cut by x <= 10: a trapezoid of area 350
    pts = clip_ring(tri, -5, -5, 10, 100).reshape(-1, 2)
    area = 0.5 * abs(np.dot(pts[:, 0], np.roll(pts[:, 1], 1)) - np.dot(pts[:, 1], np.roll(pts[:, 0], 1)))
    assert area == pytest.approx(40 * 40 / 2 - 30 * 30 / 2)


def test_polygons_move_geometrically_then_rasterise():
    """Flip+resize of a polygon = pycocotools rasterisation of the closed-form moved vertices."""
    poly = np.array([12.3, 5.5, 40.2, 8.0, 33.3, 30.7, 9.1, 25.0])
    ops = [Flip(True, 48, 64), Resize(48, 64, 72, 80)]
    moved = apply_polygons([poly], ops)[0]
    expect = poly.copy()
    expect[0::2] = (64 - poly[0::2]) * (80 / 64)
    expect[1::2] = poly[1::2] * (72 / 48)
    np.testing.assert_allclose(moved, expect)
    ref = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([expect.tolist()], 72, 80)))
    np.testing.assert_array_equal(polygons_to_mask([moved], 72, 80), ref)


def test_bitmask_resize_matches_pil_nearest():
    """RLE masks resize nearest-neighbour exactly like PIL (detectron2 apply_segmentation)."""
    rng = np.random.default_rng(0)
    masks = (rng.random((3, 37, 53)) > 0.6).astype(np.uint8)
    for out_h, out_w in [(74, 106), (50, 61), (20, 30), (37, 53)]:
        ours = apply_bitmasks(masks, [Resize(37, 53, out_h, out_w)])
        for g in range(3):
            ref = np.asarray(Image.fromarray(masks[g]).resize((out_w, out_h), Image.NEAREST))
            np.testing.assert_array_equal(ours[g], ref)
    flipped = apply_bitmasks(masks, [Flip(True, 37, 53), Crop(5, 3, 20, 30)])
    np.testing.assert_array_equal(flipped, masks[:, 3:33, ::-1][:, :, 5:25])


def test_image_resize_backends():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    ops = [Resize(30, 40, 45, 60)]
    pil = apply_image(img, ops, "pil")
    np.testing.assert_array_equal(pil, np.asarray(Image.fromarray(img).resize((60, 45), Image.BILINEAR)))
    cv = apply_image(img, ops, "cv2")
    assert np.abs(cv.astype(int) - pil.astype(int)).max() <= 1  # both bilinear when enlarging
    np.testing.assert_array_equal(apply_image(img, [Flip(True, 30, 40)], "pil"), img[:, ::-1])


def test_crop_sizes_follow_detectron2_ranges():
    rng = np.random.default_rng(2)
    for h, w in [(500, 750), (400, 300), (700, 1000)]:
        sizes = np.array([crop_size(h, w, "absolute_range", [384, 600], rng) for _ in range(300)])
        assert sizes[:, 0].min() >= min(h, 384) and sizes[:, 0].max() <= min(h, 600)
        assert sizes[:, 1].min() >= min(w, 384) and sizes[:, 1].max() <= min(w, 600)
    assert crop_size(100, 200, "relative", [0.5, 0.25], rng) == (50, 50)
    assert crop_size(100, 200, "absolute", [150, 150], rng) == (100, 150)


def test_train_ops_recipe_and_determinism():
    aug = AugmentationConfig()
    rng = np.random.default_rng(3)
    n_crop = n_flip = 0
    for _ in range(400):
        ops = sample_train_ops(aug, 480, 640, rng)
        n_flip += isinstance(ops[0], Flip)
        resizes = [op for op in ops if isinstance(op, Resize)]
        crops = [op for op in ops if isinstance(op, Crop)]
        final = resizes[-1]
        assert min(final.out_h, final.out_w) in aug.min_size_train or max(final.out_h, final.out_w) == 1333
        assert max(final.out_h, final.out_w) <= 1333
        if crops:
            n_crop += 1
            assert min(resizes[0].out_h, resizes[0].out_w) in aug.crop_resize
            c = crops[0]
            assert 0 <= c.x0 <= resizes[0].out_w - c.w and 0 <= c.y0 <= resizes[0].out_h - c.h
    assert 150 < n_crop < 250 and 150 < n_flip < 250  # p = 0.5 each
    a = sample_train_ops(aug, 480, 640, np.random.default_rng(7))
    b = sample_train_ops(aug, 480, 640, np.random.default_rng(7))
    assert a == b
    assert eval_ops(aug, 480, 640) == [Resize(480, 640, 800, 1067)]


def _record():
    h, w = 60, 80
    square = np.array([5, 5, 30, 5, 30, 30, 5, 30], np.float64)
    blob = np.zeros((h, w), np.uint8)
    blob[35:55, 50:75] = 1
    blob[40:45, 60:65] = 0
    insts = [
        Instance(1, 1, 0, np.array([5, 5, 30, 30.0]), polygons=[square]),
        Instance(2, 2, 1, np.array([50, 35, 75, 55.0]), rle=mask_to_rle(blob)),
        Instance(
            3, 2, 1, np.array([0, 0, 80, 60.0]), polygons=[np.array([0, 0, 80, 0, 80, 60, 0, 60.0])], iscrowd=True
        ),
    ]
    return ImageRecord(7, "x.jpg", h, w, insts), blob


def test_transform_instances_and_drop_empty():
    rec, blob = _record()
    ops = [Flip(True, 60, 80), Resize(60, 80, 120, 160)]
    t = transform_instances(rec.training_instances(), ops, (60, 80))
    assert t["labels"].tolist() == [0, 1] and t["masks"].shape == (2, 120, 160)
    np.testing.assert_allclose(t["boxes"], [[(80 - 30) * 2, 10, (80 - 5) * 2, 60], [10, 70, 60, 110]])
    ref = np.asarray(Image.fromarray(np.ascontiguousarray(blob[:, ::-1])).resize((160, 120), Image.NEAREST))
    np.testing.assert_array_equal(t["masks"][1], ref)
    # a crop that misses the square removes it (empty box and mask), the blob survives
    t = transform_instances(rec.training_instances(), [Crop(40, 30, 40, 30)], (60, 80))
    assert t["labels"].tolist() == [1]
    np.testing.assert_array_equal(t["masks"][0], blob[30:60, 40:80])
    np.testing.assert_allclose(t["boxes"][0], [10, 5, 35, 25])


def test_train_sample_excludes_crowd_and_is_seeded():
    rec, _ = _record()
    image = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    aug = AugmentationConfig(min_size_train=[60, 90], max_size_train=200, crop_size=[20, 40], crop_resize=[70])
    a_img, a = train_sample(image, rec, aug, np.random.default_rng(5))
    b_img, b = train_sample(image, rec, aug, np.random.default_rng(5))
    assert torch.equal(a_img, b_img) and all(torch.equal(a[k], b[k]) for k in ("boxes", "labels", "masks"))
    assert a_img.dtype == torch.uint8 and a_img.shape[0] == 3
    assert a["masks"].shape[1:] == a_img.shape[1:] and a["boxes"].dtype == torch.float32
    assert a["image_id"] == 7 and a["orig_size"] == (60, 80)
    assert len(a["labels"]) <= 2  # the crowd instance never becomes a target
    outs = {tuple(train_sample(image, rec, aug, np.random.default_rng(s))[0].shape) for s in range(30)}
    assert len(outs) > 1
