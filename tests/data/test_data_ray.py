"""Ray Data preprocessing (validation policies, schema, idempotency, resume) and Ray Train ingest."""

from __future__ import annotations

import io
import itertools
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import make_dataset, small_experiment
from PIL import Image, ImageOps
from pycocotools.coco import COCO

from diffusioninst.data import masks as M
from diffusioninst.data.parquet import SCHEMA, read_manifest, row_to_record
from diffusioninst.data.preprocess import STAGING, preprocess, shard_fingerprint
from diffusioninst.data.validation import DatasetError

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    ray.init(num_cpus=2, logging_level="WARNING", configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def test_preprocess_policies_schema_rerun_and_resume(ray_cluster, tmp_path, monkeypatch):
    data, images = make_dataset(tmp_path)
    only_image_problem = tmp_path / "ann_ok.json"
    only_image_problem.write_text(json.dumps(data))
    data["annotations"][0]["segmentation"] = [[1, 1, 5, 5]]  # polygon_too_few_points
    data["annotations"].append({**data["annotations"][1], "id": 999, "image_id": 77})  # unknown_image_id
    (images / "rgb2.jpg").write_bytes((images / "rgb2.jpg").read_bytes()[:150])  # corrupt_image (image 6)
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    out = tmp_path / "out"

    with pytest.raises(DatasetError) as info:
        preprocess("coco", images, ann, out, shard_size=3)
    assert {i.reason for i in info.value.issues} == {"polygon_too_few_points", "unknown_image_id", "corrupt_image"}
    assert "rgb2.jpg" in str(info.value) and "annotation 999" in str(info.value)
    assert not list(out.glob("**/*.parquet")) and not (out / "manifest.json").exists()  # nothing written
    # a sound JSON with one bad image: the shards of the good images are staged in the same pass, then removed
    with pytest.raises(DatasetError) as info:
        preprocess("coco", images, only_image_problem, out, shard_size=3)
    assert [(i.reason, i.image_id) for i in info.value.issues] == [("corrupt_image", 6)]
    assert not list(out.rglob("*")) and not (out / "manifest.json").exists()  # nothing left, staging included

    logs: list[str] = []
    manifest = preprocess("coco", images, ann, out, on_bad_record="skip", shard_size=3, log=logs.append)
    assert manifest["skipped"] == {
        "annotation_of_skipped_image": 1,
        "corrupt_image": 1,
        "polygon_too_few_points": 1,
        "unknown_image_id": 1,
    }
    assert any("corrupt_image" in line for line in logs)  # skips are reported on the console too
    assert "2/2 shard(s) done" in logs  # progress, from the markers the tasks wrote
    assert manifest["counts"] == {
        "images": 5,
        "instances": 4,
        "crowd_instances": 0,
        "classes": 1,
        "reencoded_images": 4,
    }
    assert [s["rows"] for s in manifest["shards"]] == [3, 2] and not (out / STAGING).exists()

    # portable Parquet: plain pyarrow reads it with the declared schema
    table = pq.read_table(out / "part-00000.parquet")
    assert table.schema.equals(SCHEMA, check_metadata=False)
    rows = {r["image_id"]: r for f in ("part-00000.parquet", "part-00001.parquet")
            for r in pq.read_table(out / f).to_pylist()}  # fmt: skip
    assert sorted(rows) == [1, 2, 3, 4, 5]
    coco = COCO(str(ann))
    for iid, row in rows.items():
        src = (images / coco.imgs[iid]["file_name"]).read_bytes()
        ref = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(src))).convert("RGB"))
        got = np.asarray(Image.open(io.BytesIO(row["image"])))
        assert row["reencoded"] == (iid != 1) and got.shape == ref.shape
        if iid == 1:
            assert row["image"] == src  # valid RGB JPEGs keep their original bytes
        else:  # the upright RGB image re-encoded as JPEG quality 95, 4:4:4 chroma
            buf = io.BytesIO()
            Image.fromarray(ref).save(buf, format="JPEG", quality=95, subsampling=0)
            np.testing.assert_array_equal(got, np.asarray(Image.open(buf)))
        rec = row_to_record(row)
        for inst, rle in zip(rec.instances, row["masks_rle"]):
            mask = M.rle_to_mask({"size": [row["height"], row["width"]], "counts": rle})
            np.testing.assert_array_equal(mask, coco.annToMask(coco.anns[inst.ann_id]))
    gt = json.loads((out / "annotations.json").read_text())
    assert sorted(i["id"] for i in gt["images"]) == [1, 2, 3, 4, 5] and 999 not in {a["id"] for a in gt["annotations"]}

    # re-running is a no-op; no duplicated rows
    before = {p.name: p.read_bytes() for p in out.glob("part-*.parquet")}
    logs.clear()
    preprocess("coco", images, ann, out, on_bad_record="skip", shard_size=3, log=logs.append)
    assert "already up to date" in logs[0]
    assert {p.name: p.read_bytes() for p in out.glob("part-*.parquet")} == before

    # an interrupted run: killed after its pass wrote shard 0 (parquet + completion marker) and was still
    # writing shard 1, before anything was published; the next run reuses shard 0, redoes shard 1, completes
    import diffusioninst.data.preprocess as P

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(P, "_publish", interrupted)
    with pytest.raises(KeyboardInterrupt):
        preprocess("coco", images, ann, out, on_bad_record="skip", shard_size=3, force=True)
    monkeypatch.undo()
    staging = out / STAGING
    assert sorted(p.name for p in staging.iterdir()) == [
        "part-00000.done.json", "part-00000.parquet", "part-00001.done.json", "part-00001.parquet"]  # fmt: skip
    marker = json.loads((staging / "part-00000.done.json").read_text())
    assert marker["fingerprint"] == shard_fingerprint(manifest["fingerprint"], [1, 2, 3])
    (staging / "part-00001.done.json").unlink()
    (staging / "part-00001.parquet").write_bytes(b"half a shard")
    for p in out.glob("part-*.parquet"):
        p.unlink()
    (out / "manifest.json").unlink()
    logs.clear()
    resumed = preprocess("coco", images, ann, out, on_bad_record="skip", shard_size=3, log=logs.append)
    assert any("resuming: 1 of 2" in line for line in logs) and "1/1 shard(s) done" in logs
    assert resumed["shards"] == manifest["shards"] and read_manifest(out)["counts"] == manifest["counts"]
    assert resumed["skipped"] == manifest["skipped"] and resumed["source"] == manifest["source"]
    assert {p.name: p.read_bytes() for p in out.glob("part-*.parquet")} == before
    assert not staging.exists()


