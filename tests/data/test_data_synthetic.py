"""The synthetic generator writes exact COCO/LVIS annotations, deterministically, and caches."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from conftest import small_synthetic_config
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from diffusioninst.data.synthetic import generate, render_image


def _visible_masks_from_render(cfg, split_index, k):
    image, objects, _ = render_image(cfg, np.random.default_rng([cfg.seed, split_index, k]))
    return image, objects


def test_annotations_equal_the_painted_visible_regions(synthetic):
    """annToMask of every annotation equals the visible region the renderer painted; bbox/area from that mask."""
    cfg = small_synthetic_config()
    coco = COCO(synthetic.train_json)
    n_poly = n_rle = 0
    for k, img in enumerate(sorted(coco.dataset["images"], key=lambda i: i["id"])):
        _, objects = _visible_masks_from_render(cfg, 0, k)
        anns = coco.imgToAnns[img["id"]]
        assert len(anns) == len(objects)
        union = np.zeros((img["height"], img["width"]), np.int32)
        for ann, obj in zip(anns, objects):
            m = coco.annToMask(ann)
            assert np.array_equal(m, obj["visible"]), ann["id"]
            union += m
            rle = coco.annToRLE(ann)
            assert ann["area"] == mask_utils.area(rle) == m.sum()
            ys, xs = np.nonzero(m)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert ann["iscrowd"] == 0 and ann["category_id"] == obj["label"] + 1
            if isinstance(ann["segmentation"], list):
                n_poly += 1
            else:
                n_rle += 1
                assert isinstance(ann["segmentation"]["counts"], str)
        assert union.max() <= 1  # visible regions never overlap
    assert n_poly > 0 and n_rle > 0


def test_pixels_agree_with_masks():
    """Inside each visible mask the pixels are the instance's fill (decoded JPEG up to compression noise)."""
    cfg = small_synthetic_config()
    image, objects = _visible_masks_from_render(cfg, 0, 1)
    for obj in objects:
        m = obj["visible"].astype(bool)
        inner = m & np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1)
        if inner.sum() < 20:
            continue
        # the fill is a smooth colour ramp: std inside is far below that of the whole textured image
        assert image[inner].std(0).max() < 25


def test_lvis_json_fields(synthetic):
    lvis = json.loads(Path(synthetic.train_lvis_json).read_text())
    coco = json.loads(Path(synthetic.train_json).read_text())
    assert {c["frequency"] for c in lvis["categories"]} <= {"r", "c", "f"}
    for c in lvis["categories"]:
        imgs = {a["image_id"] for a in coco["annotations"] if a["category_id"] == c["id"]}
        assert c["image_count"] == len(imgs)
        assert c["frequency"] == ("r" if len(imgs) <= 10 else "c" if len(imgs) <= 100 else "f")
    present = {}
    for a in coco["annotations"]:
        present.setdefault(a["image_id"], set()).add(a["category_id"])
    all_ids = {c["id"] for c in lvis["categories"]}
    for img in lvis["images"]:
        assert set(img["neg_category_ids"]) == all_ids - present.get(img["id"], set())
        assert img["not_exhaustive_category_ids"] == []
        assert img["coco_url"].endswith(f"/train/{img['id']:012d}.jpg")
        assert "file_name" not in img
    val = json.loads(Path(synthetic.val_lvis_json).read_text())
    assert val["categories"] == lvis["categories"]  # LVIS val carries the train frequencies


def test_deterministic_and_cached(tmp_path, synthetic):
    cfg = small_synthetic_config()
    again = generate(cfg, tmp_path / "b")
    for split in ("train", "val"):
        assert Path(again.annotations(split)).read_bytes() == Path(synthetic.annotations(split)).read_bytes()
        for f in sorted(Path(synthetic.images(split)).iterdir())[:5]:
            assert (Path(again.images(split)) / f.name).read_bytes() == f.read_bytes()
    t = time.perf_counter()
    cached = generate(cfg, tmp_path / "b")
    assert time.perf_counter() - t < 0.1 and cached == again
    other = generate(small_synthetic_config(seed=4, num_train=2, num_val=1), tmp_path / "b")
    assert other.root != again.root  # the cache key includes the config
    assert Path(other.train_json).read_bytes() != Path(again.train_json).read_bytes()


def test_sizes_and_images(synthetic):
    cfg = small_synthetic_config()
    stats = synthetic.stats()["train"]
    assert stats["images"] == cfg.num_train and stats["instances"] > 0
    assert stats["small"] > 0 and stats["medium"] > 0
    coco = json.loads(Path(synthetic.train_json).read_text())
    for img in coco["images"][:3]:
        with Image.open(Path(synthetic.train_images) / img["file_name"]) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (img["width"], img["height"])


def test_cli(tmp_path):
    from diffusioninst.data.synthetic import main

    out = tmp_path / "cli"
    assert (
        main(
            [
                "--output",
                str(out),
                "--num-train",
                "2",
                "--num-val",
                "1",
                "--image-size",
                "64",
                "64",
                "--max-object-size",
                "40",
                "--min-object-size",
                "10",
            ]
        )
        == 0
    )
    assert len(json.loads((out / "annotations" / "instances_train.json").read_text())["images"]) == 2
