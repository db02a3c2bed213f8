"""End to end on this machine: a local token-protected Ray head, ``ray job submit``, the MLflow server script.

The module-scoped fixture starts ONE local head through ``cluster/local_cluster.py`` (127.0.0.1, free
ports, its own temp dir and token) and stops exactly that cluster afterwards, whether the tests passed or
not. Jobs go through the real CLI (``ray job submit --working-dir ...``) with ``RAY_AUTH_MODE=token``; their
status is read from the dashboard's REST API.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "pipelines" / "train.py"
TRAIN_IS_PLACEHOLDER = "placeholder until the training issue lands" in TRAIN.read_text()
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}

pytestmark = pytest.mark.slow


def _load_local_cluster():
    path = ROOT / "cluster" / "local_cluster.py"
    spec = importlib.util.spec_from_file_location("local_cluster", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["local_cluster"] = module
    spec.loader.exec_module(module)
    return module


lc = _load_local_cluster()


def test_mlflow_server_script_serves_guards_hosts_and_stops(tmp_path):
    """cluster/mlflow/server.sh --background: healthy on loopback, 403 for foreign Host headers, clean stop."""
    port = lc.free_ports(1)[0]
    state = tmp_path / "mlflow"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for var in ("MLFLOW_HOST", "MLFLOW_BACKEND_STORE_URI", "MLFLOW_SERVER_ALLOWED_HOSTS", "MLFLOW_TRACKING_URI"):
        env.pop(var, None)
    script = ROOT / "cluster" / "mlflow" / "server.sh"
    started = subprocess.run(
        ["bash", str(script), "--port", str(port), "--background", str(state)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        assert started.returncode == 0, started.stderr
        assert f"MLFLOW_TRACKING_URI=http://127.0.0.1:{port}" in started.stdout
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search"
        body = json.dumps({"max_results": 5}).encode()

        def status(host: str) -> int:
            req = urllib.request.Request(url, data=body, headers={"Host": host, "Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    return resp.status
            except urllib.error.HTTPError as e:
                return e.code

        assert status(f"127.0.0.1:{port}") == 200
        assert status("attacker.example.com") == 403
        assert (state / "mlflow.db").is_file()
    finally:
        stopped = subprocess.run(["bash", str(script), "stop", str(state)], capture_output=True, text=True, timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    pgid = int(stopped.stdout.split("process group ")[1].rstrip(")\n"))
    alive = subprocess.run(["kill", "-0", "--", f"-{pgid}"], capture_output=True)
    assert alive.returncode != 0, "MLflow server processes survived stop"


@pytest.fixture(scope="module")
def cluster():
    # A short dir under /tmp: Ray's unix socket paths must stay under 107 characters.
    root = Path(tempfile.mkdtemp(prefix="diray-", dir="/tmp" if os.path.isdir("/tmp") else None))
    try:
        handle = lc.start(root, num_cpus=4)
    except BaseException:
        if (root / lc.STATE_FILE).exists():
            lc.stop(root)
        shutil.rmtree(root, ignore_errors=True)
        raise
    try:
        yield handle
    finally:
        lc.stop(root)
        left = lc.cluster_processes(handle)
        shutil.rmtree(root, ignore_errors=True)
        assert left == [], f"processes of the test cluster survived stop(): {left}"


def submit(cluster, entrypoint: list[str], working_dir: Path, env: dict | None = None) -> str:
    """``ray job submit --no-wait`` through the CLI with token auth; returns the submission id."""
    job_id = f"test-{uuid.uuid4().hex[:8]}"
    argv = cluster.submit_command(entrypoint, str(working_dir), options=["--submission-id", job_id, "--no-wait"])
    out = subprocess.run(argv, env=env or cluster.client_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"ray job submit failed:\n{out.stdout}\n{out.stderr}"
    return job_id


def wait_for(cluster, job_id: str, timeout: float) -> dict:
    """Poll ``GET /api/jobs/<id>`` until a terminal status; on timeout stop the job and fail with its logs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = cluster.request(f"/api/jobs/{job_id}")
        if info["status"] in TERMINAL:
            return info
        time.sleep(1.0)
    cluster.request(f"/api/jobs/{job_id}/stop", method="POST", body={})
    pytest.fail(f"job {job_id} did not finish in {timeout:.0f} s; logs:\n{logs(cluster, job_id)[-4000:]}")


