"""End to end: the training pipeline on Ray Train with 2 workers, killed and resumed, plus failure handling.

The driver is run as a subprocess (as a user would), killed with SIGKILL (its whole process group, i.e. the
local Ray it started) after the first checkpoint, and re-run with the same command, which must resume.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "pipelines" / "train.py"
# Enough iterations that a kill timed on the first checkpoint file always lands mid-run: the driver's log lines
# arrive late through Ray's log monitor, and a fast machine runs 8 tiny iterations in about two seconds.
MAX_ITER = 24


def tiny_overrides(tmp: Path, name: str = "e2e") -> list[str]:
    """A fraction-of-a-second-per-iteration config on a tiny synthetic dataset, everything under ``tmp``."""
    return [
        f"name={name}",
        f"output_dir={tmp / 'out'}",
        f"ray.storage_path={tmp / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
        f"data.synthetic.root={tmp / 'synthetic'}",
        "data.synthetic.num_train=16",
        "data.synthetic.num_val=4",
        "data.synthetic.image_size=[160,160]",
        "data.synthetic.max_object_size=80",
        "data.augmentation.min_size_train=[160]",
        "data.augmentation.max_size_train=267",
        "data.augmentation.min_size_test=160",
        "data.augmentation.max_size_test=267",
        "model.head.num_proposals=20",
        "solver.ims_per_batch=2",
        f"solver.max_iter={MAX_ITER}",
        f"solver.steps=[{MAX_ITER * 3 // 4}]",
        "solver.warmup_iters=2",
        "solver.checkpoint_period=4",
        "solver.log_period=2",
        "eval.max_images=4",
        "eval.steps=[1,2]",
        "ray.num_workers=2",
        "ray.cpus_per_worker=1",
        "ray.max_failures=0",
    ]


def run_cmd(args: list[str]) -> list[str]:
    return [sys.executable, str(TRAIN), "--set", *args]


def start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        run_cmd(args), stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True
    )


def wait_for_registered_checkpoint(run_dir: Path, proc: subprocess.Popen, log: Path, timeout: float = 420) -> int:
    """Wait until Ray Train's controller has registered a checkpoint of ``run_dir``; return its iteration.

    A checkpoint folder on disk is not yet resumable: the controller records it in its snapshot file
    only after the report that uploaded it has been processed.
    """
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
        except (FileNotFoundError, json.JSONDecodeError):
            latest = None
        if latest:
            return int(latest["metrics"]["iteration"])
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint registered in {snapshot}:\n{log.read_text()[-4000:]}")


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def mlflow_run(tmp: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name("diffusioninst-demo")
    runs = client.search_runs([exp.experiment_id])
    return client, runs


@pytest.mark.slow
@pytest.mark.ray
def test_two_workers_checkpoint_kill_resume_and_report(tmp_path):
    args = tiny_overrides(tmp_path)
    log1 = tmp_path / "first.log"
    proc = start(args, log1)
    try:
        registered = wait_for_registered_checkpoint(tmp_path / "runs" / "e2e", proc, log1)
    finally:
        kill_group(proc)
    first_runs = mlflow_run(tmp_path)[1]
    assert len(first_runs) == 1

    log2 = tmp_path / "second.log"
    out = subprocess.run(run_cmd(args), capture_output=True, text=True, cwd=ROOT, timeout=600)
    log2.write_text(out.stdout + out.stderr)
    assert out.returncode == 0, log2.read_text()[-5000:]
    text = log2.read_text()
    resumed = [int(i) for i in re.findall(r"resuming from iteration (\d+)", text)]
    assert len(resumed) == 1 and registered <= resumed[0] < MAX_ITER and resumed[0] % 4 == 0, text[-4000:]
    logged = [int(i) for i in re.findall(rf"iter (\d+)/{MAX_ITER}", text)]
    assert logged and min(logged) > resumed[0] and max(logged) == MAX_ITER  # did not start over
    assert "| steps | task |" in text  # the AP table is printed

    table = (tmp_path / "out" / "eval" / "ap_table.md").read_text()
    assert "segm" in table and "bbox" in table
    rows = json.loads((tmp_path / "out" / "eval" / "ap_table.json").read_text())
    assert rows

    client, runs = mlflow_run(tmp_path)
    assert len(runs) == 1 and runs[0].info.run_id == first_runs[0].info.run_id  # the resumed run kept logging
    run = runs[0]
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    for key in ("train/loss", "train/loss_ce", "train/loss_masks", "train/lr", "train/img_per_s"):
        assert key in metrics, sorted(metrics)
    for steps in (1, 2):
        for task in ("bbox", "segm"):
            for col in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
                assert f"eval/steps_{steps}/{task}/{col}" in metrics
    steps_logged = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    # iterations after the last checkpoint are trained (and logged) again by the resumed run
    assert set(steps_logged) == set(range(2, MAX_ITER + 1, 2)) and steps_logged[-1] == MAX_ITER
    assert run.data.params["model.head.num_proposals"] == "20"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"eval", "plots", "checkpoint", "config"} <= artifacts, artifacts
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/loss_curve.png", "plots/predictions.png"} <= plots


@pytest.mark.slow
@pytest.mark.ray
def test_worker_killed_mid_run_is_restarted_from_checkpoint(tmp_path):
    args = [*tiny_overrides(tmp_path, name="e2e_fail"), "ray.max_failures=1", "eval.at_end=false"]
    log = tmp_path / "run.log"
    proc = start(args, log)
    try:
        registered = wait_for_registered_checkpoint(tmp_path / "runs" / "e2e_fail", proc, log)
        workers = subprocess.run(["pgrep", "-f", "RayTrainWorker"], capture_output=True, text=True).stdout.split()
        mine = [int(p) for p in workers if _in_session(int(p), proc.pid)]
        assert mine, f"no Ray Train worker of this run found among {workers}"
        os.kill(mine[-1], signal.SIGKILL)
        proc.wait(timeout=420)
    finally:
        kill_group(proc)
    text = log.read_text()
    assert proc.returncode == 0, text[-5000:]
    resumed = [int(i) for i in re.findall(r"resuming from iteration (\d+)", text)]
    # exactly one restart, from a checkpoint registered before the kill (or a later one) and before the end
    assert len(resumed) == 1 and registered <= resumed[0] < MAX_ITER and resumed[0] % 4 == 0, text[-4000:]
    assert (tmp_path / "runs" / "e2e_fail" / f"checkpoint_{MAX_ITER:07d}" / "state.pt").is_file()


def _in_session(pid: int, sid: int) -> bool:
    try:
        return os.getsid(pid) == sid
    except ProcessLookupError:
        return False
