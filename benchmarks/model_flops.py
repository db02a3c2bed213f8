"""Where the R50 training iteration's time goes, against the arithmetic it must do: a floor for the speed goal.

Counts the floating-point operations of one training iteration of the R50 COCO model (800x1216, batch 1, 3
instances, as ``model_speed.py --configs r50 --modes train``) operator by operator, with torch's own FLOP
formulas (``torch.utils.flop_counter.flop_registry``), and times every operator in the same pass, so each
category of work gets its FLOPs, its seconds and its rate. Sparse products (RoIAlign's backward as a sparse
matrix product) are counted by their non-zeros, not as the dense product torch's counter would assume.
Then it measures what this machine's two threads can do: MKL's SGEMM at a few sizes, and the model's largest
3x3 convolution through oneDNN (forward and both gradients). From those it derives:

* ``floor_s_at_gemm_peak``: the iteration's FLOPs at the best SGEMM rate, with no time for anything else;
* ``rate_needed_for_target``: the FLOP rate the whole iteration must sustain to reach the target time.

``gflop_by_phase`` splits the FLOPs into the forward pass, the backward pass and the optimizer step.

    PYTHONPATH=. python benchmarks/model_flops.py --out benchmarks/results/model_flops_epyc.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from host_info import cpu_model
from model_speed import OFFICIAL, _train_step, model_config, synthetic_batch

from diffusioninst.engine.host import keep_freed_memory
from diffusioninst.model import build_model

aten = torch.ops.aten
CONV = {aten.convolution, aten.convolution_backward}
MATMUL = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten.addmm_}


def _sparse_product_flops(args) -> int:
    """2 x nnz x N for ``addmm(input, sparse [M, K], dense [K, N])``, ``mm(sparse, dense)`` and ``torch.sparse.mm``."""
    sparse = next(a for a in args if isinstance(a, torch.Tensor) and a.layout == torch.sparse_coo)
    dense = [a for a in args if isinstance(a, torch.Tensor) and a.layout == torch.strided and a.dim() == 2][-1]
    return 2 * sparse._nnz() * dense.shape[1]


def _dense_flops(packet, args, kwargs, out) -> int:
    if packet is aten.addmm_:  # in place, not in torch's registry: self += mat1 @ mat2
        return 2 * args[1].shape[0] * args[1].shape[1] * args[2].shape[1]
    return int(flop_registry[packet](*args, **kwargs, out_val=out))


class OpTimer(TorchDispatchMode):
    """Times every aten operator (wall clock around the call) and counts the FLOPs of those torch has a formula
    for. Categories: ``conv_forward``, ``conv_backward``, ``matmul`` (dense), ``sparse_product``, ``other``.
    ``phase_flops`` splits the FLOPs by the phase named through :meth:`phase` (``model_speed._train_step``
    names ``forward``, ``backward`` and ``optimizer`` when handed this timer's :meth:`phase`)."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: dict[str, float] = defaultdict(float)
        self.flops: dict[str, int] = defaultdict(int)
        self.phase_flops: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._phase = "unnamed"

    @contextlib.contextmanager
    def phase(self, name: str):
        previous, self._phase = self._phase, name
        try:
            yield
        finally:
            self._phase = previous

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        t0 = time.perf_counter()
        out = func(*args, **kwargs)
        dt = time.perf_counter() - t0
        packet = func.overloadpacket
        sparse = any(isinstance(a, torch.Tensor) and a.layout != torch.strided for a in args)
        if sparse and packet in (aten.addmm, aten.mm, aten._sparse_addmm):
            key, flops = "sparse_product", _sparse_product_flops(args)
        elif packet in CONV:
            key = "conv_forward" if packet is aten.convolution else "conv_backward"
            flops = _dense_flops(packet, args, kwargs, out)
        elif packet in MATMUL:
            key, flops = "matmul", _dense_flops(packet, args, kwargs, out)
        else:
            key, flops = "other", _dense_flops(packet, args, kwargs, out) if packet in flop_registry else 0
        self.seconds[key] += dt
        self.flops[key] += flops
        self.phase_flops[self._phase][key] += flops
        return out


def _best_of(fn, runs: int = 5) -> float:
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def machine_rates() -> dict:
    """GFLOP/s of MKL's SGEMM at a few square sizes and of oneDNN on the model's largest 3x3 convolution
    (the FPN's p2 output conv, 256 -> 256 channels at 200x304): forward, input gradient, weight gradient."""
    out: dict = {"sgemm": {}}
    for n in (1024, 2048, 4096):
        a, b = torch.randn(n, n), torch.randn(n, n)
        out["sgemm"][str(n)] = 2 * n**3 / _best_of(lambda a=a, b=b: a @ b) / 1e9
    x, w, g = torch.randn(1, 256, 200, 304), torch.randn(256, 256, 3, 3), torch.randn(1, 256, 200, 304)
    flops = 2 * 256 * 256 * 9 * 200 * 304

    def grad(mask):
        return lambda: aten.convolution_backward(g, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask)

    out["conv3x3_256_p2"] = {
        "forward": flops / _best_of(lambda: F.conv2d(x, w, padding=1), 3) / 1e9,
        "input_gradient": flops / _best_of(grad([True, False, False]), 3) / 1e9,
        "weight_gradient": flops / _best_of(grad([False, True, False]), 3) / 1e9,
    }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3, help="untimed training iterations first (heap growth)")
    p.add_argument("--runs", type=int, default=3, help="timed iterations without the operator timer")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "model_flops.json"))
    args = p.parse_args(argv)
    keep_freed_memory(True)
    torch.set_num_threads(args.threads)
    cfg, hw, batch, instances = model_config("r50")
    torch.manual_seed(0)
    model = build_model(cfg).train()
    images, sizes, targets = synthetic_batch(batch, hw, instances, cfg.head.num_classes)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-4, fused=True)
    for r in range(args.warmup):
        _train_step(model, opt, params, images, sizes, targets, 100 + r)
    plain = []
    for r in range(args.runs):
        t0 = time.perf_counter()
        _train_step(model, opt, params, images, sizes, targets, 200 + r)
        plain.append(time.perf_counter() - t0)
    timer = OpTimer()
    t0 = time.perf_counter()
    with timer:
        _train_step(model, opt, params, images, sizes, targets, 300, timer.phase)
    timed_total = time.perf_counter() - t0

    gflop = {k: v / 1e9 for k, v in timer.flops.items()}
    total_gflop = sum(gflop.values())
    categories = {
        k: {
            "gflop": gflop.get(k, 0.0),
            "seconds": timer.seconds[k],
            "gflop_per_s": gflop.get(k, 0.0) / timer.seconds[k] if timer.seconds[k] else None,
        }
        for k in sorted(timer.seconds)
    }
    rates = machine_rates()
    peak = max(rates["sgemm"].values())
    target = OFFICIAL["r50"]["train_iter_s"] / 2
    median = statistics.median(plain)
    result = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_model": cpu_model(),
        "load_average": list(os.getloadavg()),
        "train_iter_s": {"median": median, "runs": plain, "with_operator_timer": timed_total},
        "train_iter_gflop": total_gflop,
        "categories": categories,
        "gflop_by_phase": {
            phase: {k: v / 1e9 for k, v in sorted(flops.items()) if v} for phase, flops in timer.phase_flops.items()
        },
        "machine_gflop_per_s": rates,
        "achieved_gflop_per_s": total_gflop / median,
        "official_train_iter_s": OFFICIAL["r50"]["train_iter_s"],
        "target_s": target,
        "floor_s_at_gemm_peak": total_gflop / peak,
        "rate_needed_for_target": total_gflop / target,
        "rate_needed_for_target_if_other_work_stays": total_gflop
        / max(target - categories.get("other", {}).get("seconds", 0.0), 1e-9),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
