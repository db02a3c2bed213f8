"""Training/eval ingest through Ray Data: datasets of Parquet-schema rows, decoded and augmented per batch on
the Ray Train workers.

Driver::

    ds = build_ray_dataset(cfg, "train")                     # Parquet shards, or a COCO/LVIS folder directly
    TorchTrainer(train_fn, datasets={"train": ds}, dataset_config=PartitionedTrainConfig(seed), ...)

Worker (``train_fn``)::

    for batch in iter_train_batches(ray.train.get_dataset_shard("train"), cfg, world_size, seed):
        batch = batch.to(device)                             # a diffusioninst.structures.Batch

``iter_train_batches`` takes the shard's blocks whole, batches and locally shuffles the rows itself and
collates them with :class:`RayTrainCollate`, optionally in a background thread (``data.prefetch_batches``).
The collates also work as ``iter_torch_batches(collate_fn=...)`` (evaluation uses :class:`RayEvalCollate`
that way); Ray only moves ``TensorBatchType`` outputs (tensors, or sequences/mappings of tensors) to the
device, so the loop moves a :class:`Batch` itself with ``Batch.to(device)``.

Augmentation is seeded per sample by ``(seed, epoch, image_id, repeat_index)`` (same rule as the local
loader), so it does not depend on which worker or thread collates a row. The row order of a split cached in
the object store is reproducible: each epoch's partition of its blocks among the ranks and the local shuffle
buffer are both seeded (:mod:`diffusioninst.data.ray_partition`). Otherwise it comes from Ray Data's
streaming split (Parquet file order reshuffled every epoch with a reproducible seed, plus the local shuffle
buffer) and is not bit-reproducible across runs, by design of streaming execution.
"""

from __future__ import annotations

