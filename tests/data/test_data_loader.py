"""Datasets, collate and the config-driven loaders on a small synthetic dataset."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from conftest import small_experiment

from diffusioninst.data.dataset import collate
from diffusioninst.data.loaders import build_eval_dataset, build_train_loader, ensure_dataset, load_split
from diffusioninst.structures import Batch


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("loader")


def test_collate_pads_to_size_divisibility():
    a = torch.full((3, 50, 70), 7, dtype=torch.uint8)
    b = torch.full((3, 64, 40), 9, dtype=torch.uint8)
    ta = {"boxes": torch.zeros(1, 4), "labels": torch.zeros(1, dtype=torch.int64),
          "masks": torch.zeros(1, 50, 70, dtype=torch.uint8), "image_id": 3, "orig_size": (100, 140)}  # fmt: skip
    tb = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
          "masks": torch.zeros(0, 64, 40, dtype=torch.uint8), "image_id": 4, "orig_size": (64, 40)}  # fmt: skip
    batch = collate([(a, ta), (b, tb)], 32)
    assert isinstance(batch, Batch) and batch.images.shape == (2, 3, 64, 96)
    assert batch.image_sizes.tolist() == [[50, 70], [64, 40]] and batch.orig_sizes.tolist() == [[100, 140], [64, 40]]
    assert batch.image_ids == [3, 4] and set(batch.targets[0]) == {"boxes", "labels", "masks"}
    assert torch.all(batch.images[0, :, :50, :70] == 7) and batch.images[0, :, 50:].sum() == 0
    assert batch.images[0, :, :, 70:].sum() == 0 and batch.images[1, :, :, 40:].sum() == 0
    inference = collate([(a, {"image_id": 3, "orig_size": (100, 140)})], 32)
    assert inference.targets is None and inference.images.shape == (1, 3, 64, 96)


def _take(loader, n):
    return list(itertools.islice(iter(loader), n))


def test_train_loader_deterministic_sharded_and_worker_independent(root):
    cfg = small_experiment(root)
    batches = _take(build_train_loader(cfg, 0, 1, seed=5), 3)
    assert all(len(b) == 4 and b.images.shape[2] % 32 == 0 for b in batches)
    for b in batches:
        for t, (h, w) in zip(b.targets, b.image_sizes.tolist()):
            assert t["masks"].shape[1:] == (h, w) and t["boxes"].shape == (len(t["labels"]), 4)
            assert torch.all(t["boxes"][:, 2:] <= torch.tensor([w, h])) and torch.all(t["labels"] < 4)
    again = _take(build_train_loader(cfg, 0, 1, seed=5), 3)
    workers = _take(build_train_loader(small_experiment(root, "data.decode_workers=1"), 0, 1, seed=5), 3)
    for x, y, z in zip(batches, again, workers):
        assert x.image_ids == y.image_ids == z.image_ids
        assert torch.equal(x.images, y.images) and torch.equal(x.images, z.images)
        assert all(torch.equal(p["masks"], q["masks"]) for p, q in zip(x.targets, z.targets))
    other = _take(build_train_loader(cfg, 0, 1, seed=6), 3)
    assert [b.image_ids for b in other] != [b.image_ids for b in batches]
    # two ranks of a 2-way run split each epoch (24 images, 2 per rank-batch) without overlap
    cfg2 = small_experiment(root, "ray.num_workers=2")
    ids = [sum((b.image_ids for b in _take(build_train_loader(cfg2, r, 2, seed=5), 6)), []) for r in (0, 1)]
    assert len(ids[0]) == len(ids[1]) == 12 and sorted(ids[0] + ids[1]) == list(range(1, 25))


def test_filter_empty_and_cache(root):
    data = load_split(small_experiment(root, "data.synthetic.min_instances=0", "data.synthetic.max_instances=1"))
    empties = [r.image_id for r in data.records if not r.training_instances()]
    assert empties  # this config produces images without instances; they are trained on by default
    sparse = ("data.synthetic.min_instances=0", "data.synthetic.max_instances=1")
    loader = build_train_loader(small_experiment(root, *sparse, "data.filter_empty=true"))
    assert loader.dataset.images.cache is not None  # 24 small images fit the cache
    kept = {r.image_id for r in loader.dataset.records}
    assert kept == {r.image_id for r in data.records} - set(empties)
    nocache = build_train_loader(small_experiment(root, "data.cache_images_mb=0"))
    assert nocache.dataset.images.cache is None


def test_eval_dataset_and_ensure_dataset(root):
    cfg = ensure_dataset(small_experiment(root))
    assert Path(cfg.data.synthetic.root).is_absolute() and Path(cfg.data.train.annotations).is_file()
    ev = build_eval_dataset(small_experiment(root))
    assert ev.kind == "coco" and ev.class_names == ["rectangle", "ellipse", "triangle", "star"]
    assert ev.category_ids == [1, 2, 3, 4] and len(ev.dataset) == 8 and ev.gt_json == cfg.data.val.annotations
    image, meta = ev.dataset[0]
    assert image.shape == (3, 112, 149) and meta["orig_size"] == (96, 128)  # short side 112: 128 * 112/96 = 149.3
    small = build_eval_dataset(small_experiment(root, "eval.max_images=3", "eval.evaluator=lvis"))
    gt = json.loads(Path(small.gt_json).read_text())
    assert small.kind == "lvis" and len(small.dataset) == 3 and len(gt["images"]) == 3
    assert {a["image_id"] for a in gt["annotations"]} <= set(small.image_ids) and "neg_category_ids" in gt["images"][0]


def test_write_subset_gt_survives_concurrent_writers(tmp_path):
    """Every rank writes the same subset GT file at once (training's final evaluation): no writer may lose
    its temporary file to another's rename, and the result is complete JSON."""
    import json
    import threading

    from diffusioninst.data.loaders import write_subset_gt

    gt = {"images": [{"id": i} for i in range(200)], "annotations": [{"id": i, "image_id": i} for i in range(200)],
          "categories": [{"id": 1}]}  # fmt: skip
    path = tmp_path / "gt" / "val_coco.json"
    errors: list[BaseException] = []

    def writer():
        try:
            for _ in range(30):
                write_subset_gt(gt, list(range(0, 200, 2)), path)
        except BaseException as e:  # collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=writer) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert len(json.loads(path.read_text())["images"]) == 100
    assert [p.name for p in path.parent.iterdir()] == ["val_coco.json"]  # no temporary file left behind
