"""Offline validation of cluster/: launcher YAML, KubeRay manifests, Dockerfiles, secrets, bind addresses.

Independent references: Ray's own launcher validation (prepare_config + validate_config), the vendored
KubeRay CRD schemas (checked against the upstream files when ../shared is present), constraints.txt and
pyproject.toml, and the config schema for every ``--set`` key the manifests and docs use.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement

from diffusioninst.config import ExperimentConfig, load_config
from diffusioninst.config.loader import describe_keys

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
SHARED_CRDS = ROOT / ".." / "shared" / "reference" / "kuberay-crds"


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


validate = load_module(CLUSTER / "validate.py")
local_cluster = load_module(CLUSTER / "local_cluster.py")
vendor_crds = load_module(KUBERAY / "crds" / "vendor_crds.py")
CONSTRAINTS = validate.read_constraints(ROOT / "constraints.txt")


def launcher() -> dict:
    return yaml.safe_load((CLUSTER / "aws-a100.yaml").read_text())


def manifest(name: str) -> dict:
    return yaml.safe_load((KUBERAY / name).read_text())


def config_from_overrides(overrides: list[str]):
    """Validate ``--set`` values against the real schema (official defaults + the overrides)."""
    return load_config(ExperimentConfig, None, overrides)


# --------------------------------------------------------------------------------------------- launcher


def test_launcher_yaml_passes_rays_own_validation():
    prepared = validate.validate_launcher(launcher(), "aws-a100.yaml")
    nodes = prepared["available_node_types"]
    head = nodes[prepared["head_node_type"]]
    assert head["resources"]["CPU"] == 0 and head["resources"]["driver"] > 0
    gpu = nodes["gpu"]
    assert gpu["node_config"]["InstanceType"] in ("p4d.24xlarge", "p4de.24xlarge")
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 2
    assert nodes["gpu80"]["node_config"]["InstanceType"] == "p4de.24xlarge"
    docker = prepared["docker"]
    assert "REPLACE_ME" in docker["image"]
    assert any("--shm-size" in o for o in docker["worker_run_options"] + docker["head_run_options"])
    # token auth on every node, dashboard on loopback, token shipped from the user's machine
    assert "~/.ray/auth_token" in prepared["file_mounts"]
    head_start = " ".join(prepared["head_start_ray_commands"])
    worker_start = " ".join(prepared["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head_start and "RAY_AUTH_MODE=token" in worker_start
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "MLFLOW_TRACKING_URI=" in head_start and "MLFLOW_TRACKING_URI=" in worker_start
    assert "/mnt/efs" in " ".join(docker["run_options"])


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda c: c["available_node_types"]["gpu"].update(min_worker=1), "min_worker"),
        (lambda c: c.update(setup_comands=c.pop("setup_commands")), "setup_comands"),
        (lambda c: c["docker"].update(run_option=["--shm-size=1g"]), "run_option"),
        (lambda c: c.update(head_node_type="cpu_head"), "head_node_type"),
        (lambda c: c["available_node_types"]["gpu"].update(resources={"GPU": -1}), "-1"),
        (lambda c: c["available_node_types"]["gpu"].pop("node_config"), "node_config"),
    ],
    ids=["node-type-typo", "top-level-typo", "docker-typo", "missing-head-type", "negative-resource", "no-node-config"],
)
def test_launcher_mistakes_are_caught(mutate, expected):
    config = launcher()
    mutate(config)
    with pytest.raises(validate.ValidationError) as info:
        validate.validate_launcher(config, "aws-a100.yaml")
    assert expected in str(info.value) and "aws-a100.yaml" in str(info.value)


# --------------------------------------------------------------------------------------------- CRDs


def test_vendored_crd_schemas_are_the_upstream_ones():
    if not SHARED_CRDS.is_dir():
        pytest.skip("upstream KubeRay CRDs (../shared/reference/kuberay-crds) not present")
    readme = (KUBERAY / "crds" / "README.md").read_text()
    for kind, name in vendor_crds.CRDS.items():
        src = SHARED_CRDS / name
        assert vendor_crds.extract(src, kind) == json.loads(vendor_crds.output_path(kind).read_text())
        assert hashlib.sha256(src.read_bytes()).hexdigest() in readme


def test_strict_closes_objects_with_properties_only():
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "object", "properties": {"x": {"type": "integer"}}},
            "b": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {}},
            "c": {"type": "object", "additionalProperties": {"type": "string"}},
            "d": {"type": "array", "items": {"type": "object", "properties": {"y": {"type": "string"}}}},
        },
    }
    s = validate.strict(schema)
    assert s["additionalProperties"] is False
    assert s["properties"]["a"]["additionalProperties"] is False
    assert "additionalProperties" not in s["properties"]["b"]
    assert s["properties"]["c"]["additionalProperties"] == {"type": "string"}
    assert s["properties"]["d"]["items"]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # the input is not modified
    check = jsonschema.Draft4Validator(s)
    assert check.is_valid({"a": {"x": 1}, "b": {"anything": 1}, "c": {"k": "v"}, "d": [{"y": "z"}]})
    assert not check.is_valid({"d": [{"yy": "z"}]})


# --------------------------------------------------------------------------------------------- KubeRay


def test_every_kubernetes_manifest_parses_and_validates_strictly():
    kinds = set()
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in validate.validate_manifest_file(path):
            kinds.add(doc["kind"])
    assert {"RayCluster", "RayJob", "PersistentVolumeClaim", "Deployment", "Service", "ConfigMap"} <= kinds


def _errors_after(name: str, mutate) -> list[str]:
    doc = copy.deepcopy(manifest(name))
    mutate(doc)
    return validate.k8s_errors(doc, name)


def _worker_group(doc: dict) -> dict:
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    return spec["workerGroupSpecs"][0]


@pytest.mark.parametrize(
    "name, mutate, expected",
    [
        ("raycluster.yaml", lambda d: _worker_group(d).update(replica=2), "replica"),
        ("raycluster.yaml", lambda d: d["spec"].update(enableInTreeAutoscale=True), "enableInTreeAutoscale"),
        (
            "raycluster.yaml",
            lambda d: _worker_group(d)["template"]["spec"]["containers"][0].update(resource={}),
            "resource",
        ),
        ("raycluster.yaml", lambda d: d["spec"]["authOptions"].update(mode="tokens"), "tokens"),
        ("raycluster.yaml", lambda d: d.update(apiVersion="ray.io/v1alpha1"), "apiVersion"),
        ("raycluster.yaml", lambda d: _worker_group(d).pop("maxReplicas"), "maxReplicas"),
        ("rayjob.yaml", lambda d: d["spec"].update(shutdownAfterJobFinish=True), "shutdownAfterJobFinish"),
        ("rayjob.yaml", lambda d: _worker_group(d).update(minReplica=0), "minReplica"),
        ("rayjob.yaml", lambda d: d.update(kind="RayCluster"), "rayClusterSpec"),
        ("pvc.yaml", lambda d: d.update(apiVersion="apps/v1"), "apiVersion"),
    ],
    ids=[
        "worker-replica",
        "spec-typo",
        "container-typo",
        "auth-enum",
        "old-api",
        "missing-required",
        "rayjob-typo",
        "rayjob-cluster-typo",
        "kind-mismatch",
        "core-api",
    ],
)
def test_kuberay_mistakes_are_caught_in_strict_mode(name, mutate, expected):
    problems = _errors_after(name, mutate)
    assert problems and any(expected in p for p in problems), problems


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda c: c["ports"][0].update(containerPort="http"), "'http' is not of type 'integer'"),
        (lambda c: c.update(readinessProb={}), "readinessProb"),
        (lambda c: c["env"][0]["valueFrom"].update(secretKeyRefs={}), "secretKeyRefs"),
    ],
    ids=["type", "probe-typo", "env-typo"],
)
def test_deployment_pod_template_is_validated_strictly(mutate, expected):
    docs = list(yaml.safe_load_all((KUBERAY / "mlflow.yaml").read_text()))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    assert validate.k8s_errors(deployment) == []
    mutate(deployment["spec"]["template"]["spec"]["containers"][0])
    problems = validate.k8s_errors(deployment, "mlflow.yaml")
    assert any(expected in p and "spec.template.spec.containers.0" in p for p in problems), problems
    deployment = next(d for d in yaml.safe_load_all((KUBERAY / "mlflow.yaml").read_text()) if d["kind"] == "Deployment")
    deployment["spec"]["selector"]["matchLabels"] = {"app": "other"}
    assert any("selector" in p for p in validate.k8s_errors(deployment))


def test_plain_crd_schema_would_accept_a_typo():
    """Why strict mode: the CRD as published prunes unknown fields instead of rejecting them."""
    doc = copy.deepcopy(manifest("raycluster.yaml"))
    _worker_group(doc)["replica"] = 2
    plain = jsonschema.Draft4Validator(validate.crd_schema("RayCluster")["schema"])
    assert plain.is_valid(doc)
    assert validate.k8s_errors(doc)


def test_rayjob_uses_the_same_cluster_spec_as_raycluster():
    assert manifest("rayjob.yaml")["spec"]["rayClusterSpec"] == manifest("raycluster.yaml")["spec"]


def test_raycluster_gpu_workers_auth_storage_and_tracking():
    spec = manifest("raycluster.yaml")["spec"]
    assert spec["rayVersion"] == CONSTRAINTS["ray"]
    assert spec["authOptions"]["mode"] == "token"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    worker = spec["workerGroupSpecs"][0]
    assert worker["minReplicas"] == 0 and worker["maxReplicas"] >= 2
    pod = worker["template"]["spec"]
    container = pod["containers"][0]
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "8"
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert "A100" in pod["nodeSelector"]["nvidia.com/gpu.product"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert (
        volumes[mounts["/mnt/shared"]]["persistentVolumeClaim"]["claimName"] == manifest("pvc.yaml")["metadata"]["name"]
    )
    for group in [spec["headGroupSpec"], worker]:
        for c in group["template"]["spec"]["containers"]:
            env = {e["name"]: e for e in c["env"]}
            assert "configMapKeyRef" in env["MLFLOW_TRACKING_URI"]["valueFrom"]
            assert "REPLACE_ME" in c["image"]


def test_rayjob_entrypoint_is_a_valid_training_command():
    spec = manifest("rayjob.yaml")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    argv = shlex.split(spec["entrypoint"])
    assert argv[:4] == ["python", "pipelines/train.py", "--config", "experiments/coco_r50.yaml"]
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    cfg = config_from_overrides(overrides)  # every key exists, every value has the right type and range
    assert cfg.ray.num_workers == 16 and cfg.ray.use_gpu is True
    assert cfg.ray.storage_path.startswith("/mnt/shared/")
    # linear scaling from the official 5e-5 at 32 images
    assert cfg.solver.base_lr == pytest.approx(5e-5 * cfg.solver.ims_per_batch / 32)
    assert cfg.solver.max_iter * cfg.solver.ims_per_batch == 90000 * 32
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"] == "/home/ray/diffusioninst"


def test_mlflow_deployment_reads_credentials_from_secrets_and_sets_allowed_hosts():
    docs = {d["kind"]: d for d in yaml.safe_load_all((KUBERAY / "mlflow.yaml").read_text())}
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]
    assert env["MLFLOW_ARTIFACTS_DESTINATION"]["value"].startswith("s3://")
    allowed = container["args"][container["args"].index("--allowed-hosts") + 1].split(",")
    service = docs["Service"]["metadata"]["name"]
    uri = docs["ConfigMap"]["data"]["MLFLOW_TRACKING_URI"]
    assert uri == f"http://{service}:5000" and f"{service}:5000" in allowed and "*" not in allowed


# --------------------------------------------------------------------------------------------- Dockerfiles


def test_dockerfile_parser_handles_continuations_comments_and_unknown_instructions():
    text = "# syntax=docker/dockerfile:1\nARG X=1\nFROM base:1\nRUN a \\\n  # note\n  && b\nUSER app\n"
    ins = validate.parse_dockerfile(text)
    assert [(i.line, i.name, i.args) for i in ins] == [
        (2, "ARG", "X=1"),
        (3, "FROM", "base:1"),
        (4, "RUN", "a && b"),
        (7, "USER", "app"),
    ]
    with pytest.raises(validate.ValidationError, match="unknown instruction 'RUNN'"):
        validate.parse_dockerfile("FROM a\nRUNN b\n", "x")
    with pytest.raises(validate.ValidationError, match="continuation"):
        validate.parse_dockerfile("FROM a\nRUN b \\\n", "x")


def test_project_dockerfile_installs_the_constrained_versions():
    path = CLUSTER / "Dockerfile"
    ins = validate.parse_dockerfile(path.read_text(), str(path))
    assert ins[0].name == "FROM"
    base = ins[0].args.split()[0]
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-gpu", base)
    assert m, base
    assert m.group(1) == CONSTRAINTS["ray"]
    pyproject = (ROOT / "pyproject.toml").read_text()
    requires_python = re.search(r'requires-python\s*=\s*"([^"]+)"', pyproject).group(1)
    assert Requirement(f"python{requires_python}").specifier.contains(f"{m.group(2)}.{m.group(3)}")
    ray_req = next(Requirement(d) for d in re.findall(r'"(ray\[[^"]+)"', pyproject))
    assert ray_req.specifier.contains(CONSTRAINTS["ray"])
    copies = " ".join(i.args for i in ins if i.name == "COPY")
    assert "constraints.txt" in copies and "pyproject.toml" in copies
    installs = [i.args for i in ins if i.name == "RUN" and "pip install" in i.args]
    assert any("-c constraints.txt ." in a for a in installs)
    assert validate.dockerfile_errors(path, CONSTRAINTS) == []
    assert [i.args for i in ins if i.name == "USER"][-1] not in ("root", "0")


def test_mlflow_dockerfile_pins_mlflow_like_constraints():
    path = CLUSTER / "mlflow" / "Dockerfile"
    assert validate.dockerfile_errors(path, CONSTRAINTS) == []
    assert f"mlflow=={CONSTRAINTS['mlflow']}" in path.read_text()


@pytest.mark.parametrize(
    "body, expected",
    [
        ("FROM rayproject/ray:2.59.0-py311-gpu\nUSER ray\n", "has ray 2.59.0"),
        ("FROM python:3.11\nRUN pip install mlflow==3.0.0\nUSER app\n", "mlflow==3.0.0"),
        ("FROM python:3.11\nRUN pip install torch\nUSER app\n", "without a pin"),
        ("FROM python:3.11\nRUN pip install .\nUSER app\n", "without `-c constraints.txt`"),
        ("FROM python:3.11\nRUN true\n", "non-root USER"),
        ("FROM python:3.11\nUSER root\n", "non-root USER"),
        ("FROM python:3.11\nENV DB_PASSWORD=hunter2\nUSER app\n", "secret-like"),
        ("RUN true\nFROM python:3.11\nUSER app\n", "must be FROM"),
    ],
)
def test_dockerfile_mistakes_are_caught(tmp_path, body, expected):
    path = tmp_path / "Dockerfile"
    path.write_text(body)
    problems = validate.dockerfile_errors(path, CONSTRAINTS)
    assert any(expected in p for p in problems), problems


# --------------------------------------------------------------------------------------------- secrets


def test_no_credentials_in_cluster_files_or_docs():
    assert validate.scan_secrets([CLUSTER, ROOT / "docs" / "cluster.md", ROOT / ".dockerignore"]) == []


@pytest.mark.parametrize(
    "line, flagged",
    [
        ("aws_access_key_id = AKIAIOSFODNN7EXAMPLE", True),
        ("aws_secret_access_key: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", True),
        ("password: hunter22", True),
        ("uri: postgresql://mlflow:s3cret@db:5432/mlflow", True),
        ("-----BEGIN OPENSSH PRIVATE KEY-----", True),
        ("RAY_AUTH_TOKEN=3f9a0c1d2e3f4a5b6c7d8e9f0a1b2c3d", True),
        ("uri: postgresql://USER:PASSWORD@HOST:5432/mlflow", False),
        ("--from-literal=uri=postgresql://mlflow:$MLFLOW_DB_PASSWORD@host/mlflow", False),
        ("password: ${DB_PASSWORD}", False),
        ("secretName: diffusioninst-ray-token", False),
    ],
)
def test_secret_scanner(line, flagged):
    assert bool(validate.secret_findings(line, "f")) is flagged


def test_every_placeholder_is_explained_in_the_docs():
    docs = (ROOT / "docs" / "cluster.md").read_text()
    found = set()
    for path in CLUSTER.rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".sh", ".py", "") and "crds" not in path.parts:
            found |= set(re.findall(r"REPLACE_ME\w*", path.read_text()))
    assert {"REPLACE_ME", "REPLACE_ME_ACCOUNT", "REPLACE_ME_EFS_ID", "REPLACE_ME_REGISTRY"} <= found
    assert all(token in docs for token in found), sorted(t for t in found if t not in docs)


# --------------------------------------------------------------------------------------------- bind addresses


def test_mlflow_script_binds_loopback_unless_told_otherwise(tmp_path):
    script = CLUSTER / "mlflow" / "server.sh"

    def dry(*args: str) -> list[str]:
        out = subprocess.run(
            ["bash", str(script), "--dry-run", "--data-dir", str(tmp_path), *args],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "MLFLOW_HOST": "", "MLFLOW_SERVER_ALLOWED_HOSTS": ""},
        ).stdout
        return shlex.split(out)

    argv = dry()
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    allowed = argv[argv.index("--allowed-hosts") + 1].split(",")
    assert set(allowed) == {"localhost", "localhost:*", "127.0.0.1", "127.0.0.1:*"}
    assert argv[argv.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path}/mlflow.db"
    argv = dry("--host", "10.0.3.7")
    assert argv[argv.index("--host") + 1] == "10.0.3.7"
    assert "10.0.3.7:*" in argv[argv.index("--allowed-hosts") + 1].split(",")
    assert not any(tmp_path.iterdir())  # --dry-run creates nothing


def test_local_cluster_command_binds_loopback_with_explicit_ports(tmp_path):
    cluster = local_cluster.LocalCluster(
        root="/tmp/diray-test",
        host="127.0.0.1",
        ports=dict(zip(local_cluster.PORT_FLAGS, range(30000, 30011))),
        ray_bin="ray",
    )
    cmd = local_cluster.ray_start_command(cluster, num_cpus=2)
    opts = dict(zip(cmd[3::1], cmd[4::1]))
    assert opts["--dashboard-host"] == "127.0.0.1" and opts["--node-ip-address"] == "127.0.0.1"
    assert opts["--temp-dir"] == "/tmp/diray-test/ray"
    for flag in (
        "--port",
        "--dashboard-port",
        "--ray-client-server-port",
        "--min-worker-port",
        "--metrics-export-port",
    ):
        assert opts[flag].isdigit()
    assert "stop" not in cmd
    submit = cluster.submit_command(["python", "job.py"])
    assert submit[:5] == ["ray", "job", "submit", "--address", "http://127.0.0.1:30001"]
    assert cluster.client_env({"RAY_ADDRESS": "x"})["RAY_AUTH_MODE"] == "token"
    assert "RAY_ADDRESS" not in cluster.client_env({"RAY_ADDRESS": "x"})
    assert cluster.shell_command(submit).startswith("RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=/tmp/diray-test/")
    with pytest.raises(ValueError, match="too long"):
        local_cluster.start(tmp_path / ("x" * 60))


def test_free_ports_are_distinct_and_bindable():
    ports = local_cluster.free_ports(9)
    assert len(set(ports)) == 9
    lo, hi = local_cluster.free_port_range(20, exclude=ports)
    assert hi - lo == 19 and not set(range(lo, hi + 1)) & set(ports)


def _fake_head(root: Path) -> subprocess.Popen:
    """The shape of a Ray head: a session leader naming the cluster dir, plus a child in a session of its own
    (as job drivers are)."""
    code = (
        "import subprocess, sys, time; "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True); "
        "time.sleep(60)"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, f"--log_dir={root}/ray/session_x/logs"], start_new_session=True
    )


def _kill(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()


def test_stop_ends_the_session_and_its_detached_descendants_only(tmp_path):
    leader = _fake_head(tmp_path)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        cluster = local_cluster.LocalCluster(root=str(tmp_path), host="127.0.0.1", ports={}, session_id=leader.pid)
        local_cluster._save_state(cluster)
        deadline = time.monotonic() + 10
        while len(local_cluster.cluster_processes(cluster)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        members = local_cluster.cluster_processes(cluster)
        assert leader.pid in members and len(members) == 2
        assert bystander.pid not in members
        stopped = local_cluster.stop(tmp_path, grace=5)
        assert set(members) <= set(stopped)
        leader.wait(timeout=5)
        assert local_cluster.cluster_processes(cluster) == []
        assert bystander.poll() is None  # not ours to stop
    finally:
        _kill(leader, bystander)


def test_stop_leaves_a_session_that_does_not_name_the_cluster_dir(tmp_path):
    """A stale state file whose session id now belongs to someone else's processes: nothing is touched."""
    other = _fake_head(Path("/nonexistent/other-cluster"))
    try:
        cluster = local_cluster.LocalCluster(root=str(tmp_path), host="127.0.0.1", ports={}, session_id=other.pid)
        local_cluster._save_state(cluster)
        time.sleep(0.3)
        assert local_cluster.cluster_processes(cluster) == []
        assert local_cluster.stop(tmp_path, grace=1) == []
        assert other.poll() is None
    finally:
        _kill(other)


