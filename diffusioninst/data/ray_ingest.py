"""Training/eval ingest through Ray Data: datasets of Parquet-schema rows, decoded and augmented per batch on
the Ray Train workers.

Driver::

    ds = build_ray_dataset(cfg, "train")                     # Parquet shards, or a COCO/LVIS folder directly
    TorchTrainer(train_fn, datasets={"train": ds}, ...)

Worker (``train_fn``)::

    for batch in iter_train_batches(ray.train.get_dataset_shard("train"), cfg, world_size, seed):
        batch = batch.to(device)                             # a diffusioninst.structures.Batch

``iter_torch_batches`` accepts any collate output; only ``TensorBatchType`` outputs (tensors, or
sequences/mappings of tensors) are moved to the device by Ray. :class:`RayTrainCollate` returns a
:class:`Batch` directly, so the loop moves it with ``Batch.to(device)``.

Augmentation is seeded per sample by ``(seed, epoch, image_id, repeat_index)`` (same rule as the local
loader), so it does not depend on which worker or thread collates a row. The row order itself comes from
Ray Data's streaming split (Parquet file order, or for a split cached in the object store its block order,
reshuffled every epoch with a reproducible seed, plus a local shuffle buffer); it is not bit-reproducible
across runs, by design of streaming execution.
"""

from __future__ import annotations

import itertools
import os
import pickle
from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data.collate_fn import ArrowBatchCollateFn

from diffusioninst.config.schema import AugmentationConfig, ExperimentConfig
from diffusioninst.data.dataset import collate
from diffusioninst.data.image_io import decode_image
from diffusioninst.data.parquet import row_to_record
from diffusioninst.data.ray_pacing import pace_scheduling_loop
from diffusioninst.data.ray_tasks import (
    class_repeat_factors,
    drop_empty_batch,
    encode_payload_batch,
    keep_ids_batch,
    repeat_rows_batch,
)
from diffusioninst.data.sampling import augmentation_seed
from diffusioninst.data.transforms import eval_image, train_sample
from diffusioninst.structures import Batch


def read_parquet_v1(paths: list[str], **kwargs):
    """``ray.data.read_parquet`` through Ray Data's V1 Parquet datasource.

    Training re-executes the read every epoch. The V2 datasource (the default from Ray 2.5x) starts a pool
    of ``FooterReader`` actors for every execution and kills it afterwards; on the 2-core box that put 4-6 s
    before the first batch of every epoch (a new Python worker process per actor), against 0.1 s with V1
    (24 shards, 600 images; the file order is still reshuffled every epoch). Ray versions without the
    switch read through V1 anyway. The flag is read when the dataset is created, so it is set only
    around this call.
    """
    import ray

    ctx = ray.data.DataContext.get_current()
    if not hasattr(ctx, "use_datasource_v2"):
        return ray.data.read_parquet(paths, **kwargs)
    previous = ctx.use_datasource_v2
    ctx.use_datasource_v2 = False
    try:
        return ray.data.read_parquet(paths, **kwargs)
    finally:
        ctx.use_datasource_v2 = previous


def files_fit_in_cache(limit_mb: float, paths: Iterable[str]) -> bool:
    """:func:`fits_in_cache` for files; a file whose size cannot be read (not a local path) never fits."""
    try:
        return fits_in_cache(limit_mb, (os.path.getsize(p) for p in paths))
    except OSError:
        return False


def fits_in_cache(limit_mb: float, sizes: Iterable[int]) -> bool:
    """Whether files of these sizes (bytes) total at most ``limit_mb`` MiB; ``limit_mb <= 0``: never."""
    limit, total = limit_mb * 2**20, 0
    if limit <= 0:
        return False
    for n in sizes:
        total += n
        if total > limit:
            return False
    return True


