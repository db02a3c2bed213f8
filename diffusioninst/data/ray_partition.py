"""Training shards of a split cached in Ray's object store, drawn anew every epoch by each worker on its own.

A training split small enough for ``data.ray_cache_mb`` is read once into the object store
(``build_ray_dataset``: a ``MaterializedDataset``, whose blocks are Arrow tables). Ray Train's default
``streaming_split`` would then run one execution per epoch in a ``SplitCoordinator`` actor: every epoch
starts when all workers have asked for it (the faster workers wait for the slowest at each epoch end),
and the coordinator shuffles and hands out block references that never change. :class:`PartitionedTrainConfig`
(a ``ray.train.DataConfig``) instead gives each worker an :class:`EpochPartitionIterator` holding the
references to all blocks and their row counts. For each epoch every worker computes the same seeded
partition of the blocks (:func:`epoch_partition`) and reads only its own part, with no coordinator and no
barrier between epochs. Splits that are not cached (large data), and datasets other than ``train``, go
through Ray Train's ``streaming_split`` as before.

Blocks are fetched from the object store where they live (local: zero-copy; another node: Ray's object
transfer), one block ahead. Each epoch, every rank gets the same number of rows, so DDP ranks draw the same
number of batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import ray
import ray.train
from ray.data.iterator import DataIterator

TRAIN = "train"
# a cached split with fewer blocks than this per worker is cut into smaller ones (at most one block per rank
# differs between the ranks' totals, and is left out each epoch)
MIN_BLOCKS_PER_RANK = 4


def with_enough_blocks(ds, world_size: int):
    """``ds`` (materialized) cut into ``MIN_BLOCKS_PER_RANK * world_size`` blocks when it has fewer, so that
    :func:`epoch_partition` can balance the ranks; otherwise ``ds`` itself. The cut runs Ray tasks, so it
    needs free CPUs."""
    blocks = MIN_BLOCKS_PER_RANK * max(1, world_size)
    return ds.repartition(blocks).materialize() if ds.num_blocks() < blocks else ds


def epoch_partition(rows: Sequence[int], world_size: int, rng: np.random.Generator) -> list[list[tuple[int, int]]]:
    """One epoch's blocks for each rank: ``parts[r]`` lists ``(block_index, rows_taken)`` in reading order.

    Blocks are visited in a random order (``rng.permutation``); each goes to the rank holding the fewest rows
    so far (ties: the lowest rank). Every rank then keeps the first ``q`` rows of its list, ``q`` being the
    smallest rank total, so all ranks get exactly ``q`` rows (the last block kept may be cut; blocks past
    ``q`` are left out). The ranks' totals differ by at most one block, so at most
    ``(world_size - 1) * max(rows)`` rows are left out per epoch, and different ones each epoch. Every rank
    computing this with an equally seeded ``rng`` gets the same partition.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if any(n < 0 for n in rows):
        raise ValueError(f"block row counts must be >= 0, got {list(rows)}")
    assigned: list[list[int]] = [[] for _ in range(world_size)]
    totals = [0] * world_size
    for b in rng.permutation(len(rows)):
        r = min(range(world_size), key=lambda k: (totals[k], k))
        assigned[r].append(int(b))
        totals[r] += rows[b]
    quota = min(totals)
    parts = []
    for blocks in assigned:
        left, part = quota, []
        for b in blocks:
            if left == 0:
                break
            take = min(rows[b], left)
            if take:
                part.append((b, take))
            left -= take
        parts.append(part)
    return parts