def logs(cluster, job_id: str) -> str:
    return cluster.request(f"/api/jobs/{job_id}/logs").get("logs", "")


JOB_SCRIPT = """\
import json, os, sys
import ray

ray.init()  # the job's RAY_ADDRESS: the cluster it was submitted to

@ray.remote
def square(x):
    return x * x

result = {
    "squares": ray.get([square.remote(i) for i in range(5)]),
    "cpus": ray.cluster_resources().get("CPU"),
    "cwd_has_script": os.path.exists("job.py"),
}
with open(sys.argv[1], "w") as f:
    json.dump(result, f)
print("JOB-DONE", result)
"""


@pytest.mark.ray
def test_job_round_trip_with_token_auth(cluster, tmp_path):
    """The infrastructure itself: submit a tiny job from a working dir, wait for SUCCEEDED, read its result."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "job.py").write_text(JOB_SCRIPT)
    result_path = tmp_path / "result.json"

    # Token auth is on: a client that does not send the token is refused.
    no_token = cluster.client_env()
    no_token["RAY_AUTH_MODE"] = "disabled"
    argv = cluster.submit_command(["python", "job.py", str(result_path)], str(work), options=["--no-wait"])
    refused = subprocess.run(argv, env=no_token, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert "auth" in (refused.stdout + refused.stderr).lower()
    request = urllib.request.Request(cluster.dashboard_url + "/api/jobs/")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 401

    job_id = submit(cluster, ["python", "job.py", str(result_path)], work)
    info = wait_for(cluster, job_id, timeout=90)
    assert info["status"] == "SUCCEEDED", logs(cluster, job_id)[-4000:]
    result = json.loads(result_path.read_text())
    assert result == {"squares": [0, 1, 4, 9, 16], "cpus": 4.0, "cwd_has_script": True}
    assert "JOB-DONE" in logs(cluster, job_id)


@pytest.mark.ray
@pytest.mark.xfail(
    TRAIN_IS_PLACEHOLDER,
    reason="needs pipelines/train.py (training issue): the placeholder logs nothing to MLflow",
    strict=False,
)
def test_demo_training_job_logs_to_mlflow(cluster, tmp_path):
    """The real job: demo training with tiny overrides, submitted with the repository as working dir."""
    out = tmp_path / "out"
    out.mkdir()
    db = out / "mlflow.db"
    overrides = {
        "name": "e2e-demo",
        "solver.max_iter": "4",
        "solver.steps": "[2]",
        "solver.warmup_iters": "1",
        "solver.checkpoint_period": "2",
        "solver.log_period": "1",
        "solver.ims_per_batch": "2",
        "data.synthetic.num_train": "8",
        "data.synthetic.num_val": "2",
        "data.synthetic.root": str(out / "synthetic"),
        "eval.max_images": "2",
        "eval.steps": "[1]",
        "ray.num_workers": "1",
        "ray.cpus_per_worker": "1",
        "ray.storage_path": str(out / "runs"),
        "tracking.tracking_uri": f"sqlite:///{db}",
        "tracking.experiment_name": "e2e-cluster",
        "output_dir": str(out / "outputs"),
    }
    entrypoint = ["python", "pipelines/train.py"]
    for key, value in overrides.items():
        entrypoint += ["--set", f"{key}={value}"]
    job_id = submit(cluster, entrypoint, ROOT)
    info = wait_for(cluster, job_id, timeout=150)
    assert info["status"] == "SUCCEEDED", logs(cluster, job_id)[-4000:]

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("e2e-cluster")
    assert experiment is not None, "no MLflow experiment was created by the job"
    runs = client.search_runs([experiment.experiment_id])
    assert runs, "no MLflow run was logged by the job"
    metric_keys = {k for r in runs for k in r.data.metrics}
    assert any(k.startswith("train/") for k in metric_keys), sorted(metric_keys)
    assert any((out / "runs").rglob("*")), "nothing was written to ray.storage_path"
