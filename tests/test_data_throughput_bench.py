"""The preprocessing benchmark's two output protocols (benchmarks/data_throughput.py): into an empty folder, the
previous output removed before the clock starts, or replacing the previous output in place."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from data_throughput import _preprocess_rate, bench_config

from diffusioninst.data.loaders import ensure_dataset


def test_into_empty_removes_the_previous_output_and_existing_replaces_it(tmp_path):
    cfg = ensure_dataset(bench_config(tmp_path / "data", 6))
    out = tmp_path / "out"
    out.mkdir()
    (out / "left-by-an-earlier-run.txt").write_text("x")
    (out / "part-00099.parquet").write_bytes(b"an earlier run's shard")

    assert _preprocess_rate(cfg, out, 4, "local") > 0
    # replacing: preprocess removes the stale shard, and leaves a file that is not its own
    assert sorted(p.name for p in out.glob("part-*.parquet")) == ["part-00000.parquet", "part-00001.parquet"]
    assert (out / "left-by-an-earlier-run.txt").is_file()

    assert _preprocess_rate(cfg, out, 4, "local", into_empty=True) > 0
    assert not (out / "left-by-an-earlier-run.txt").exists()
    assert sorted(p.name for p in out.iterdir()) == [
        "annotations.json",
        "manifest.json",
        "part-00000.parquet",
        "part-00001.parquet",
    ]
    assert json.loads((out / "manifest.json").read_text())["counts"]["images"] == 6
