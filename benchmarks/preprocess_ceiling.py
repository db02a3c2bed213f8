"""How close Ray's 2-CPU preprocessing comes to two processes that share nothing.

Two ``preprocess(engine="local")`` runs of the same split at once, each in its own process and into its own
empty folder, do twice the work of one without any coordination: their combined rate over the rate of one run
alone is the most that any engine with two workers can get from this machine for this work at that moment. The
pure-Python loop of ``host_info.two_process_scaling`` misses what the real work shares (memory bandwidth, caches,
the disk); this does not. Each round times, in an order that alternates between rounds: one run alone, two at
once, and ``preprocess`` on a local Ray with 2 CPUs (from this process). Ray is started for its run and shut
down after it (after an untimed pass that starts its workers), so that the runs without Ray share the machine with
no Ray process (``--ray-between idle``: one Ray session for the whole benchmark, idle during the other runs, as in
``data_throughput.py``; idle, a local Ray with 2 workers used about 0.09 of a core here, which the pair pays and
one run alone, with a core to spare, does not). Every run writes into an empty folder, the previous output
removed and synced off the clock, and every run's inputs are read into the page cache first, off the clock
(``data_throughput.warm_inputs``: this host pages out file pages idle for about a minute).

Per round: ``pair_vs_alone`` (the ceiling), ``ray_vs_alone`` (the ratio the data issue's goal is about) and
``ray_vs_pair`` (Ray's share of the ceiling). The two runs of a pair often finish seconds apart: the host's two
virtual CPUs do not always run at the same speed. ``balanced_vs_alone`` is what an engine that kept both workers
busy to the end, each at the speed its run of the pair saw, would make (the sum of the two runs' rates), and
``ray_vs_balanced`` Ray's share of that. Each round also records every run's CPU seconds, ``pair_cpu_vs_alone``
(the mean CPU seconds of the pair's runs over the run alone's: the same work, so above 1 when a process computes
slower while the other virtual CPU is busy) and the machine's steal time (``/proc/stat``: time the hypervisor
gave our virtual CPUs to someone else). The result holds the ratios' medians.

    PYTHONPATH=. python benchmarks/preprocess_ceiling.py --images 2400 --rounds 8
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from data_throughput import WARM_INPUTS, _preprocess_rate, bench_config, empty_output, single_thread, warm_inputs
from host_info import cpu_model, two_process_scaling

from diffusioninst.data.loaders import ensure_dataset
from diffusioninst.data.preprocess import local_runtime_env
from diffusioninst.engine.host import keep_freed_memory

SHARD_SIZE = 25  # as data_throughput.py
RATIOS = ("pair_vs_alone", "balanced_vs_alone", "ray_vs_alone", "ray_vs_pair", "ray_vs_balanced", "pair_cpu_vs_alone")


def _init_worker() -> None:
    single_thread()
    keep_freed_memory()


def local_run(images: str, annotations: str, out: str, barrier=None) -> dict:
    """One ``preprocess(engine="local")`` into ``out`` (emptied beforehand by the caller): this process's id, the
    run's start and end (``time.time``) and the CPU seconds this process spent in it (``cpu``). ``barrier``: a
    ``multiprocessing`` barrier the run waits at first, so that runs meant to be concurrent start together (and
    fail, rather than run one after the other, when two of them landed in the same process)."""
    from diffusioninst.data.preprocess import preprocess

    if barrier is not None:
        barrier.wait(timeout=120)
    start, cpu = time.time(), time.process_time()
    preprocess("coco", images, annotations, out, force=True, shard_size=SHARD_SIZE, log=lambda _: None,
               engine="local")  # fmt: skip
    return {"pid": os.getpid(), "start": start, "end": time.time(), "cpu": time.process_time() - cpu}


def pair_seconds(runs: list[dict]) -> float:
    """Wall seconds of runs meant to be concurrent: first start to last end. Raises if two of them ran in the same
    process (one after the other, so not at once)."""
    if len({r["pid"] for r in runs}) != len(runs):
        raise RuntimeError(f"the runs were not in {len(runs)} different processes: {runs}")
    return max(r["end"] for r in runs) - min(r["start"] for r in runs)


def balanced_rate(runs: list[dict], images: int) -> float:
    """images/s of an engine with one worker per run that kept every worker busy to the end, each at the speed its
    run saw: the sum of the runs' rates (each run did ``images``). Equals ``len(runs) * images / pair_seconds``
    when the runs took the same time; more when one finished early."""
    return sum(images / (r["end"] - r["start"]) for r in runs)


def steal_seconds() -> float:
    """Seconds of CPU time the hypervisor gave this machine's virtual CPUs to others since boot, over all CPUs
    (the ``steal`` column of ``/proc/stat``; 0 where it is not reported)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2400)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--root", default=None, help="synthetic cache and output folder (default: a temporary folder)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "preprocess_ceiling.json"))
    p.add_argument("--ray-between", choices=("shutdown", "idle"), default="shutdown",
                   help="Ray between its runs: shut down (default) or kept idle")  # fmt: skip
    args = p.parse_args(argv)
    _init_worker()  # this process (Ray's driver) runs with the pool's settings
    work = Path(args.root or tempfile.mkdtemp(prefix="preprocess_ceiling_"))
    cfg = ensure_dataset(bench_config(work, args.images))
    n = cfg.data.synthetic.num_train
    src = (str(cfg.data.train.images), str(cfg.data.train.annotations))
    outs = [work / "local_a", work / "local_b"]

    def alone(pool) -> dict:
        empty_output(outs[0])
        warm_inputs(cfg)
        return pool.apply(local_run, (*src, str(outs[0])))

    def pair(pool) -> list[dict]:
        for out in outs:
            empty_output(out)
        warm_inputs(cfg)
        barrier = manager.Barrier(2)
        return pool.starmap(local_run, [(*src, str(out), barrier) for out in outs], chunksize=1)

    import ray

    def start_ray() -> None:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", runtime_env=local_runtime_env())
        ray.data.DataContext.get_current().enable_progress_bars = False
        _preprocess_rate(cfg, work / "ray", SHARD_SIZE, "ray", True)  # workers start, imports: untimed

    scaling_before = two_process_scaling()
    rounds = []
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(2, initializer=_init_worker) as pool:
        pair(pool)  # imports and first-run costs in both processes, untimed
        if args.ray_between == "idle":
            start_ray()
        try:
            for r in range(args.rounds):
                order = ("alone", "pair", "ray") if r % 2 == 0 else ("ray", "pair", "alone")
                rates, steal, runs = {}, {}, {}
                for name in order:
                    fresh_ray = name == "ray" and args.ray_between == "shutdown"
                    if fresh_ray:
                        start_ray()
                    stolen = steal_seconds()
                    if name == "ray":
                        rates[name] = _preprocess_rate(cfg, work / "ray", SHARD_SIZE, "ray", True)
                    elif name == "alone":
                        runs[name] = [alone(pool)]
                        rates[name] = n / (runs[name][0]["end"] - runs[name][0]["start"])
                    else:
                        runs[name] = pair(pool)
                        rates[name], rates["balanced"] = 2 * n / pair_seconds(runs[name]), balanced_rate(runs[name], n)
                    steal[name] = steal_seconds() - stolen
                    if fresh_ray:
                        ray.shutdown()
                rounds.append(
                    {
                        "order": list(order),
                        "rate": rates,
                        "pair_vs_alone": rates["pair"] / rates["alone"],
                        "balanced_vs_alone": rates["balanced"] / rates["alone"],
                        "ray_vs_alone": rates["ray"] / rates["alone"],
                        "ray_vs_pair": rates["ray"] / rates["pair"],
                        "ray_vs_balanced": rates["ray"] / rates["balanced"],
                        "pair_cpu_vs_alone": statistics.mean(r["cpu"] for r in runs["pair"]) / runs["alone"][0]["cpu"],
                        "runs": {
                            k: [{"seconds": r["end"] - r["start"], "cpu": r["cpu"]} for r in v] for k, v in runs.items()
                        },
                        "steal_seconds": steal,
                    }
                )
                print(json.dumps(rounds[-1]), flush=True)
        finally:
            ray.shutdown()
    result = {
        "images": n,
        "shard_size": SHARD_SIZE,
        "ray_between": args.ray_between,
        "inputs": WARM_INPUTS,
        "cpu_model": cpu_model(),
        "host_two_process_scaling": {"before": scaling_before, "after": two_process_scaling()},
        "rounds": rounds,
        "median": {k: statistics.median(x[k] for x in rounds) for k in RATIOS},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"medians {json.dumps(result['median'])}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
