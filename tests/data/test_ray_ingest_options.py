"""Ray Data ingest options without a Ray cluster: the paced scheduling loop's timing rule on a fake clock,
and the object-store cache's size rule."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from diffusioninst.data.ray_ingest import files_fit_in_cache, fits_in_cache
from diffusioninst.data.ray_pacing import DEFAULT_MIN_STEP_S, MIN_STEP_KEY, PacedSchedulingLoop


class FakeTime:
    """A clock that only moves when the test advances it or the callback sleeps."""

    def __init__(self) -> None:
        self.now, self.sleeps = 100.0, []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def executor_with_period(seconds: float | None):
    """A stand-in for Ray's StreamingExecutor: only its DataContext's key-value config is read."""
    configs = {} if seconds is None else {MIN_STEP_KEY: seconds}
    context = SimpleNamespace(get_config=lambda key, default=None: configs.get(key, default))
    return SimpleNamespace(_data_context=context)


def test_short_steps_are_stretched_to_the_period_and_long_steps_are_not():
    t = FakeTime()
    cb = PacedSchedulingLoop(clock=t.clock, sleep=t.sleep)
    ex = executor_with_period(0.02)
    cb.before_execution_starts(ex)
    assert cb.min_step_s == 0.02
    cb.on_execution_step(ex)  # the first step has nothing to be measured against
    assert t.sleeps == []
    t.now += 0.005  # a 5 ms step: sleep the remaining 15 ms
    cb.on_execution_step(ex)
    assert t.sleeps == [pytest.approx(0.015)]
    t.now += 0.1  # a step that waited in ray.wait for 100 ms: no sleep
    cb.on_execution_step(ex)
    assert len(t.sleeps) == 1
    t.now += 0.021  # a step just over the period: no sleep
    cb.on_execution_step(ex)
    assert len(t.sleeps) == 1
    for _ in range(50):  # a spinning loop (1 ms steps) runs at one step per period
        t.now += 0.001
        cb.on_execution_step(ex)
    assert t.sleeps[1:] == [pytest.approx(0.019)] * 50


def test_each_execution_starts_afresh_and_reads_its_own_period():
    t = FakeTime()
    cb = PacedSchedulingLoop(clock=t.clock, sleep=t.sleep)
    cb.before_execution_starts(executor_with_period(0.05))
    cb.on_execution_step(None)
    t.now += 0.001
    cb.before_execution_starts(executor_with_period(None))  # a new execution without the key: the default
    assert cb.min_step_s == DEFAULT_MIN_STEP_S
    cb.on_execution_step(None)  # first step of the new execution: not measured against the old one
    assert t.sleeps == []
    t.now += 0.002
    cb.on_execution_step(None)
    assert t.sleeps == [pytest.approx(DEFAULT_MIN_STEP_S - 0.002)]


def test_cache_limit_is_inclusive_in_mebibytes_and_zero_turns_it_off():
    mib = 2**20
    assert fits_in_cache(1, [mib // 2, mib // 2])  # exactly 1 MiB
    assert not fits_in_cache(1, [mib // 2, mib // 2, 1])
    assert fits_in_cache(0.5, [])  # an empty split fits any positive limit
    assert not fits_in_cache(0, [])
    assert not fits_in_cache(0, [1])
    seen = []

    def sizes():
        for n in (mib, mib, mib, mib):
            seen.append(n)
            yield n

    assert not fits_in_cache(1.5, sizes()) and len(seen) == 2  # stops at the first size over the limit


def test_files_fit_by_their_sizes_on_disk_and_unreadable_ones_never_fit(tmp_path):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    a.write_bytes(b"x" * 600_000)
    b.write_bytes(b"x" * 600_000)
    assert files_fit_in_cache(2, [str(a), str(b)])
    assert not files_fit_in_cache(1, [str(a), str(b)])  # 1.14 MiB
    assert not files_fit_in_cache(2, [str(a), str(tmp_path / "missing.parquet")])
