"""End to end: the training pipeline on Ray Train with 2 workers, killed and resumed, plus failure handling.

The driver is run as a subprocess (as a user would), killed with SIGKILL (its whole process group, i.e. the
local Ray it started) after the first checkpoint, and re-run with the same command, which must resume.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "pipelines" / "train.py"


def tiny_overrides(tmp: Path, name: str = "e2e") -> list[str]:
    """A few-second-per-iteration config on a tiny synthetic dataset, everything under ``tmp``."""
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
        "solver.max_iter=8",
        "solver.steps=[6]",
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


def wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if text in log.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended ({proc.returncode}) before '{text}':\n{log.read_text()[-4000:]}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for '{text}':\n{log.read_text()[-4000:]}")


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
        wait_for(log1, "iter 4/8", proc, timeout=420)
        ckpt = tmp_path / "runs" / "e2e" / "checkpoint_0000004"
        deadline = time.time() + 120
        while not (ckpt / "state.pt").is_file() and time.time() < deadline:
            time.sleep(0.5)
        assert (ckpt / "state.pt").is_file(), log1.read_text()[-3000:]
        time.sleep(2)  # let the controller register the checkpoint
    finally:
        kill_group(proc)
    first_runs = mlflow_run(tmp_path)[1]
    assert len(first_runs) == 1

    log2 = tmp_path / "second.log"
    out = subprocess.run(run_cmd(args), capture_output=True, text=True, cwd=ROOT, timeout=600)
    log2.write_text(out.stdout + out.stderr)
    assert out.returncode == 0, log2.read_text()[-5000:]
    text = log2.read_text()
    assert "resuming from iteration 4" in text, text[-4000:]
    assert "iter 2/8" not in text  # did not start over
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
    assert set(steps_logged) == {2, 4, 6, 8} and steps_logged[-1] == 8
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
        wait_for(log, "iter 6/8", proc, timeout=420)
        workers = subprocess.run(["pgrep", "-f", "RayTrainWorker"], capture_output=True, text=True).stdout.split()
        mine = [int(p) for p in workers if _in_session(int(p), proc.pid)]
        assert mine, f"no Ray Train worker of this run found among {workers}"
        os.kill(mine[-1], signal.SIGKILL)
        proc.wait(timeout=420)
    finally:
        kill_group(proc)
    text = log.read_text()
    assert proc.returncode == 0, text[-5000:]
    assert "resuming from iteration 4" in text, text[-4000:]  # the new worker group restored the checkpoint
    assert (tmp_path / "runs" / "e2e_fail" / "checkpoint_0000008" / "state.pt").is_file()


def _in_session(pid: int, sid: int) -> bool:
    try:
        return os.getsid(pid) == sid
    except ProcessLookupError:
        return False
