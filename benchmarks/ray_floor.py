"""What a preprocessing-shaped Ray Data pass costs the machine when its tasks do no work: Ray's floor.

``preprocess`` runs one Ray Data pass of ``2 x --cpus`` tasks on a local Ray (``_items_dataset`` +
``map_batches(batch_size=None)`` + ``take_all``). Here every task only sleeps ``--seconds``, so the CPUs are free
and what the machine spends during the pass is Ray's own: the driver (Ray Data's executor loop, the calls that
start and end the pass), Ray Data's actors, the task workers' runtime threads, raylet, GCS, the monitors and
agents. For each of ``--rounds`` rounds it records

* the pass's wall time, the latency from the call to the first task and from the last task's end to the return,
  and ``pass_cpu_s``, the CPU seconds of every process over the pass, by role;
* ``idle_cpu_s``: the same Ray, no pass, for the same wall time, by role (Ray's cost when nothing runs).

Processes that are not Ray's (kernel threads, the host's agents) are reported as ``host`` and not counted.
A real pass pays at least ``ray_cpu_per_s`` CPU seconds per second out of the ``--cpus`` it has, plus the two
latencies, with one CPU or both idle; :func:`best_ratio` turns that into the most a pass can make against the same
work without Ray. ``--cpus`` may exceed the machine's CPUs, since the tasks only sleep: that shows how the floor grows
with the number of workers on a larger node. Linux only (``/proc``).

    PYTHONPATH=. python benchmarks/ray_floor.py --cpus 2 --seconds 3 --rounds 6
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

import host_info
from host_info import cpu_model, two_process_scaling

from diffusioninst.data.preprocess import _items_dataset, local_runtime_env

ROLES = ("driver", "task workers", "Ray Data actors and other Ray workers", "raylet and GCS", "Ray's Python services")


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode(errors="replace")


def processes_cpu() -> dict[int, tuple[str, float]]:
    """:func:`host_info.processes_cpu` with each process's command line as its name (the name in brackets for a
    kernel thread, which has none)."""
    out = {}
    for pid, (name, cpu) in host_info.processes_cpu().items():
        try:
            out[pid] = (_cmdline(pid) or f"[{name}]", cpu)
        except OSError:  # gone meanwhile
            continue
    return out


def role(pid: int, name: str, task_pids: set[int]) -> str:
    """Which part of Ray a process is ("host" when it is not Ray's)."""
    if pid == os.getpid():
        return "driver"
    if pid in task_pids:
        return "task workers"
    if name.startswith("ray::"):
        return "Ray Data actors and other Ray workers"
    if "/ray/core/src/" in name:
        return "raylet and GCS"
    if "python" in name and "/site-packages/ray/" in name:
        return "Ray's Python services"
    return "host"


def cpu_by_role(before: dict, after: dict, task_pids: set[int]) -> dict[str, float]:
    used = dict.fromkeys((*ROLES, "host"), 0.0)
    for pid, (name, cpu) in after.items():
        used[role(pid, name, task_pids)] += max(0.0, cpu - before.get(pid, (name, 0.0))[1])
    return {k: round(v, 3) for k, v in used.items()}


def best_ratio(
    serial_s: float, work_cpu_s: float, ray_share: float, latency_s: float, cpus: int = 2, efficiency: float = 1.0
) -> float:
    """The most a Ray pass on ``cpus`` CPUs can make against the same work in one process without Ray.

    The run without Ray takes ``serial_s + work_cpu_s`` seconds: the driver's serial part (parse, checks,
    publishing) and the per-image work. The Ray pass takes ``serial_s`` too, plus ``latency_s`` (from the call to
    the first task and from the last task to the return) plus the work spread over what the CPUs have left once
    Ray has taken ``ray_share`` of them, each CPU giving ``efficiency`` of what one process alone gets (the host's
    two-process scaling over 2). No tail, no contention and no task overhead are counted: a real pass does worse.
    """
    return (serial_s + work_cpu_s) / (serial_s + latency_s + work_cpu_s / (cpus * efficiency * (1.0 - ray_share)))


def sleeper(seconds: float, log_dir: str):
    """The task body: sleep, and append (start, end) to this worker's file."""

    def run(batch):
        t0 = time.time()
        time.sleep(seconds)
        with open(os.path.join(log_dir, f"{os.getpid()}.txt"), "a") as f:
            f.write(f"{t0} {time.time()}\n")
        return {"n": [len(batch["i"])]}

    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--seconds", type=float, default=3.0, help="each task's sleep")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ray_floor.json"))
    args = p.parse_args(argv)
    import ray

    scaling_before = two_process_scaling()
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR", runtime_env=local_runtime_env())
    ray.data.DataContext.get_current().enable_progress_bars = False
    log_dir = tempfile.mkdtemp(prefix="ray_floor_")
    n_tasks = 2 * args.cpus  # as preprocess: at most 2 tasks per CPU
    items = [{"i": i} for i in range(n_tasks)]

    def one_pass() -> tuple[float, float, list[tuple[int, float, float]]]:
        for f in os.listdir(log_dir):
            os.remove(os.path.join(log_dir, f))
        t0 = time.time()
        _items_dataset(items, n_tasks).map_batches(sleeper(args.seconds, log_dir), batch_size=None).take_all()
        t1 = time.time()
        tasks = [
            (int(f[:-4]), *map(float, line.split()))
            for f in os.listdir(log_dir)
            for line in Path(log_dir, f).read_text().splitlines()
        ]
        return t0, t1, tasks

    rounds = []
    try:
        _, _, tasks = one_pass()  # workers start, imports: untimed
        task_pids = {pid for pid, _, _ in tasks}
        for _ in range(args.rounds):
            before = processes_cpu()
            t0, t1, tasks = one_pass()
            pass_cpu = cpu_by_role(before, processes_cpu(), task_pids | {pid for pid, _, _ in tasks})
            wall = t1 - t0
            before = processes_cpu()
            time.sleep(wall)
            idle_cpu = cpu_by_role(before, processes_cpu(), task_pids)
            ray_pass = sum(v for k, v in pass_cpu.items() if k != "host")
            ray_idle = sum(v for k, v in idle_cpu.items() if k != "host")
            rounds.append(
                {
                    "wall_s": wall,
                    "tasks_ideal_s": n_tasks / args.cpus * args.seconds,
                    "to_first_task_s": min(s for _, s, _ in tasks) - t0,
                    "last_task_to_return_s": t1 - max(e for _, _, e in tasks),
                    "pass_cpu_s": pass_cpu,
                    "idle_cpu_s": idle_cpu,
                    "ray_cpu_per_s": ray_pass / wall,
                    "ray_share_of_cpus": ray_pass / wall / args.cpus,
                    "ray_idle_share_of_cpus": ray_idle / wall / args.cpus,
                }
            )
            print(json.dumps(rounds[-1]), flush=True)
    finally:
        ray.shutdown()
    keys = ("wall_s", "to_first_task_s", "last_task_to_return_s", "ray_cpu_per_s", "ray_share_of_cpus",
            "ray_idle_share_of_cpus")  # fmt: skip
    result = {
        "cpus": args.cpus,
        "machine_cpus": os.cpu_count(),  # --cpus above it: Ray's logical CPUs, for how the floor grows with workers
        "tasks": n_tasks,
        "task_seconds": args.seconds,
        "cpu_model": cpu_model(),
        "ray_version": ray.__version__,
        "host_two_process_scaling": {"before": scaling_before, "after": two_process_scaling()},
        "rounds": rounds,
        "median": {k: statistics.median(r[k] for r in rounds) for k in keys},
        "median_pass_cpu_s": {k: statistics.median(r["pass_cpu_s"][k] for r in rounds) for k in (*ROLES, "host")},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"medians {json.dumps(result['median'])}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
