"""Each epoch's partition of a cached split's blocks among the Train ranks (``epoch_partition``): pure, no Ray."""

from __future__ import annotations

import numpy as np
import pytest

from diffusioninst.data.ray_partition import epoch_partition


class FixedOrder:
    """Stands in for the generator: visits the blocks in a given order."""

    def __init__(self, order):
        self.order = order

    def permutation(self, n):
        assert n == len(self.order)
        return np.array(self.order)


def test_greedy_assignment_and_equal_quota_worked_by_hand():
    rows = [10, 10, 5]
    # order 0, 1, 2: b0 -> r0 (10), b1 -> r1 (10), b2 -> r0 on the tie (15); quota min(15, 10) = 10
    assert epoch_partition(rows, 2, FixedOrder([0, 1, 2])) == [[(0, 10)], [(1, 10)]]
    # order 2, 0, 1: b2 -> r0 (5), b0 -> r1 (10), b1 -> r0 (fewer rows: 15); r0 reads b2 whole, then 5 rows of b1
    assert epoch_partition(rows, 2, FixedOrder([2, 0, 1])) == [[(2, 5), (1, 5)], [(0, 10)]]
    # one rank: everything, in the drawn order
    assert epoch_partition(rows, 1, FixedOrder([1, 2, 0])) == [[(1, 10), (2, 5), (0, 10)]]
    # empty blocks take no rows and are not listed
    assert epoch_partition([0, 4, 4], 2, FixedOrder([0, 1, 2])) == [[(1, 4)], [(2, 4)]]


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_ranks_get_equal_disjoint_rows_and_lose_at_most_one_block_each(world_size):
    rng = np.random.default_rng(0)
    for _ in range(50):
        rows = rng.integers(0, 30, size=int(rng.integers(world_size, 40))).tolist()
        parts = epoch_partition(rows, world_size, np.random.default_rng(int(rng.integers(1 << 30))))
        totals = [sum(n for _, n in p) for p in parts]
        assert len(set(totals)) == 1  # the same number of rows on every rank
        blocks = [b for p in parts for b, _ in p]
        assert len(blocks) == len(set(blocks))  # no block on two ranks, or twice on one
        assert all(0 < n <= rows[b] for p in parts for b, n in p)
        assert all(n == rows[b] for p in parts for b, n in p[:-1])  # only a rank's last block may be cut
        assert sum(rows) - sum(totals) <= (world_size - 1) * max(rows)


def test_equal_blocks_are_all_read_and_the_draw_is_seeded_and_uniform():
    rows, world = [5] * 8, 2
    first = epoch_partition(rows, world, np.random.default_rng((3, 0)))
    assert sorted(b for p in first for b, _ in p) == list(range(8))  # nothing left out
    assert first == epoch_partition(rows, world, np.random.default_rng((3, 0)))  # same seed: every rank agrees
    epochs = [epoch_partition(rows, world, np.random.default_rng((3, e))) for e in range(400)]
    assert len({tuple(p[0]) for p in epochs}) > 100  # a new part every epoch
    # each block lands on rank 0 in about half the epochs: binomial(400, 1/2), sd 10; 5 sd allowed
    on_rank0 = np.bincount([b for p in epochs for b, _ in p[0]], minlength=8)
    assert np.all(np.abs(on_rank0 - 200) < 50), on_rank0


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="world_size"):
        epoch_partition([1, 2], 0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="row counts"):
        epoch_partition([1, -2], 2, np.random.default_rng(0))
