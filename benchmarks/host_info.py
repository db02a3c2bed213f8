"""What the benchmarks record about the machine they ran on."""

from __future__ import annotations

import multiprocessing
import os
import platform
import statistics
import time

__all__ = ["cpu_model", "process_cpu", "processes_cpu", "two_process_scaling"]


def cpu_model() -> str:
    """The CPU's model name and its wide-vector features (Linux ``/proc/cpuinfo``): the shared reference box has
    been more than one kind of CPU, and virtual machines often hide the model behind a generic name."""
    name, flags = platform.processor() or "unknown", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    flags = [x for x in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if x in have]
                    break
    except OSError:
        pass
    return f"{name} ({', '.join(flags) or 'no AVX2'})"


def process_cpu(pid: int) -> tuple[str, float]:
    """A live process's name and its user + system CPU seconds (Linux ``/proc/<pid>/stat``); OSError once it is
    gone."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat.rsplit(")", 1)[1].split()
    return stat[stat.find("(") + 1 : stat.rfind(")")], (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def processes_cpu() -> dict[int, tuple[str, float]]:
    """pid -> (name, user + system CPU seconds) of every live process (:func:`process_cpu` for each)."""
    out = {}
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            out[pid] = process_cpu(pid)
        except OSError:  # gone meanwhile
            continue
    return out


def _spin(n: int) -> float:
    t0 = time.perf_counter()
    s = 0
    for i in range(n):
        s += i * i % 7
    return time.perf_counter() - t0


def two_process_scaling(n: int = 10_000_000, rounds: int = 3) -> dict:
    """How much two busy processes get from the machine right now, against one: the same pure-Python loop
    timed alone and then twice at once (fresh processes, ``spawn``), ``rounds`` times alternated.
    ``scaling`` is 2 x (time alone) / (time of the slower of the two), the median over rounds: the most a
    2-worker run can gain over a single process at this moment. On a shared virtual machine it falls well
    below 2 when the host is busy, and it can change within minutes."""
    ctx = multiprocessing.get_context("spawn")
    alone, pair = [], []
    with ctx.Pool(2) as pool:
        pool.map(_spin, [n // 10] * 2)  # start-up and imports out of the timing
        for _ in range(rounds):
            alone.append(pool.apply(_spin, (n,)))
            pair.append(max(pool.map(_spin, [n, n], chunksize=1)))
    ratios = [2 * a / b for a, b in zip(alone, pair)]
    return {"alone_s": alone, "pair_slower_s": pair, "scaling": statistics.median(ratios)}
