"""Start and stop a LOCAL Ray head for trying the ``ray job submit`` workflow on one machine.

    python cluster/local_cluster.py start [--dir DIR] [--num-cpus N] [--num-gpus N]
    python cluster/local_cluster.py status --dir DIR
    python cluster/local_cluster.py stop --dir DIR

``start`` runs ``ray start --head`` with every port explicit and free, the dashboard / job API bound to
127.0.0.1, token authentication on (a fresh token in ``DIR/auth_token``, mode 0600) and all Ray files under
``DIR/ray``. It prints the exact ``ray job submit`` command to use. ``stop`` ends only the processes this
cluster started: everything in the Unix session of its ``ray start`` plus their descendants (job drivers run
in sessions of their own). It never calls ``ray stop``, which would end every Ray process of the user.

Ray itself binds the GCS and raylet ports on all interfaces whatever ``--node-ip-address`` says (only the
dashboard honours the host); token authentication is what protects them.

Standard library only, so it runs from any Python that has ``ray[default]`` next to it. Linux or macOS.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

STATE_FILE = "cluster.json"
TOKEN_FILE = "auth_token"
# Ray creates AF_UNIX sockets at <temp-dir>/session_<timestamp>_<pid>/sockets/<name>: about 70 characters
# below the temp dir, and Linux allows 107 in total.
MAX_TEMP_DIR_CHARS = 40
REPO_ROOT = Path(__file__).resolve().parents[1]

# `ray start` flag of every port we choose (all explicit, so two local clusters never collide).
PORT_FLAGS = {
    "gcs": "--port",
    "dashboard": "--dashboard-port",
    "client_server": "--ray-client-server-port",
    "node_manager": "--node-manager-port",
    "object_manager": "--object-manager-port",
    "dashboard_agent_listen": "--dashboard-agent-listen-port",
    "dashboard_agent_grpc": "--dashboard-agent-grpc-port",
    "runtime_env_agent": "--runtime-env-agent-port",
    "metrics_export": "--metrics-export-port",
    "min_worker": "--min-worker-port",
    "max_worker": "--max-worker-port",
}
_SINGLE_PORTS = [name for name in PORT_FLAGS if name not in ("min_worker", "max_worker")]


@dataclass
class LocalCluster:
    """What ``start`` created; saved as ``root/cluster.json`` so ``stop`` works from another process."""

    root: str
    host: str
    ports: dict[str, int]
    session_id: int = 0
    ray_bin: str = ""

    @property
    def token_path(self) -> Path:
        return Path(self.root) / TOKEN_FILE

    @property
    def temp_dir(self) -> Path:
        return Path(self.root) / "ray"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.host}:{self.ports['dashboard']}"

    def client_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for Ray clients (``ray job ...``): token auth on, this cluster's token, no stray address."""
        env = dict(os.environ if base is None else base)
        env.pop("RAY_ADDRESS", None)
        env.pop("RAY_AUTH_TOKEN", None)
        env["RAY_AUTH_MODE"] = "token"
        env["RAY_AUTH_TOKEN_PATH"] = str(self.token_path)
        return env

    def submit_command(
        self, entrypoint: Sequence[str], working_dir: str = ".", options: Sequence[str] = ()
    ) -> list[str]:
        """argv of ``ray job submit`` for this cluster (run it with :meth:`client_env`)."""
        return [
            self.ray_bin or "ray",
            "job",
            "submit",
            "--address",
            self.dashboard_url,
            "--working-dir",
            working_dir,
            *options,
            "--",
            *entrypoint,
        ]

    def shell_command(self, argv: Sequence[str]) -> str:
        """A copy-pasteable shell line: the two auth variables, then ``argv``."""
        ray = argv[0]
        if shutil.which("ray") and Path(shutil.which("ray")).resolve() == Path(ray).resolve():
            ray = "ray"
        env = f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={shlex.quote(str(self.token_path))}"
        return " ".join([env, shlex.quote(ray), *(shlex.quote(a) for a in argv[1:])])

    def request(self, path: str, method: str = "GET", body: dict | None = None, timeout: float = 10.0) -> dict:
        """Call the dashboard's REST API (e.g. ``/api/jobs/<id>``) with this cluster's token; returns JSON."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.dashboard_url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token_path.read_text().strip()}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else {}


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports the OS reports free on ``host`` now (all sockets held open while choosing)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port_range(size: int, exclude: Sequence[int] = (), rng: random.Random | None = None) -> tuple[int, int]:
    """A contiguous range of ``size`` ports, all bindable on every interface, avoiding ``exclude``."""
    rng = rng or random.Random(os.getpid())
    for _ in range(200):
        lo = rng.randrange(20000, 60000 - size)
        ports = range(lo, lo + size)
        if any(p in exclude for p in ports):
            continue
        if all(_bindable(p) for p in ports):
            return lo, lo + size - 1
    raise RuntimeError(f"no free range of {size} ports found between 20000 and 60000")


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def start(
    root: str | Path | None = None,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    resources: dict[str, float] | None = None,
    host: str = "127.0.0.1",
    worker_ports: int = 200,
    timeout: float = 90.0,
) -> LocalCluster:
    """Start a token-authenticated local Ray head whose files all live in ``root`` (a new temp dir if None).

    Raises ``RuntimeError`` with the tail of ``ray start``'s log if it fails; whatever it had started is
    stopped first.
    """
    if root is None:
        root = tempfile.mkdtemp(prefix="diray-", dir="/tmp" if os.path.isdir("/tmp") else None)
    root = Path(root).resolve()
    if len(str(root / "ray")) > MAX_TEMP_DIR_CHARS:
        raise ValueError(
            f"cluster dir {root} is too long for Ray's unix sockets (keep '<dir>/ray' within "
            f"{MAX_TEMP_DIR_CHARS} characters, e.g. /tmp/diray-xxxx)"
        )
    root.mkdir(parents=True, exist_ok=True)
    state_path = root / STATE_FILE
    if state_path.exists() and _alive(load(root)):
        raise RuntimeError(f"a local cluster from {root} is still running; stop it first")

    ray_bin = _ray_executable()
    ports = dict(zip(_SINGLE_PORTS, free_ports(len(_SINGLE_PORTS), host)))
    lo, hi = free_port_range(worker_ports, exclude=list(ports.values()))
    ports.update(min_worker=lo, max_worker=hi)
    bindir = str(Path(sys.executable).parent)
    cluster = LocalCluster(root=str(root), host=host, ports=ports, ray_bin=ray_bin)

    fd = os.open(cluster.token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))

    cmd = ray_start_command(cluster, num_cpus=num_cpus, num_gpus=num_gpus, resources=resources)
    env = cluster.client_env()
    # Job entrypoints run with this PATH: `python` must be the interpreter that has diffusioninst's deps.
    env["PATH"] = os.pathsep.join([bindir, env.get("PATH", "")])
    log_path = root / "ray_start.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    cluster.session_id = proc.pid  # start_new_session: the session id is the pid of `ray start`
    _save_state(cluster)
    try:
        rc = proc.wait(timeout=timeout)
        if rc != 0:
            raise RuntimeError(f"`ray start` exited with {rc}")
        _wait_for_dashboard(cluster, deadline=time.monotonic() + timeout)
    except Exception as e:
        stop(root)
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"local Ray head did not start ({e}); {log_path}:\n{tail}") from e
    return cluster


def ray_start_command(
    cluster: LocalCluster,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    resources: dict[str, float] | None = None,
) -> list[str]:
    """argv of the ``ray start --head`` that :func:`start` runs: explicit ports, dashboard on ``cluster.host``."""
    ports = cluster.ports
    cmd = [cluster.ray_bin or "ray", "start", "--head", "--node-ip-address", cluster.host]
    cmd += ["--dashboard-host", cluster.host, "--include-dashboard=true"]
    for name, flag in PORT_FLAGS.items():
        cmd += [flag, str(ports[name])]
    cmd += ["--temp-dir", str(cluster.temp_dir), "--disable-usage-stats"]
    if num_cpus is not None:
        cmd += ["--num-cpus", str(num_cpus)]
    if num_gpus is not None:
        cmd += ["--num-gpus", str(num_gpus)]
    if resources:
        cmd += ["--resources", json.dumps(resources)]
    return cmd


def _ray_executable() -> str:
    candidate = Path(sys.executable).parent / "ray"
    found = str(candidate) if candidate.exists() else shutil.which("ray")
    if not found:
        raise RuntimeError("the `ray` CLI was not found next to this Python or on PATH; pip install 'ray[default]'")
    return found


def _wait_for_dashboard(cluster: LocalCluster, deadline: float) -> None:
    last = ""
    while time.monotonic() < deadline:
        try:
            cluster.request("/api/version", timeout=5)
            return
        except (urllib.error.URLError, ConnectionError, OSError, ValueError) as e:
            last = str(e)
        time.sleep(0.5)
    raise TimeoutError(f"dashboard {cluster.dashboard_url} did not answer: {last}")


def _save_state(cluster: LocalCluster) -> None:
    path = Path(cluster.root) / STATE_FILE
    path.write_text(json.dumps(asdict(cluster), indent=2) + "\n")


def load(root: str | Path) -> LocalCluster:
    """The cluster started in ``root`` (from its ``cluster.json``)."""
    path = Path(root) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no local cluster state here (was it started with --dir {root}?)")
    return LocalCluster(**json.loads(path.read_text()))


# --------------------------------------------------------------------------------------------- processes


def _process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, session id, state letter) of every process visible to us."""
    table: dict[int, tuple[int, int, str]] = {}
    proc = Path("/proc")
    if proc.is_dir() and (proc / "self" / "stat").exists():
        for entry in proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
            table[int(entry.name)] = (int(fields[1]), int(fields[3]), fields[0])
        return table
    out = subprocess.run(["ps", "-A", "-o", "pid=,ppid=,stat="], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        pid_s, ppid_s, state = line.split()[:3]
        try:
            sid = os.getsid(int(pid_s))
        except OSError:
            continue
        table[int(pid_s)] = (int(ppid_s), sid, state[0])
    return table


def cluster_processes(cluster: LocalCluster) -> list[int]:
    """Live pids of this cluster: its ``ray start`` session and every descendant (zombies excluded).

    Guard against a reused session id (stale state file): the session counts as ours only while one of its
    members names ``cluster.root`` on its command line (the GCS, raylet and dashboard all do).
    """
    table = _process_table()
    live = {pid: v for pid, v in table.items() if v[2] != "Z"}
    members = {pid for pid, (_, sid, _) in live.items() if sid == cluster.session_id}
    if not any(cluster.root + os.sep in _cmdline(pid) for pid in members):
        return []
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in live.items():
        children.setdefault(ppid, []).append(pid)
    stack = list(members)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in members:
                members.add(child)
                stack.append(child)
    members.discard(os.getpid())
    return sorted(members)


def _alive(cluster: LocalCluster) -> bool:
    return cluster.session_id > 0 and bool(cluster_processes(cluster))


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        pass
    if Path("/proc/self").exists():
        return ""
    out = subprocess.run(["ps", "-p", str(pid), "-o", "command="], capture_output=True, text=True)
    return out.stdout.strip()


def stop(root: str | Path, grace: float = 10.0) -> list[int]:
    """End every process of the cluster in ``root``; returns the pids signalled. Safe to call twice.

    Order as ``ray stop`` uses, but restricted to our pids: raylet first (its workers and agents follow),
    then everything else, then the GCS. SIGTERM, ``grace`` seconds, then SIGKILL.
    """
    cluster = load(root)
    if cluster.session_id <= 0:
        return []
    # Snapshot while the tree is intact: once a job supervisor dies, its driver is re-parented and unlinked.
    initial = cluster_processes(cluster)
    signalled: list[int] = []
    for bucket in ("raylet", "other", "gcs_server"):
        signalled += _terminate([p for p in initial if _bucket(_cmdline(p)) == bucket], grace)
    # Stragglers forked while we were stopping.
    signalled += _terminate([p for p in cluster_processes(cluster) if p not in signalled], grace)
    return sorted(set(signalled))


def _bucket(cmdline: str) -> str:
    first = cmdline.split(" ", 1)[0]
    if first.endswith("/raylet") or first == "raylet":
        return "raylet"
    if first.endswith("/gcs_server") or first == "gcs_server":
        return "gcs_server"
    return "other"


def _terminate(pids: list[int], grace: float) -> list[int]:
    sent = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
            sent.append(pid)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_running(p) for p in sent):
        time.sleep(0.2)
    for pid in sent:
        if _running(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return sent


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        try:
            text = stat.read_text()
            return text[text.rindex(")") + 2] != "Z"
        except (OSError, IndexError):
            return False
    return True


# --------------------------------------------------------------------------------------------- CLI


def local_train_entrypoint(repo_root: Path = REPO_ROOT) -> list[str]:
    """The demo training command for a job on the local cluster.

    A job runs in a copy of the working dir inside the Ray session, so every output path is made absolute
    (relative ones would be written into that copy and lost).
    """
    root = repo_root.resolve()
    return [
        "python",
        "pipelines/train.py",
        "--set",
        f"ray.storage_path={root / 'runs'}",
        "--set",
        f"tracking.tracking_uri=sqlite:///{root / 'mlruns' / 'mlflow.db'}",
        "--set",
        f"output_dir={root / 'outputs' / 'demo'}",
        "--set",
        f"data.synthetic.root={root / 'data_cache' / 'synthetic'}",
    ]


def _print_start(cluster: LocalCluster) -> None:
    submit = cluster.submit_command(local_train_entrypoint(), options=["--submission-id", "demo-1"])
    logs = [cluster.ray_bin, "job", "logs", "--address", cluster.dashboard_url, "--follow", "demo-1"]
    script = shlex.quote(str(Path(__file__).resolve()))
    print(
        "Local Ray head is up (token auth on).\n"
        f"  dashboard + job API: {cluster.dashboard_url}  (bound to {cluster.host})\n"
        f"  cluster dir:         {cluster.root}   (token: {cluster.token_path})\n\n"
        "Submit the demo training from the repository root (--working-dir . is uploaded with the job):\n"
        f"  mkdir -p mlruns && {cluster.shell_command(submit)}\n\n"
        f"Follow its logs:\n  {cluster.shell_command(logs)}\n\n"
        f"Stop this cluster (only its own processes):\n  python {script} stop --dir {shlex.quote(cluster.root)}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_start = sub.add_parser("start", help="start a local head and print the job commands")
    p_start.add_argument("--dir", default=None, help="cluster dir (default: a new /tmp/diray-* dir)")
    p_start.add_argument("--num-cpus", type=int, default=None, help="logical CPUs (default: detected)")
    p_start.add_argument("--num-gpus", type=int, default=None, help="GPUs (default: detected)")
    for name, helptext in (("status", "list the cluster's live processes"), ("stop", "stop the cluster")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--dir", required=True, help="the cluster dir printed by start")
    args = parser.parse_args(argv)

    if args.command == "start":
        try:
            cluster = start(args.dir, num_cpus=args.num_cpus, num_gpus=args.num_gpus)
        except (RuntimeError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        _print_start(cluster)
        return 0
    try:
        cluster = load(args.dir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.command == "status":
        pids = cluster_processes(cluster)
        print(f"{len(pids)} live processes; dashboard {cluster.dashboard_url}" if pids else "not running")
        return 0 if pids else 3
    pids = stop(args.dir)
    print(f"stopped {len(pids)} processes of the cluster in {args.dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