class EpochPartitionIterator(DataIterator):
    """Rank ``rank``'s share of a cached split, a new random part every epoch (see the module docstring).

    :meth:`epoch_blocks` is the fast path, used by ``iter_train_batches``. The ``DataIterator`` methods
    (``iter_batches``, ``iter_torch_batches``, ...) also work: each call reads the next epoch's part
    through a Ray Data dataset built from the block references.
    """

    def __init__(self, block_refs: list, block_rows: list[int], rank: int, world_size: int, seed: int, schema, context):
        if len(block_refs) != len(block_rows):
            raise ValueError(f"{len(block_refs)} block references but {len(block_rows)} row counts")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self._refs, self._rows = list(block_refs), [int(n) for n in block_rows]
        self.rank, self.world_size, self.seed = rank, world_size, int(seed)
        self._schema, self._context = schema, context
        self._next_epoch = 0  # for the DataIterator methods, which take no epoch

    def __repr__(self) -> str:
        blocks, rows = len(self._refs), sum(self._rows)
        return f"EpochPartitionIterator(rank={self.rank}/{self.world_size}, blocks={blocks}, rows={rows})"

    def part(self, epoch: int, seed: int | None = None) -> list[tuple[int, int]]:
        """``(block_index, rows_taken)`` of this rank at ``epoch``; the partition is seeded by ``(seed, epoch)``."""
        rng = np.random.default_rng((self.seed if seed is None else int(seed), int(epoch)))
        return epoch_partition(self._rows, self.world_size, rng)[self.rank]

    def epoch_blocks(self, epoch: int, seed: int | None = None) -> Iterator[pa.Table]:
        """This rank's blocks at ``epoch`` as Arrow tables, the next one fetched while this one is used."""
        part = self.part(epoch, seed)
        refs = [self._refs[b] for b, _ in part]
        for k, (_, take) in enumerate(part):
            if k + 1 < len(refs):  # start pulling the next block to this node; returns at once
                ray.wait([refs[k + 1]], timeout=0, fetch_local=True)
            table = ray.get(refs[k])
            yield table if take == table.num_rows else table.slice(0, take)

    def _to_ref_bundle_iterator(self):
        epoch, self._next_epoch = self._next_epoch, self._next_epoch + 1
        part = self.part(epoch)
        ds = ray.data.from_arrow_refs([self._refs[b] for b, _ in part]).limit(sum(n for _, n in part))
        return ds.iterator()._to_ref_bundle_iterator()

    def stats(self) -> str:
        return f"{self!r}: blocks read straight from the object store, no execution statistics"

    def schema(self):
        return self._schema

    def get_context(self):
        return self._context


def block_rows(ds) -> list[int]:
    """Row count of each block of a materialized dataset, in block order, from the blocks' metadata (no task
    runs, nothing is fetched). ``iter_internal_ref_bundles`` is a Ray Data developer API."""
    rows = []
    for bundle in ds.iter_internal_ref_bundles():
        for meta in bundle.metadata:
            if meta.num_rows is None:
                raise RuntimeError("a cached block has no row count in its metadata")
            rows.append(int(meta.num_rows))
    return rows


class PartitionedTrainConfig(ray.train.DataConfig):
    """``ray.train.DataConfig`` that hands a cached (materialized) ``train`` dataset to the workers as
    :class:`EpochPartitionIterator` s; every other dataset, and a ``train`` dataset that is not materialized,
    is configured as by the default ``DataConfig`` (``streaming_split``).

    ``seed``: seeds each epoch's partition (``iter_train_batches`` passes its own, the same on every rank).
    """

    def __init__(self, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.seed = int(seed)

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        from ray.data.dataset import MaterializedDataset

        cached = {k: v for k, v in datasets.items() if k == TRAIN and isinstance(v, MaterializedDataset)}
        rest = {k: v for k, v in datasets.items() if k not in cached}
        output = (
            super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
            if rest
            else [{} for _ in range(world_size)]
        )
        for name, ds in cached.items():
            # build_ray_dataset already cut it for ray.num_workers, on the driver, before Train held the CPUs;
            # a cut here (another world size) needs CPUs the workers left free
            ds = with_enough_blocks(ds, world_size)
            refs = ds.to_arrow_refs()  # zero-copy: the blocks are already Arrow tables
            rows = block_rows(ds)
            if len(rows) != len(refs):
                raise RuntimeError(f"{len(refs)} Arrow blocks but row counts for {len(rows)} in {name!r}")
            if sum(rows) < world_size:
                raise ValueError(f"the {name!r} dataset has {sum(rows)} rows, fewer than the {world_size} workers")
            schema, context = ds.schema(), ds.context
            for rank in range(world_size):
                output[rank][name] = EpochPartitionIterator(refs, rows, rank, world_size, self.seed, schema, context)
        return output
