"""The Ray ingest's own batching: the local shuffle buffer over whole blocks and the background prefetcher.

Pure functions over pyarrow tables and iterators; no Ray cluster.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pyarrow as pa
import pytest

from diffusioninst.data.ray_ingest import prefetch_in_thread, shuffled_row_batches


def _blocks(sizes: list[int]) -> list[pa.Table]:
    out, start = [], 0
    for n in sizes:
        out.append(pa.table({"id": list(range(start, start + n)), "name": [f"r{i}" for i in range(start, start + n)]}))
        start += n
    return out


def _ids(batches) -> list[list[int]]:
    return [[row["id"] for row in batch] for batch in batches]


def test_shuffled_row_batches_draw_each_row_at_most_once_and_drop_the_tail():
    sizes = [7, 0, 5, 13]  # 25 rows, an empty block included
    batches = list(shuffled_row_batches(_blocks(sizes), 4, 8, np.random.default_rng(0)))
    assert all(len(b) == 4 for b in batches) and len(batches) == 25 // 4
    flat = [i for b in _ids(batches) for i in b]
    assert len(set(flat)) == 24 and set(flat) <= set(range(25))
    assert all(row["name"] == f"r{row['id']}" for b in batches for row in b)  # whole rows, columns aligned
    assert flat != sorted(flat)


def test_shuffled_row_batches_are_seeded_and_fill_the_buffer_before_drawing():
    sizes, batch, buffer = [5, 6, 4, 7, 8], 3, 6
    runs = [_ids(shuffled_row_batches(_blocks(sizes), batch, buffer, np.random.default_rng(s))) for s in (1, 1, 2)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    # after R rows have been read, batches are drawn while at least 6 remain: floor((R - 6) / 3) + 1 of them
    drawn, seen = [], []

    def blocks():
        for block in _blocks(sizes):
            seen.append(len(drawn))
            yield block

    for ids in shuffled_row_batches(blocks(), batch, buffer, np.random.default_rng(1)):
        drawn.append(ids)
        assert max(r["id"] for r in ids) < sum(sizes[: len(seen)])  # only rows already read
    read = np.cumsum(sizes)[:-1]
    assert seen == [0] + [max(0, (r - buffer) // batch + 1) for r in read]
    assert len(drawn) == sum(sizes) // batch


def test_shuffled_row_batches_draw_uniformly_from_the_buffer():
    """One block of 8 rows, batches of 1: the first row drawn is uniform over the 8 (chi-square, 7 d.o.f.)."""
    n = 4000
    first = [next(shuffled_row_batches(_blocks([8]), 1, 8, np.random.default_rng(s)))[0]["id"] for s in range(n)]
    counts = np.bincount(first, minlength=8)
    chi2 = float(((counts - n / 8) ** 2 / (n / 8)).sum())
    assert chi2 < 24.3  # the 0.999 quantile of chi-square with 7 degrees of freedom


def test_shuffled_row_batches_rejects_a_zero_batch():
    with pytest.raises(ValueError, match="batch_size"):
        next(shuffled_row_batches(_blocks([4]), 0, 4, np.random.default_rng(0)))


def test_prefetch_in_thread_keeps_order_and_runs_ahead_in_one_other_thread():
    producers: set[int] = set()
    produced = []

    def items():
        for i in range(20):
            producers.add(threading.get_ident())
            produced.append(i)
            yield i

    assert list(prefetch_in_thread(items(), 0)) == list(range(20)) and producers == {threading.get_ident()}
    producers.clear()
    produced.clear()
    it = prefetch_in_thread(items(), 2)
    assert next(it) == 0
    time.sleep(0.3)
    # consumed 1; the queue holds at most 2; the producer may hold 1 more while it waits to hand it over
    assert 3 <= len(produced) <= 4, produced
    assert list(it) == list(range(1, 20))
    assert len(producers) == 1 and threading.get_ident() not in producers


def test_prefetch_in_thread_reraises_the_producers_error_in_place():
    def items():
        yield 1
        yield 2
        raise KeyError("bad row 17")

    it = prefetch_in_thread(items(), 3)
    assert [next(it), next(it)] == [1, 2]
    with pytest.raises(KeyError, match="bad row 17"):
        next(it)


def test_closing_the_prefetcher_stops_its_thread():
    produced = []

    def items():
        for i in range(10**9):
            produced.append(i)
            yield i

    it = prefetch_in_thread(items(), 2, name="prefetch-close-test")
    assert next(it) == 0
    it.close()
    deadline = time.monotonic() + 5
    while any(t.name == "prefetch-close-test" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "prefetch-close-test" for t in threading.enumerate())
    assert len(produced) <= 5


class _ShardOf:
    """A shard whose every epoch yields the same Arrow blocks (the part of ``DataIterator`` the loop uses)."""

    def __init__(self, blocks):
        self.blocks = blocks

    def iter_batches(self, **kwargs):
        assert kwargs.get("batch_size", 0) is None and kwargs.get("batch_format") == "pyarrow"
        return iter(self.blocks)


@pytest.mark.parametrize("prefetch", [0, 1])
def test_iter_train_batches_refuses_an_epoch_without_a_batch(prefetch):
    """Too few rows for one batch per rank would loop over empty epochs for ever: a clear error instead."""
    from diffusioninst.config import ExperimentConfig
    from diffusioninst.data.ray_ingest import iter_train_batches

    cfg = ExperimentConfig()
    cfg.solver.ims_per_batch, cfg.data.prefetch_batches = 8, prefetch  # 2 workers: 4 images per rank and batch
    shard = _ShardOf(_blocks([2, 1]))  # 3 rows
    with pytest.raises(ValueError, match=r"epoch 0 .* no batch of 4 images.* 2 worker"):
        next(iter_train_batches(shard, cfg, world_size=2, seed=0))
