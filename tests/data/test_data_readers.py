"""COCO/LVIS readers against pycocotools/lvis, federated fields, repeat factors and sample streams."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from diffusioninst.data.coco import read_coco
from diffusioninst.data.lvis import fed_loss_class_weights, read_lvis
from diffusioninst.data.lvis_compat import numpy_float_alias
from diffusioninst.data.records import ImageRecord, Instance
from diffusioninst.data.sampling import epoch_indices, repeat_factors, sample_stream
from diffusioninst.data.transforms import transform_instances


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE (column-major run lengths starting with zeros), built independently."""
    flat = mask.flatten(order="F")
    counts, cur, run = [], 0, 0
    for v in flat:
        if v != cur:
            counts.append(run)
            cur, run = v, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": [int(c) for c in counts]}


def write_coco(tmp_path, h=40, w=50):
    """Two images, non-contiguous category ids, every segmentation kind, a crowd region, an empty image."""
    (tmp_path / "img").mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(tmp_path / "img" / name)
    m = np.zeros((h, w), np.uint8)
    m[10:30, 5:20] = 1
    m[15:20, 10:15] = 0  # a hole: not a simple polygon
    m2 = np.zeros((h, w), np.uint8)
    m2[2:8, 30:45] = 1
    compressed = mask_utils.encode(np.asfortranarray(m2))
    compressed["counts"] = compressed["counts"].decode()
    anns = [
        {"id": 11, "image_id": 1, "category_id": 7, "bbox": [3, 4, 20, 10], "area": 150.0, "iscrowd": 0,
         "segmentation": [[3, 4, 23, 4, 23, 14, 3, 14], [30, 20, 40, 20, 35, 30]]},
        {"id": 12, "image_id": 1, "category_id": 3, "bbox": [5, 10, 15, 20], "area": 275.0, "iscrowd": 0,
         "segmentation": _uncompressed_rle(m)},
        {"id": 13, "image_id": 1, "category_id": 90, "bbox": [30, 2, 15, 6], "area": 90.0, "iscrowd": 0,
         "segmentation": compressed},
        {"id": 14, "image_id": 1, "category_id": 3, "bbox": [0, 30, 50, 10], "area": 500.0, "iscrowd": 1,
         "segmentation": _uncompressed_rle(np.pad(np.ones((10, 50), np.uint8), ((30, 0), (0, 0))))},
    ]  # fmt: skip
    data = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "height": h, "width": w},
            {"id": 2, "file_name": "b.jpg", "height": h, "width": w},
        ],
        "annotations": anns,
        "categories": [{"id": 90, "name": "c90"}, {"id": 3, "name": "c3"}, {"id": 7, "name": "c7"}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path, tmp_path / "img"


def test_coco_reader_masks_equal_ann_to_mask(tmp_path):
    path, images = write_coco(tmp_path)
    loaded = read_coco(path, images, check_files="decode")
    coco = COCO(str(path))
    assert [r.image_id for r in loaded.records] == [1, 2]
    assert loaded.meta.category_ids == [3, 7, 90] and loaded.meta.class_names == ["c3", "c7", "c90"]
    assert loaded.meta.image_count == [1, 1, 1]
    rec = loaded.records[0]
    assert loaded.records[1].instances == []  # an empty image is a valid record
    by_id = {inst.ann_id: inst for inst in rec.instances}
    assert {k: v.label for k, v in by_id.items()} == {11: 1, 12: 0, 13: 2, 14: 0}
    assert by_id[14].iscrowd and [i.ann_id for i in rec.training_instances()] == [11, 12, 13]
    assert by_id[11].polygons is not None and by_id[12].rle is not None and by_id[13].rle is not None
    targets = transform_instances(rec.training_instances(), [], (rec.height, rec.width))
    for k, aid in enumerate([11, 12, 13]):
        np.testing.assert_array_equal(targets["masks"][k], coco.annToMask(coco.anns[aid]))
        x, y, w, h = coco.anns[aid]["bbox"]
        np.testing.assert_allclose(targets["boxes"][k], [x, y, x + w, y + h])


def test_lvis_reader_federated_fields(tmp_path):
    h, w = 32, 32
    (tmp_path / "coco" / "val2017").mkdir(parents=True)
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(tmp_path / "coco" / "val2017" / "000000000005.jpg")
    poly = [[2, 2, 20, 2, 20, 20, 2, 20]]
    data = {
        "images": [
            {"id": 5, "height": h, "width": w, "coco_url": "http://images.cocodataset.org/val2017/000000000005.jpg",
             "neg_category_ids": [2], "not_exhaustive_category_ids": [9]},
        ],
        "annotations": [{"id": 1, "image_id": 5, "category_id": 9, "bbox": [2, 2, 18, 18], "area": 324.0,
                         "segmentation": poly}],
        "categories": [
            {"id": 2, "name": "b", "synset": "b.n.01", "frequency": "r", "image_count": 4},
            {"id": 9, "name": "a", "synset": "a.n.01", "frequency": "f", "image_count": 400},
        ],
    }  # fmt: skip
    path = tmp_path / "lvis.json"
    path.write_text(json.dumps(data))
    for images in (tmp_path / "coco", tmp_path / "coco" / "val2017"):  # COCO root or the split folder
        loaded = read_lvis(path, images, check_files="header")
        rec = loaded.records[0]
        assert rec.file_name == str(tmp_path / "coco" / "val2017" / "000000000005.jpg")
        assert rec.neg_category_ids == [2] and rec.not_exhaustive_category_ids == [9]
    assert loaded.meta.kind == "lvis" and loaded.meta.frequency == ["r", "f"] and loaded.meta.image_count == [4, 400]
    torch.testing.assert_close(fed_loss_class_weights(loaded.meta, 0.5), torch.tensor([2.0, 20.0]))
    assert rec.instances[0].label == 1 and rec.instances[0].polygons is not None


def test_lvis_reader_on_synthetic_matches_lvis_api(synthetic):
    from lvis import LVIS

    loaded = read_lvis(synthetic.val_lvis_json, synthetic.val_images)
    api = LVIS(synthetic.val_lvis_json)
    for rec in loaded.records[:4]:
        targets = transform_instances(rec.training_instances(), [], (rec.height, rec.width))
        for k, inst in enumerate(rec.training_instances()):
            np.testing.assert_array_equal(targets["masks"][k], api.ann_to_mask(api.anns[inst.ann_id]))
    assert sorted(api.cats) == loaded.meta.category_ids


def test_numpy_float_alias_is_scoped(synthetic):
    from lvis import LVISEval, LVISResults

    gt = json.loads(open(synthetic.val_lvis_json).read())
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
            for a in gt["annotations"]]  # fmt: skip
    assert "float" not in np.__dict__
    with numpy_float_alias():
        ev = LVISEval(synthetic.val_lvis_json, LVISResults(synthetic.val_lvis_json, dets), "bbox")
        ev.run()
        assert np.float is float  # type: ignore[attr-defined]
    assert "float" not in np.__dict__
    assert ev.results["AP"] == pytest.approx(1.0)