def _plan_ops(ds) -> list[str]:
    """Names of the logical operators behind ``ds``, output first."""
    ops, todo = [], [ds._logical_plan.dag]
    while todo:
        op = todo.pop()
        ops.append(op.name)
        todo.extend(op.input_dependencies)
    return ops


def test_parquet_split_feeds_local_and_ray_loaders(ray_cluster, tmp_path):
    """The synthetic train split preprocessed to Parquet gives the same records locally and through Ray Data."""
    from diffusioninst.data.loaders import build_train_loader, ensure_dataset, load_split
    from diffusioninst.data.ray_ingest import RayEvalCollate, RayTrainCollate, build_ray_dataset

    cfg = ensure_dataset(small_experiment(tmp_path))
    preprocess("coco", cfg.data.train.images, cfg.data.train.annotations, tmp_path / "pq", shard_size=10, log=print)
    pcfg = small_experiment(tmp_path, "data.format=parquet", f"data.train.parquet={tmp_path / 'pq'}",
                            f"data.val.parquet={tmp_path / 'pq'}")  # fmt: skip
    local, parquet = load_split(cfg, "train"), load_split(pcfg, "train")
    assert [r.image_id for r in local.records] == [r.image_id for r in parquet.records]
    for a, b in zip(local.records, parquet.records):
        assert [i.ann_id for i in a.instances] == [i.ann_id for i in b.instances]
        assert [i.label for i in a.instances] == [i.label for i in b.instances]
    batch = next(iter(build_train_loader(pcfg, 0, 1, seed=1)))
    assert len(batch) == 4 and batch.targets is not None
    collate = RayTrainCollate(pcfg.data.augmentation, 32, seed=1)
    import ray

    v2_default = getattr(ray.data.DataContext.get_current(), "use_datasource_v2", None)
    from ray.data.dataset import MaterializedDataset

    from diffusioninst.data.ray_partition import EpochPartitionIterator, PartitionedTrainConfig, block_rows

    cached = build_ray_dataset(pcfg, "train")  # the 24 images fit the default data.ray_cache_mb: read once, here
    assert isinstance(cached, MaterializedDataset) and not any("Read" in n for n in _plan_ops(cached))
    # 3 shards (10 + 10 + 4 rows), cut into at least 4 blocks per ray.num_workers; row counts from metadata
    rows = block_rows(cached)
    assert rows == [t.num_rows for t in ray.get(cached.to_arrow_refs())] and sum(rows) == 24
    assert len(rows) >= 4 * max(1, pcfg.ray.num_workers)
    # as Ray Train hands it to 2 workers (cut into 8 blocks of 3 rows): each epoch every image goes to
    # exactly one rank, a new draw every epoch
    shards = [s["train"] for s in PartitionedTrainConfig(seed=7).configure({"train": cached}, 2, None, None)]
    assert all(isinstance(s, EpochPartitionIterator) for s in shards)
    parts = [[[r["image_id"] for b in s.epoch_blocks(e) for r in b.select(["image_id"]).to_pylist()] for s in shards]
             for e in range(3)]  # fmt: skip
    for e in range(3):
        assert len(parts[e][0]) == len(parts[e][1]) == 12 and sorted(parts[e][0] + parts[e][1]) == list(range(1, 25))
    assert len({tuple(sorted(p[0])) for p in parts}) > 1
    with pytest.raises(ValueError, match="24 rows, fewer than the 30 workers"):
        PartitionedTrainConfig().configure({"train": cached}, 30, None, None)
    # the DataIterator methods read the same parts, one epoch per call
    for e in range(2):
        assert [r["image_id"] for r in shards[1].iter_rows()] == parts[e][1]
    ucfg = small_experiment(tmp_path, "data.format=parquet", f"data.train.parquet={tmp_path / 'pq'}",
                            f"data.val.parquet={tmp_path / 'pq'}", "data.ray_cache_mb=0")  # fmt: skip
    ds = build_ray_dataset(ucfg, "train")  # re-read every epoch
    seen = []
    for b in ds.iter_torch_batches(batch_size=4, collate_fn=collate):
        seen += b.image_ids
        for t, (h, w) in zip(b.targets, b.image_sizes.tolist()):
            assert t["masks"].shape[1:] == (h, w)
    assert sorted(seen) == list(range(1, 25))
    # read through the V1 Parquet datasource (V2 starts and kills footer-reader actors on every epoch's
    # execution), leaving Ray Data's global default alone
    ops = _plan_ops(ds)
    assert "ReadParquet" in ops and not any("ListFiles" in n or "V2" in n for n in ops), ops
    assert getattr(ray.data.DataContext.get_current(), "use_datasource_v2", None) == v2_default
    # same per-sample augmentation rule as the local loader: image 5 at epoch 0 is identical on both paths
    from diffusioninst.data.dataset import TrainDataset
    from diffusioninst.data.sampling import augmentation_seed

    local_ds = TrainDataset(parquet.records, pcfg.data.augmentation, 1, parquet.blobs)
    k = [r.image_id for r in parquet.records].index(5)
    img, target = local_ds[(k, augmentation_seed(1, 0, 5))]
    row5 = next(iter(ds.filter(lambda r: r["image_id"] == 5).iter_batches(batch_size=1, batch_format="pyarrow")))
    ray_batch = collate(row5)
    assert (ray_batch.images[0, :, : img.shape[1], : img.shape[2]] == img).all()
    assert (ray_batch.targets[0]["masks"] == target["masks"]).all()
    # the training iterator (whole blocks, its own shuffle buffer, collated in a background thread): every
    # image once per epoch, a new order each epoch, and the same sample for image 5 at epoch 0
    from diffusioninst.data.loaders import per_rank_batch_size
    from diffusioninst.data.ray_ingest import iter_train_batches

    assert pcfg.data.prefetch_batches > 0
    per_epoch = 24 // per_rank_batch_size(pcfg, 1)
    (one,) = PartitionedTrainConfig(seed=1).configure({"train": cached}, 1, None, None)
    assert isinstance(one["train"], EpochPartitionIterator)
    batches = list(iter_train_batches(one["train"], pcfg, world_size=1, seed=1, epochs=2))
    assert len(batches) == 2 * per_epoch
    orders = [[i for b in batches[e * per_epoch : (e + 1) * per_epoch] for i in b.image_ids] for e in (0, 1)]
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(1, 25)) and orders[0] != orders[1]
    again = iter_train_batches(one["train"], pcfg, world_size=1, seed=1, epochs=2)  # a cached split: reproducible
    assert [b.image_ids for b in again] == [b.image_ids for b in batches]
    b, j = next((b, b.image_ids.index(5)) for b in batches[:per_epoch] if 5 in b.image_ids)
    assert (b.images[j, :, : img.shape[1], : img.shape[2]] == img).all()
    assert (b.targets[j]["masks"] == target["masks"]).all()
    # max_images keeps the smallest ids; repeat-factor sampling repeats rows (t = 4: r = sqrt(4 / f) >= 2)
    rcfg = small_experiment(tmp_path, "data.format=parquet", f"data.train.parquet={tmp_path / 'pq'}",
                            f"data.val.parquet={tmp_path / 'pq'}", "data.train.max_images=6",
                            "data.repeat_factor_threshold=4.0")  # fmt: skip
    rows = build_ray_dataset(rcfg, "train").select_columns(["image_id", "repeat_index"]).take_all()
    assert {r["image_id"] for r in rows} == set(range(1, 7)) and len(rows) >= 12
    assert all(sorted(r["repeat_index"] for r in rows if r["image_id"] == i) == list(range(
        sum(r["image_id"] == i for r in rows))) for i in range(1, 7))  # fmt: skip
    # eval path: test-time resize (short side 112), no targets, original sizes kept
    ev = next(iter(build_ray_dataset(pcfg, "val").iter_torch_batches(batch_size=2, collate_fn=RayEvalCollate(
        pcfg.data.augmentation, 32))))  # fmt: skip
    assert (
        ev.targets is None and ev.image_sizes.tolist() == [[112, 149]] * 2 and ev.orig_sizes.tolist() == [[96, 128]] * 2
    )