def build_ray_dataset(cfg: ExperimentConfig, split: str = "train"):
    """A ``ray.data.Dataset`` of Parquet-schema rows (see :mod:`diffusioninst.data.parquet`) for ``split``.

    Reads ``data.<split>.parquet`` shards when set; otherwise validates the COCO/LVIS/synthetic split on
    the driver and reads the image files in Ray tasks (fine for small data; preprocess large datasets).
    For training, ``data.filter_empty`` and ``data.repeat_factor_threshold`` are applied here, and a split
    whose files total at most ``data.ray_cache_mb`` MiB is read once, here, into Ray's object store
    (``materialize``) instead of once per epoch; its block order is reshuffled every epoch, as the file
    order of an uncached split is. The scheduling loop is paced (``data.ray_scheduling_period_ms``,
    :mod:`diffusioninst.data.ray_pacing`).
    """
    import ray

    from diffusioninst.data.loaders import ensure_dataset, load_split
    from diffusioninst.data.parquet import read_manifest, shard_paths

    cfg = ensure_dataset(cfg)
    s = getattr(cfg.data, split)
    train = split == "train"
    reshuffle = ray.data.RandomSeedConfig(cfg.solver.seed, reseed_after_execution=True)
    if s.parquet is not None:
        paths = shard_paths(s.parquet)
        cached = train and files_fit_in_cache(cfg.data.ray_cache_mb, paths)
        # file order reshuffled every epoch (streaming-friendly, unlike a block-order barrier); a cached split
        # reshuffles its blocks instead (below)
        reshuffle_files = ray.data.FileShuffleConfig(seed=cfg.solver.seed, reseed_after_execution=True)
        shuffle = reshuffle_files if train and not cached else None
        ds = read_parquet_v1(paths, shuffle=shuffle)
        if s.max_images is not None:  # the N smallest image ids, as every other reader does
            ids = pa.concat_arrays([pq.read_table(p, columns=["image_id"]).column(0).combine_chunks() for p in paths])
            keep = sorted(ids.to_pylist())[: s.max_images]
            ds = ds.map_batches(keep_ids_batch, batch_format="pyarrow", batch_size=None, fn_args=(keep,))
        manifest = read_manifest(s.parquet)
        image_count = [c["image_count"] for c in manifest["categories"]]
        num_images = manifest["counts"]["images"]
    else:
        data = load_split(cfg, split, check_files="header")
        records = data.records
        cached = train and files_fit_in_cache(cfg.data.ray_cache_mb, (r.file_name for r in records))
        chunk = 32
        payloads = [{"payload": pickle.dumps(records[i : i + chunk])} for i in range(0, len(records), chunk)]
        ds = ray.data.from_items(payloads, override_num_blocks=max(1, len(payloads)))
        if train and not cached:  # small data: reshuffle the chunk order every epoch, reproducibly
            ds = ds.randomize_block_order(seed=reshuffle)
        ds = ds.map_batches(encode_payload_batch, batch_size=1)
        image_count, num_images = data.meta.image_count, len(records)
    if train and cfg.data.filter_empty:  # deterministic: before the cache, so a cached split filters once
        ds = ds.map_batches(drop_empty_batch, batch_format="pyarrow", batch_size=None)
    if cached:  # read (and encode) once into the object store; every epoch reshuffles the blocks
        ds = ds.materialize().randomize_block_order(seed=reshuffle)
    ds = pace_scheduling_loop(ds, cfg.data.ray_scheduling_period_ms / 1e3)
    if not train:
        return ds
    if cfg.data.repeat_factor_threshold > 0:  # drawn anew every epoch: after the cache
        factors = class_repeat_factors(image_count, num_images, cfg.data.repeat_factor_threshold)
        ds = ds.map_batches(repeat_rows_batch, batch_format="pyarrow", batch_size=None, fn_args=(factors,))
    return ds


class RayTrainCollate(ArrowBatchCollateFn):
    """Decode + augment + pad a Ray Data batch (a ``pyarrow.Table`` of Parquet-schema rows) into a :class:`Batch`.

    Arrow batches, not numpy: ``iter_torch_batches`` alone (identity collate, 4-row batches) costs 0.21 ms
    of the consumer's CPU per row handing over Arrow slices against 0.31 ms formatting the list and binary
    columns as numpy object arrays; ``to_pylist`` then gives the rows.
    Thread-safe (Ray calls collates from a thread pool): each sample gets its own generator seeded by
    ``(seed, epoch, image_id, repeat_index)``. Call :meth:`set_epoch` before each epoch.
    """

    def __init__(self, aug: AugmentationConfig, size_divisibility: int = 32, seed: int = 0):
        super().__init__()
        self.aug, self.size_divisibility, self.seed, self.epoch = aug, size_divisibility, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __call__(self, batch: pa.Table) -> Batch:
        samples = []
        for row in batch.to_pylist():
            rec = row_to_record(row)
            image = decode_image(row["image"], rec.file_name)
            occurrence = int(row["repeat_index"]) if "repeat_index" in row else 0
            rng = np.random.default_rng(augmentation_seed(self.seed, self.epoch, rec.image_id, occurrence))
            samples.append(train_sample(image, rec, self.aug, rng))
        return collate(samples, self.size_divisibility)


class RayEvalCollate(ArrowBatchCollateFn):
    """Decode + test-resize + pad into a :class:`Batch` with ``targets=None``."""

    def __init__(self, aug: AugmentationConfig, size_divisibility: int = 32):
        super().__init__()
        self.aug, self.size_divisibility = aug, size_divisibility

    def __call__(self, batch: pa.Table) -> Batch:
        samples = []
        for row in batch.to_pylist():
            image = decode_image(row["image"], row["file_name"])
            meta = {"image_id": int(row["image_id"]), "orig_size": (int(row["height"]), int(row["width"]))}
            samples.append((eval_image(image, self.aug), meta))
        return collate(samples, self.size_divisibility)


def iter_train_batches(shard, cfg: ExperimentConfig, world_size: int, seed: int | None = None) -> Iterator[Batch]:
    """Infinite training batches from a Ray Train dataset shard (``ray.train.get_dataset_shard("train")``).

    Per-rank batch size ``ims_per_batch / (world_size * grad_accum_steps)``; incomplete last batches of an
    epoch are dropped; ``data.prefetch_batches`` batches are collated ahead in background threads.
    """
    from diffusioninst.data.loaders import per_rank_batch_size

    seed = cfg.solver.seed if seed is None else seed
    fn = RayTrainCollate(cfg.data.augmentation, cfg.model.size_divisibility, seed)
    batch_size = per_rank_batch_size(cfg, world_size)
    for epoch in itertools.count():
        fn.set_epoch(epoch)
        yield from shard.iter_torch_batches(
            batch_size=batch_size,
            collate_fn=fn,
            drop_last=True,
            prefetch_batches=cfg.data.prefetch_batches,
            local_shuffle_buffer_size=4 * batch_size,
            local_shuffle_seed=seed + epoch,
        )