def _records(label_sets):
    return [
        ImageRecord(i + 1, f"{i}.jpg", 8, 8, [Instance(0, c, c, np.zeros(4)) for c in labels])
        for i, labels in enumerate(label_sets)
    ]


def test_repeat_factors_closed_form():
    # class 0 in 9 of 10 images, class 1 in one, class 2 in two (twice in one); image 9 has no annotations
    sets = [[0], [0], [0], [0], [0], [0], [2, 0], [0, 1], [0, 2, 2], []]
    t = 0.5
    f = {0: 9 / 10, 1: 1 / 10, 2: 2 / 10}
    r = {c: max(1.0, math.sqrt(t / v)) for c, v in f.items()}
    expect = [max((r[c] for c in s), default=1.0) for s in sets]
    np.testing.assert_allclose(repeat_factors(_records(sets), t), expect)
    g = torch.Generator().manual_seed(0)
    counts = np.zeros(10)
    for _ in range(3000):
        idx = epoch_indices(np.array(expect), g)
        per = np.bincount(idx.numpy(), minlength=10)
        assert np.all((per == np.floor(expect)) | (per == np.ceil(expect)))  # stochastic rounding
        counts += per
    np.testing.assert_allclose(counts / 3000, expect, atol=0.03)


def test_sample_stream_sharded_and_seeded():
    recs = _records([[0]] * 9)
    first = list(itertools.islice(sample_stream(recs, seed=1), 18))
    assert sorted(i for i, _ in first[:9]) == list(range(9)) and sorted(i for i, _ in first[9:]) == list(range(9))
    assert first == list(itertools.islice(sample_stream(recs, seed=1), 18))
    assert first != list(itertools.islice(sample_stream(recs, seed=2), 18))
    r0 = list(itertools.islice(sample_stream(recs, 1, 0, 2), 9))
    r1 = list(itertools.islice(sample_stream(recs, 1, 1, 2), 9))
    assert r0 == first[0::2] and r1 == first[1::2]
    seeds = [s for _, s in first]
    assert len(set(seeds)) == len(seeds)  # every (epoch, image) gets its own augmentation seed