# --------------------------------------------------------------------------------------------- docs


def test_docs_use_only_real_config_keys_and_consistent_scaling():
    text = (ROOT / "docs" / "cluster.md").read_text()
    keys = {k for k, *_ in describe_keys(ExperimentConfig)}
    used = set(re.findall(r"--set '?([a-z_]+(?:\.[a-z_]+)*)=", text)) | set(re.findall(r"`([a-z_]+\.[a-z_.]+)`", text))
    used = {k for k in used if k.split(".")[0] in {"ray", "solver", "data", "tracking", "eval", "model", "name"}}
    assert used and used <= keys, sorted(used - keys)
    # the scaling table: each column is a valid config and follows the linear rule
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\| `([a-z_.]+)`(?: \(global\))? \| (.+) \|$", line)
        if m and (m.group(1).startswith("solver.") or m.group(1) in ("ray.num_workers", "ray.use_gpu")):
            rows[m.group(1)] = [c.strip() for c in m.group(2).split("|")]
    assert len(rows) == 9 and rows["ray.num_workers"] == ["1", "8", "16", "64"]
    for col in range(4):
        cfg = config_from_overrides([f"{k}={v[col]}" for k, v in rows.items()] + ["data.format=synthetic"])
        assert cfg.solver.base_lr == pytest.approx(5e-5 * cfg.solver.ims_per_batch / 32)
        assert cfg.solver.max_iter * cfg.solver.ims_per_batch == 90000 * 32
        per_gpu = cfg.solver.ims_per_batch // (cfg.ray.num_workers * cfg.solver.grad_accum_steps)
        assert per_gpu == 4


def test_cluster_validate_cli_reports_ok_for_this_repo():
    out = subprocess.run([sys.executable, str(CLUSTER / "validate.py")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "OK"
