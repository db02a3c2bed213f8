"""Where a preprocessing pass on a local Ray spends the machine: a timeline and a CPU account per run.

For each warm run of ``preprocess`` on a local Ray with ``--cpus`` CPUs (synthetic COCO split of ``--images``
480x640 images, 25-image shards, as ``data_throughput.py``), between two runs of the same work without Ray:

* ``tasks``: every Ray Data task's start and end (seconds from the call), the CPU its worker process spent in
  it, its first shard and its worker's pid;
* ``driver_cpu_s``: the calling process's CPU before the Ray Data pass (JSON parse, checks, shard inputs),
  during it, and after it (publishing, manifest);
* ``processes_cpu_s``: CPU of every process on the machine over the run, by name (Ray's workers together);
* ``idle_fraction``: the machine's idle share over the run (``/proc/stat``);
* ``rate`` and ``vs_same_work_no_ray`` (against the mean of the runs without Ray before and after).

``host_two_process_scaling`` (before and after the runs) is what two busy processes get from the machine against
one at that time (``host_info.two_process_scaling``): on a shared virtual machine, the ceiling of any 2-CPU ratio.

Every run writes into an empty folder, the previous output removed and synced off the clock (``--output
existing``: every run replaces the previous run's output instead, and deleting it is timed too). Every run's
inputs are read into the page cache first, before the counters start (``data_throughput.warm_inputs``).

Linux only (``/proc``); the tasks report through files in a temporary folder, so one machine only.

    PYTHONPATH=. python benchmarks/preprocess_accounting.py --images 2400 --cpus 2 --rounds 4
"""

from __future__ import annotations

import argparse
import json
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
from host_info import cpu_model, processes_cpu, two_process_scaling

import diffusioninst.data.preprocess as pre
from diffusioninst.data.loaders import ensure_dataset
from diffusioninst.engine.host import keep_freed_memory


def machine_times() -> tuple[int, int]:
    """(idle + iowait, total) clock ticks of all CPUs since boot."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return ticks[3] + ticks[4], sum(ticks)


def timed_tasks(log_dir: str):
    """A stand-in for ``process_shard_batch`` that appends each call's timing to a file in ``log_dir``."""

    def run(batch, **kwargs):
        from diffusioninst.data.preprocess import process_shard_batch

        cpu0, t0 = time.process_time(), time.time()
        out = process_shard_batch(batch, **kwargs)
        t1, cpu1 = time.time(), time.process_time()
        with open(os.path.join(log_dir, f"{os.getpid()}.txt"), "a") as f:
            f.write(f"{t0} {t1} {cpu1 - cpu0} {int(batch['shard'][0])}\n")
        return out

    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2400)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--root", default=None, help="synthetic cache folder (default: a temporary folder)")
    p.add_argument(
        "--output",
        choices=("empty", "existing"),
        default="empty",
        help="empty (default): every run writes into an empty folder, the previous output removed off the clock; "
        "existing: every run replaces the previous run's output (deleting it is timed)",
    )
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "preprocess_accounting.json"))
    args = p.parse_args(argv)
    single_thread()
    keep_freed_memory()
    work = Path(args.root or tempfile.mkdtemp(prefix="preprocess_accounting_"))
    cfg = ensure_dataset(bench_config(work, args.images))
    log_dir = tempfile.mkdtemp(prefix="tasks_")
    pre.process_shard_batch = timed_tasks(log_dir)  # the pass looks it up at call time
    phases: dict[str, float] = {}
    run_ray = pre._run_ray

    def run_ray_timed(*a, **k):
        phases["cpu0"] = time.process_time()
        try:
            return run_ray(*a, **k)
        finally:
            phases["cpu1"] = time.process_time()

    pre._run_ray = run_ray_timed

    import ray

    into_empty = args.output == "empty"

    def no_ray() -> float:
        return _preprocess_rate(cfg, work / "no_ray", 25, "local", into_empty)

    no_ray()
    scaling_before = two_process_scaling()
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR", runtime_env=pre.local_runtime_env())
    ray.data.DataContext.get_current().enable_progress_bars = False
    runs = []
    try:
        _preprocess_rate(cfg, work / "ray", 25, "ray", into_empty)  # workers start, imports
        before = no_ray()
        for _ in range(args.rounds):
            for f in os.listdir(log_dir):
                os.remove(os.path.join(log_dir, f))
            if into_empty:
                empty_output(work / "ray")
            warm_inputs(cfg)  # before the counters: reading the inputs is not part of the run
            idle0, total0 = machine_times()
            procs0, cpu0, t0 = processes_cpu(), time.process_time(), time.time()
            rate = _preprocess_rate(cfg, work / "ray", 25, "ray", warm=False)
            t1, cpu1, procs1 = time.time(), time.process_time(), processes_cpu()
            idle1, total1 = machine_times()
            after = no_ray()
            by_name: dict[str, float] = {}
            for pid, (name, cpu) in procs1.items():
                used = cpu - procs0.get(pid, (name, 0.0))[1]
                if used > 0:
                    key = "driver" if pid == os.getpid() else "ray workers" if name.startswith("ray::") else name
                    by_name[key] = by_name.get(key, 0.0) + used
            tasks = []
            for f in os.listdir(log_dir):
                for line in Path(log_dir, f).read_text().split("\n")[:-1]:
                    start, end, cpu, shard = line.split()
                    tasks.append(
                        {"pid": int(f[:-4]), "first_shard": int(shard), "start": float(start) - t0,
                         "end": float(end) - t0, "cpu_s": float(cpu)}
                    )  # fmt: skip
            tasks.sort(key=lambda x: x["start"])
            runs.append(
                {
                    "wall_s": t1 - t0,
                    "rate": rate,
                    "no_ray_around": [before, after],
                    "vs_same_work_no_ray": rate / statistics.fmean([before, after]),
                    "tasks": tasks,
                    "driver_cpu_s": {
                        "before_pass": phases["cpu0"] - cpu0,
                        "pass": phases["cpu1"] - phases["cpu0"],
                        "after_pass": cpu1 - phases["cpu1"],
                    },
                    "processes_cpu_s": dict(sorted(by_name.items(), key=lambda kv: -kv[1])),
                    "idle_fraction": (idle1 - idle0) / max(total1 - total0, 1),
                }
            )
            before = after
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "tasks"}), flush=True)
    finally:
        ray.shutdown()
    result = {
        "host_two_process_scaling": {"before": scaling_before, "after": two_process_scaling()},
        "images": args.images,
        "cpus": args.cpus,
        "output": "empty folder" if into_empty else "replacing the previous run's output",
        "inputs": WARM_INPUTS,
        "cpu_model": cpu_model(),
        "runs": runs,
        "median_vs_same_work_no_ray": statistics.median(r["vs_same_work_no_ray"] for r in runs),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"median ratio {result['median_vs_same_work_no_ray']:.3f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
