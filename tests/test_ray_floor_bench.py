"""Ray's floor benchmark (benchmarks/ray_floor.py): who a process is, CPU by role, and the bound it implies."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from ray_floor import best_ratio, cpu_by_role, processes_cpu, role

SITE = "/venv/lib/python3.11/site-packages"


def test_role_tells_ray_processes_from_the_hosts():
    me, tasks = os.getpid(), {101, 102}
    assert role(me, "python bench.py", tasks) == "driver"
    assert role(101, "ray::IDLE", tasks) == "task workers"
    assert role(103, "ray::_StatsActor", tasks) == "Ray Data actors and other Ray workers"
    assert role(104, f"{SITE}/ray/core/src/ray/raylet/raylet --raylet_socket_name=x", tasks) == "raylet and GCS"
    assert role(105, f"{SITE}/ray/core/src/ray/gcs/gcs_server --log_dir=x", tasks) == "raylet and GCS"
    assert role(106, f"/venv/bin/python -u {SITE}/ray/_private/log_monitor.py --session-dir=x", tasks) == (
        "Ray's Python services"
    )
    assert role(107, "[kdamond.0]", tasks) == "host"
    assert role(108, "/process_api --addr 0.0.0.0:2024", tasks) == "host"


def test_cpu_by_role_sums_each_processes_growth_and_counts_new_processes_whole():
    before = {1: ("ray::IDLE", 2.0), 2: ("ray::_StatsActor", 5.0), 3: ("[kworker/0:1]", 1.0)}
    after = {1: ("ray::IDLE", 2.5), 2: ("ray::_StatsActor", 5.25), 3: ("[kworker/0:1]", 1.5), 4: ("ray::_X", 0.125)}
    used = cpu_by_role(before, after, task_pids={1})
    assert used["task workers"] == pytest.approx(0.5)
    assert used["Ray Data actors and other Ray workers"] == pytest.approx(0.375)
    assert used["host"] == pytest.approx(0.5)
    assert used["driver"] == 0.0


def test_processes_cpu_sees_this_process_and_its_cpu_grows():
    before = processes_cpu()[os.getpid()]
    sum(i * i for i in range(3_000_000))
    name, cpu = processes_cpu()[os.getpid()]
    assert "python" in name and cpu > before[1]


def test_best_ratio_closed_form():
    # no serial part, no latency, Ray takes nothing: a perfect host gives exactly the CPU count
    assert best_ratio(0.0, 10.0, 0.0, 0.0) == pytest.approx(2.0)
    # Ray takes 5% of 2 CPUs: the work runs at 1.9 CPUs
    assert best_ratio(0.0, 10.0, 0.05, 0.0) == pytest.approx(1.9)
    # 1 s serial, 0.5 s latency, 10 s of work at 1.9 CPUs: 11 / (1 + 0.5 + 10 / 1.9)
    assert best_ratio(1.0, 10.0, 0.05, 0.5) == pytest.approx(11 / (1.5 + 10 / 1.9))
    # a host whose two processes get 1.9x one alone: efficiency 0.95 per CPU
    assert best_ratio(0.0, 10.0, 0.0, 0.0, efficiency=0.95) == pytest.approx(1.9)
    assert best_ratio(0.0, 10.0, 0.0, 0.0, cpus=1) == pytest.approx(1.0)
