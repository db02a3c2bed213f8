"""The ceiling benchmark's pair of runs (benchmarks/preprocess_ceiling.py): two ``preprocess`` runs in two
processes at once, each into its own folder, and the wall time of the pair."""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from data_throughput import bench_config
from preprocess_ceiling import _init_worker, balanced_rate, local_run, pair_seconds, steal_seconds

from diffusioninst.data.loaders import ensure_dataset


def test_pair_seconds_spans_first_start_to_last_end_and_refuses_runs_in_one_process():
    runs = [{"pid": 1, "start": 10.0, "end": 14.5}, {"pid": 2, "start": 10.2, "end": 15.0}]
    assert pair_seconds(runs) == pytest.approx(5.0)
    with pytest.raises(RuntimeError, match="not in 2 different processes"):
        pair_seconds([{"pid": 1, "start": 0.0, "end": 1.0}, {"pid": 1, "start": 1.0, "end": 2.0}])


def test_balanced_rate_is_the_sum_of_the_runs_rates():
    # 100 images each: one run took 4 s (25 img/s), the other 5 s (20 img/s); the pair's span is 5 s (40 img/s)
    runs = [{"pid": 1, "start": 0.0, "end": 4.0}, {"pid": 2, "start": 0.0, "end": 5.0}]
    assert balanced_rate(runs, 100) == pytest.approx(45.0)
    assert 2 * 100 / pair_seconds(runs) == pytest.approx(40.0)
    same = [{"pid": 1, "start": 0.0, "end": 5.0}, {"pid": 2, "start": 0.0, "end": 5.0}]
    assert balanced_rate(same, 100) == pytest.approx(2 * 100 / pair_seconds(same))


def test_steal_seconds_reads_the_steal_column_of_proc_stat():
    with open("/proc/stat") as f:
        fields = f.readline().split()
    assert fields[0] == "cpu"
    before = steal_seconds()
    assert before == pytest.approx(int(fields[8]) / os.sysconf("SC_CLK_TCK"), abs=1.0)
    assert steal_seconds() >= before


def test_pair_runs_in_two_processes_at_once_each_into_its_own_folder(tmp_path):
    cfg = ensure_dataset(bench_config(tmp_path / "data", 6))
    src = (str(cfg.data.train.images), str(cfg.data.train.annotations))
    outs = [tmp_path / "a", tmp_path / "b"]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(2, initializer=_init_worker) as pool:
        barrier = manager.Barrier(2)  # both runs wait for each other: they must be in two processes
        runs = pool.starmap(local_run, [(*src, str(out), barrier) for out in outs], chunksize=1)
    assert runs[0]["pid"] != runs[1]["pid"]
    assert abs(runs[0]["start"] - runs[1]["start"]) < 0.5
    span = pair_seconds(runs)
    assert span >= max(r["end"] - r["start"] for r in runs)
    for r in runs:  # a run's own CPU: at least some, at most its wall time (one thread each) plus clock slack
        assert 0 < r["cpu"] <= (r["end"] - r["start"]) * 1.1 + 0.05
    for out in outs:
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["counts"]["images"] == 6
        assert sorted(p.name for p in out.glob("part-*.parquet")) == ["part-00000.parquet"]
