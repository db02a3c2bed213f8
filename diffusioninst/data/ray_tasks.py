"""Ray Data task bodies of the ingest pipeline, kept free of torch so fresh Ray workers start fast
(importing torch costs seconds per worker process on a small machine)."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pyarrow as pa


def encode_payload_batch(batch: dict[str, np.ndarray]) -> pa.Table:
    """Rows of pickled record chunks (direct COCO/LVIS ingest): original image bytes, decoded on the workers."""
    from diffusioninst.data.preprocess import encode_records

    tables = [encode_records(pickle.loads(p), set()) for p in batch["payload"]]
    return pa.concat_tables(tables)


def keep_ids_batch(table: pa.Table, image_ids: list[int]) -> pa.Table:
    """Keep the rows whose ``image_id`` is in ``image_ids`` (``data.<split>.max_images`` on Parquet shards)."""
    import pyarrow.compute as pc

    return table.filter(pc.is_in(table.column("image_id"), value_set=pa.array(image_ids, pa.int64())))


def drop_empty_batch(table: pa.Table) -> pa.Table:
    """Keep rows with at least one non-crowd instance (``data.filter_empty``)."""
    keep = [not all(c) for c in table.column("iscrowd").to_pylist()]
    return table.filter(pa.array(keep, pa.bool_()))


def repeat_rows_batch(table: pa.Table, class_factor: list[float]) -> pa.Table:
    """Repeat-factor sampling on rows: row i appears ``floor(r_i)`` times plus once more with probability
    ``frac(r_i)``, ``r_i = max`` of its classes' factors (1 when none); adds ``repeat_index``. Rounding uses
    fresh entropy, so each epoch's execution draws anew (the streaming order is not reproducible anyway)."""
    rng = np.random.default_rng()
    factors = np.array(
        [max((class_factor[c] for c in labels), default=1.0) for labels in table.column("labels").to_pylist()]
    )
    reps = np.floor(factors).astype(np.int64) + (rng.random(len(factors)) < factors - np.floor(factors))
    idx = np.repeat(np.arange(len(factors)), reps)
    out = table.take(pa.array(idx, pa.int64()))
    occurrence = np.concatenate([np.arange(r) for r in reps]) if len(reps) else np.zeros(0, np.int64)
    return out.append_column("repeat_index", pa.array(occurrence.astype(np.int64)))


def class_repeat_factors(image_count: list[int], num_images: int, threshold: float) -> list[float]:
    """``r(c) = max(1, sqrt(t / f(c)))`` with ``f(c) = image_count[c] / num_images`` (unused classes: 1)."""
    return [max(1.0, math.sqrt(threshold / (n / num_images))) if n else 1.0 for n in image_count]
