"""Training sample order: infinite seeded shuffles, LVIS repeat-factor sampling, per-sample augmentation seeds.

Semantics follow detectron2's ``TrainingSampler`` / ``RepeatFactorTrainingSampler``: one torch Generator
seeded with the same seed on every rank draws an infinite stream of epochs; rank ``r`` of ``W`` takes
items ``r, r + W, r + 2W, ...`` of that stream. Each item also carries an augmentation seed derived from
``(seed, epoch, image_id, occurrence)`` so a sample's augmentation does not depend on the number of
loader workers, ranks or the order in which batches are assembled (the Ray Data path uses the same rule).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from diffusioninst.data.records import ImageRecord


def repeat_factors(records: Sequence[ImageRecord], threshold: float) -> np.ndarray:
    """Per-image repeat factor, float64 [N] (detectron2 ``repeat_factors_from_category_frequency``).

    ``f(c)`` = fraction of images annotated with class c (every annotation counts);
    ``r(c) = max(1, sqrt(t / f(c)))``; an image's factor is the max ``r(c)`` over its classes (1 if none).
    """
    n = len(records)
    counts: dict[int, int] = {}
    for r in records:
        for lab in {inst.label for inst in r.instances}:
            counts[lab] = counts.get(lab, 0) + 1
    rep = {c: max(1.0, math.sqrt(threshold / (k / n))) for c, k in counts.items()}
    return np.array([max((rep[i.label] for i in r.instances), default=1.0) for r in records], np.float64)


def epoch_indices(factors: np.ndarray, generator: torch.Generator) -> torch.Tensor:
    """Indices of one repeat-factor epoch: index i appears ``floor(r_i)`` times plus once more with probability
    ``frac(r_i)`` (stochastic rounding), in dataset order (shuffle separately). int64 [M]."""
    f = torch.as_tensor(factors, dtype=torch.float64)
    int_part = torch.trunc(f)
    rands = torch.rand(len(f), generator=generator, dtype=torch.float64)
    reps = (int_part + (rands < f - int_part).to(torch.float64)).long()
    return torch.repeat_interleave(torch.arange(len(f)), reps)


def augmentation_seed(seed: int, epoch: int, image_id: int, occurrence: int = 0) -> int:
    """A 63-bit seed for one sample's augmentation, a pure function of its identity."""
    words = [seed & 0xFFFFFFFF, seed >> 32, epoch, image_id & 0xFFFFFFFF, image_id >> 32, occurrence]
    state = np.random.SeedSequence(words)
    a, b = state.generate_state(2, np.uint32)
    return (int(a) << 31) ^ int(b)


def sample_stream(
    records: Sequence[ImageRecord],
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    repeat_threshold: float = 0.0,
    shuffle: bool = True,
) -> Iterator[tuple[int, int]]:
    """Infinite stream of ``(record index, augmentation seed)`` for one rank.

    Args:
        records: the training records.
        seed: shared by every rank (the stream is identical everywhere before sharding).
        rank, world_size: this rank's share is items ``rank::world_size`` of the global stream.
        repeat_threshold: > 0 enables repeat-factor sampling with that threshold t.
        shuffle: permute each epoch (always, in training).
    """
    if not records:
        raise ValueError("cannot sample from an empty training set")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    factors = repeat_factors(records, repeat_threshold) if repeat_threshold > 0 else None

    def global_stream() -> Iterator[tuple[int, int, int]]:
        g = torch.Generator()
        g.manual_seed(seed)
        for epoch in itertools.count():
            base = epoch_indices(factors, g) if factors is not None else torch.arange(len(records))
            order = base[torch.randperm(len(base), generator=g)] if shuffle else base
            seen: dict[int, int] = {}
            for idx in order.tolist():
                occurrence = seen.get(idx, 0)
                seen[idx] = occurrence + 1
                yield epoch, idx, occurrence

    def shard() -> Iterator[tuple[int, int]]:
        for epoch, idx, occurrence in itertools.islice(global_stream(), rank, None, world_size):
            yield idx, augmentation_seed(seed, epoch, records[idx].image_id, occurrence)

    return shard()