import itertools
import os
import pickle
import queue
import threading
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
from diffusioninst.data.ray_partition import EpochPartitionIterator, with_enough_blocks
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
    (``materialize``) instead of once per epoch. Without repeat-factor sampling that cached split is returned
    as a ``MaterializedDataset`` of at least ``MIN_BLOCKS_PER_RANK * ray.num_workers`` blocks: pass
    ``dataset_config=PartitionedTrainConfig(...)`` to the ``TorchTrainer``
    (:mod:`diffusioninst.data.ray_partition`), and each worker draws its own blocks every epoch. With
    repeat-factor sampling (rows repeated anew every epoch) its block order is reshuffled every epoch and it
    goes through ``streaming_split``, as an uncached split (whose file order is reshuffled) does. Those
    re-executed datasets have their scheduling loop paced (``data.ray_scheduling_period_ms``,
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
    repeat = train and cfg.data.repeat_factor_threshold > 0
    if cached:  # read (and encode) once into the object store
        ds = ds.materialize()
        if not repeat:  # PartitionedTrainConfig draws each worker's blocks anew every epoch
            return with_enough_blocks(ds, cfg.ray.num_workers)  # cut here, before Train holds the CPUs
        ds = ds.randomize_block_order(seed=reshuffle)  # streaming_split, with the blocks reshuffled every epoch
    ds = pace_scheduling_loop(ds, cfg.data.ray_scheduling_period_ms / 1e3)
    if not train:
        return ds
    if repeat:  # drawn anew every epoch: after the cache
        factors = class_repeat_factors(image_count, num_images, cfg.data.repeat_factor_threshold)
        ds = ds.map_batches(repeat_rows_batch, batch_format="pyarrow", batch_size=None, fn_args=(factors,))
    return ds


class RayTrainCollate(ArrowBatchCollateFn):
    """Decode + augment + pad Parquet-schema rows into a :class:`Batch`.

    ``__call__`` takes a Ray Data batch as a ``pyarrow.Table`` (for ``iter_torch_batches(collate_fn=...)``);
    :meth:`collate_rows` takes rows already turned into dicts (``to_pylist``), as :func:`iter_train_batches`
    hands them over. Arrow, not numpy: ``iter_torch_batches`` alone (identity collate, 4-row batches) costs
    0.21 ms of the consumer's CPU per row handing over Arrow slices against 0.31 ms formatting the list and
    binary columns as numpy object arrays.
    Thread-safe: each sample gets its own generator seeded by ``(seed, epoch, image_id, repeat_index)``.
    Call :meth:`set_epoch` before each epoch.
    """

    def __init__(self, aug: AugmentationConfig, size_divisibility: int = 32, seed: int = 0):
        super().__init__()
        self.aug, self.size_divisibility, self.seed, self.epoch = aug, size_divisibility, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __call__(self, batch: pa.Table) -> Batch:
        return self.collate_rows(batch.to_pylist())

    def collate_rows(self, rows: list[dict]) -> Batch:
        samples = []
        for row in rows:
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


def shuffled_row_batches(
    blocks: Iterable[pa.Table], batch_size: int, buffer_rows: int, rng: np.random.Generator
) -> Iterator[list[dict]]:
    """Rows of a stream of Arrow blocks in batches of ``batch_size`` row dicts, shuffled through a local buffer.

    Rows enter the buffer block by block; while it holds at least ``max(buffer_rows, batch_size)`` rows, a batch
    is drawn from it uniformly at random without replacement (Ray Data's ``local_shuffle_buffer_size``
    rule). At the end of the stream the rest is drawn the same way and an incomplete last batch is dropped,
    so every row appears at most once and ``floor(rows / batch_size)`` batches come out. A row becomes a dict
    (``to_pylist`` of a one-row slice) only when it is drawn, so the buffer holds no copies of the blocks.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pending: list[tuple[pa.Table, int]] = []
    threshold = max(buffer_rows, batch_size)

    def draw() -> list[dict]:
        rows = []
        for _ in range(batch_size):
            j = int(rng.integers(len(pending)))
            pending[j], pending[-1] = pending[-1], pending[j]
            table, i = pending.pop()
            rows.append(table.slice(i, 1).to_pylist()[0])
        return rows

    for block in blocks:
        pending.extend((block, i) for i in range(block.num_rows))
        while len(pending) >= threshold:
            yield draw()
    while len(pending) >= batch_size:
        yield draw()


_END = object()


def prefetch_in_thread(items: Iterator, depth: int, name: str = "diffusioninst-ingest") -> Iterator:
    """Run ``items`` in a background thread, up to ``depth`` items ahead of the consumer; ``depth`` 0: inline.

    An exception raised by ``items`` is re-raised here, at the position it occurred. Closing the returned
    generator (or dropping it) stops the thread at its next hand-over; the item it is producing is discarded.
    """
    if depth <= 0:
        yield from items
        return
    handoff: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                handoff.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((_END, None))
        except BaseException as exc:  # handed to the consumer thread
            put((_END, exc))

    thread = threading.Thread(target=work, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item, exc = handoff.get()
            if item is _END:
                if exc is not None:
                    raise exc
                return
            yield item
    finally:
        stop.set()


def iter_train_batches(
    shard, cfg: ExperimentConfig, world_size: int, seed: int | None = None, epochs: int | None = None
) -> Iterator[Batch]:
    """Training batches from a Ray Train dataset shard (``ray.train.get_dataset_shard("train")``).

    Per-rank batch size ``ims_per_batch / (world_size * grad_accum_steps)``. Every epoch iterates the shard
    in whole blocks (for a cached split, an :class:`~diffusioninst.data.ray_partition.EpochPartitionIterator`,
    this rank's part of the epoch drawn with ``seed``, which must be the same on every rank; otherwise
    ``iter_batches(batch_size=None)``), batches the rows itself with a local shuffle buffer of
    4 batches (:func:`shuffled_row_batches`, seeded by ``(seed, epoch)``; incomplete last batches are
    dropped) and collates them with :class:`RayTrainCollate`. Handing whole blocks over saves Ray's per-batch
    slicing and its formatting threads: with one consumer on the 2-core box, collating inline, it cost
    0.1-1.1 ms less CPU per image than ``iter_torch_batches`` with the same collate (``docs/data.md``).
    ``data.prefetch_batches`` > 0 collates that many batches ahead in one background thread (overlapping
    the model); 0 collates inline. ``epochs``: stop after that many epochs (None: never stop).
    """
    from diffusioninst.data.loaders import per_rank_batch_size

    seed = cfg.solver.seed if seed is None else seed
    fn = RayTrainCollate(cfg.data.augmentation, cfg.model.size_divisibility, seed)
    batch_size = per_rank_batch_size(cfg, world_size)

    def batches() -> Iterator[Batch]:
        for epoch in itertools.count() if epochs is None else range(epochs):
            fn.set_epoch(epoch)
            if isinstance(shard, EpochPartitionIterator):  # a cached split: this rank's blocks, no coordinator
                blocks = shard.epoch_blocks(epoch, seed)
            else:
                blocks = shard.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1)
            rng = np.random.default_rng((seed, epoch))
            count = 0
            for rows in shuffled_row_batches(blocks, batch_size, 4 * batch_size, rng):
                count += 1
                yield fn.collate_rows(rows)
            if count == 0:  # would loop over empty epochs for ever
                raise ValueError(
                    f"epoch {epoch} of this rank's training shard gave no batch of {batch_size} images: the "
                    f"split has too few images for {world_size} worker(s) at solver.ims_per_batch="
                    f"{cfg.solver.ims_per_batch}"
                )

    yield from prefetch_in_thread(batches(), cfg.data.prefetch_batches)
