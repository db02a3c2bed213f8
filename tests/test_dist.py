"""The torch.distributed helpers in two real gloo processes (CPU), against values computed by hand."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from diffusioninst.engine import dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: dict) -> None:
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        bn = torch.nn.BatchNorm1d(3)
        bn.train()
        bn(torch.full((4, 3), float(rank + 1)) + torch.arange(4.0)[:, None])  # per-rank statistics
        dist.average_buffers(bn)
        out[rank] = {
            "mean": bn.running_mean.tolist(),
            "var": bn.running_var.tolist(),
            "tracked": int(bn.num_batches_tracked),
            "max": dist.max_over_ranks([float(rank), 5.0 - rank], torch.device("cpu")),
            "avg": dist.mean_over_ranks({"a": 2.0 * rank, "b": 1.0}, torch.device("cpu")),
        }
    finally:
        tdist.destroy_process_group()


def test_helpers_over_two_gloo_ranks():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(_free_port(), out), nprocs=2)
        results = dict(out)
    # rank r's batch is r + 1 + [0, 1, 2, 3]: mean r + 2.5, unbiased var 5/3; momentum 0.1 from (0, 1)
    mean = 0.1 * ((0 + 2.5) + (1 + 2.5)) / 2
    var = 0.9 + 0.1 * 5 / 3
    for rank in (0, 1):
        r = results[rank]
        assert r["mean"] == pytest.approx([mean] * 3, rel=1e-6) and r["var"] == pytest.approx([var] * 3, rel=1e-6)
        assert r["tracked"] == 1
        assert r["max"] == [1.0, 5.0]
        assert r["avg"] == {"a": 1.0, "b": 1.0}
