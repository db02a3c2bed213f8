"""The ceiling benchmark's pair of runs (benchmarks/preprocess_ceiling.py): two ``preprocess`` runs in two
processes at once, each into its own folder, and the wall time of the pair."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
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


@pytest.mark.ray
@pytest.mark.slow
def test_benchmark_round_with_ray_shut_down_between_its_runs(tmp_path):
    """A whole round of the benchmark (6 images), in its own process as it is run (it sets its process to one
    thread): every ratio is the quotient of the rates it names, and the pair ran in two processes."""
    out = tmp_path / "ceiling.json"
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "preprocess_ceiling.py"
    cmd = [sys.executable, str(bench), "--images", "6", "--rounds", "1",
           "--root", str(tmp_path / "work"), "--out", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    assert result["ray_between"] == "shutdown"
    (r,) = result["rounds"]
    rate = r["rate"]
    assert r["pair_vs_alone"] == pytest.approx(rate["pair"] / rate["alone"])
    assert r["balanced_vs_alone"] == pytest.approx(rate["balanced"] / rate["alone"])
    assert r["ray_vs_pair"] == pytest.approx(rate["ray"] / rate["pair"])
    assert r["ray_vs_balanced"] == pytest.approx(rate["ray"] / rate["balanced"])
    assert rate["balanced"] >= rate["pair"] * (1 - 1e-9)  # the sum of the two rates is never below the span's rate
    pair = r["runs"]["pair"]
    assert len(pair) == 2 and all(run["cpu"] > 0 for run in pair)
    mean_pair_cpu = r["pair_cpu_vs_alone"] * r["runs"]["alone"][0]["cpu"]
    assert mean_pair_cpu == pytest.approx((pair[0]["cpu"] + pair[1]["cpu"]) / 2)
    assert set(r["steal_seconds"]) == {"alone", "pair", "ray"} and min(r["steal_seconds"].values()) >= 0
    assert result["median"]["ray_vs_alone"] == pytest.approx(r["ray_vs_alone"])
    for folder in ("local_a", "local_b", "ray"):
        assert json.loads((tmp_path / "work" / folder / "manifest.json").read_text())["counts"]["images"] == 6