def test_torch_trainer_ingest_two_workers(ray_cluster, tmp_path):
    """A real TorchTrainer (2 workers x 0.5 CPU, leaving CPU for Ray Data) consumes the shards as Batches."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from diffusioninst.config.loader import to_dict
    from diffusioninst.data.ray_ingest import build_ray_dataset
    from diffusioninst.data.ray_partition import PartitionedTrainConfig

    cfg = small_experiment(tmp_path, "ray.num_workers=2")
    out = tmp_path / "ranks"
    out.mkdir()

    def train_fn(config):
        import ray.train

        from diffusioninst.config import ExperimentConfig
        from diffusioninst.config.loader import build_config
        from diffusioninst.data.ray_ingest import iter_train_batches
        from diffusioninst.structures import Batch

        c = build_config(ExperimentConfig, config["cfg"])
        ctx = ray.train.get_context()
        batches = iter_train_batches(ray.train.get_dataset_shard("train"), c, ctx.get_world_size(), seed=0)
        ids = []
        for b in itertools.islice(batches, 12):  # 24 images / 2 ranks / 2 per batch = 6 per epoch: 2 epochs
            assert isinstance(b, Batch) and b.images.shape[2] % 32 == 0 and len(b) == 2
            assert all(t["masks"].shape[1:] == tuple(s) for t, s in zip(b.targets, b.image_sizes.tolist()))
            ids.append(b.image_ids)
        with open(os.path.join(config["out"], f"rank{ctx.get_world_rank()}.json"), "w") as f:
            json.dump(ids, f)

    trainer = TorchTrainer(
        train_fn,
        train_loop_config={"cfg": to_dict(cfg), "out": str(out)},
        datasets={"train": build_ray_dataset(cfg, "train")},  # cached: each worker draws its own blocks
        dataset_config=PartitionedTrainConfig(seed=0),
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="ingest", storage_path=str(tmp_path / "runs")),
    )
    trainer.fit()
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(len(r) == 12 for r in ranks)
    epochs = [[i for r in ranks for batch in r[6 * e : 6 * e + 6] for i in batch] for e in (0, 1)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(1, 25))  # each epoch: every image once, 2 ranks
    assert epochs[0] != epochs[1]


def test_ray_ingest_paces_its_scheduling_loop(ray_cluster, tmp_path, monkeypatch):
    """Ray Data calls the pacing callback on the training dataset's executions with the configured period,
    and the steps it sees end at least one period apart; the global DataContext is left alone; 0 turns it off."""
    import time

    import ray

    from diffusioninst.data.ray_ingest import build_ray_dataset
    from diffusioninst.data.ray_pacing import MIN_STEP_KEY, PacedSchedulingLoop

    starts: list[float] = []
    step_ends: list[float] = []
    run_start, run_step = PacedSchedulingLoop.before_execution_starts, PacedSchedulingLoop.on_execution_step

    def recording_start(self, executor):
        run_start(self, executor)
        starts.append(self.min_step_s)

    def recording_step(self, executor):
        run_step(self, executor)
        step_ends.append(time.perf_counter())

    monkeypatch.setattr(PacedSchedulingLoop, "before_execution_starts", recording_start)
    monkeypatch.setattr(PacedSchedulingLoop, "on_execution_step", recording_step)

    global_callbacks = list(ray.data.DataContext.get_current().custom_execution_callback_classes)
    cfg = small_experiment(tmp_path, "data.ray_scheduling_period_ms=40", "data.ray_cache_mb=0")  # re-executed
    ds = build_ray_dataset(cfg, "train")
    assert PacedSchedulingLoop in ds.context.custom_execution_callback_classes
    assert ds.context.get_config(MIN_STEP_KEY) == pytest.approx(0.04)
    assert ray.data.DataContext.get_current().custom_execution_callback_classes == global_callbacks
    assert sorted(r["image_id"] for r in ds.select_columns(["image_id"]).take_all()) == list(range(1, 25))
    assert starts == [pytest.approx(0.04)]  # this execution ran in the driver, with our period
    gaps = [b - a for a, b in zip(step_ends, step_ends[1:])]
    assert gaps and min(gaps) >= 0.04 - 1e-3, gaps

    off = build_ray_dataset(small_experiment(tmp_path, "data.ray_scheduling_period_ms=0", "data.ray_cache_mb=0"))
    assert PacedSchedulingLoop not in off.context.custom_execution_callback_classes


def test_filter_empty_runs_once_before_the_cache(ray_cluster, tmp_path):
    """data.filter_empty drops the images without instances; on a cached split the filter runs once, before
    the cache, not in every epoch's execution."""
    from diffusioninst.data.loaders import load_split
    from diffusioninst.data.ray_ingest import build_ray_dataset

    sparse = ("data.synthetic.min_instances=0", "data.synthetic.max_instances=1")
    records = load_split(small_experiment(tmp_path, *sparse)).records
    nonempty = sorted(r.image_id for r in records if r.training_instances())
    assert 0 < len(nonempty) < len(records)
    ds = build_ray_dataset(small_experiment(tmp_path, *sparse, "data.filter_empty=true"), "train")
    assert not any("drop_empty" in n for n in _plan_ops(ds)), _plan_ops(ds)  # already applied, in the cache
    for _ in range(2):
        assert sorted(r["image_id"] for r in ds.select_columns(["image_id"]).iter_rows()) == nonempty
    unc = build_ray_dataset(small_experiment(tmp_path, *sparse, "data.filter_empty=true", "data.ray_cache_mb=0"))
    assert any("drop_empty" in n for n in _plan_ops(unc))  # re-read splits filter every epoch
    assert sorted(r["image_id"] for r in unc.select_columns(["image_id"]).iter_rows()) == nonempty
