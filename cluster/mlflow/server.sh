#!/usr/bin/env bash
# MLflow tracking server for runs whose workers live on several nodes (docs/cluster.md, "MLflow").
#
#   cluster/mlflow/server.sh [options]            run in the foreground (containers, a terminal)
#   cluster/mlflow/server.sh [options] --background DIR
#                                                 run detached; pid + log in DIR; prints the tracking URI
#   cluster/mlflow/server.sh stop DIR             stop a background server (its whole process group only)
#
# Options (each also settable by the environment variable in brackets):
#   --host H                  interface to bind [MLFLOW_HOST], default 127.0.0.1 (this machine only).
#                             On a Ray head use its private IP so GPU workers can reach it.
#   --port P                  [MLFLOW_PORT] default 5000
#   --backend-store-uri URI   [MLFLOW_BACKEND_STORE_URI] default sqlite:///<data dir>/mlflow.db.
#                             Several heads / k8s: postgresql://... (keep the password in the environment
#                             or a Secret, never in a file).
#   --artifacts-destination U [MLFLOW_ARTIFACTS_DESTINATION] default <data dir>/artifacts; s3://bucket/path
#                             or a shared path. Clients upload through the server (mlflow-artifacts:/).
#   --allowed-hosts LIST      [MLFLOW_SERVER_ALLOWED_HOSTS] Host headers accepted (DNS-rebinding guard).
#                             Default: localhost and 127.0.0.1 (any port), plus --host (any port).
#   --workers N               [MLFLOW_WORKERS] default 1 (required for sqlite on a network file system)
#   --data-dir DIR            [MLFLOW_SERVER_DIR] where the default sqlite db and artifacts live;
#                             default: the --background DIR, else ./mlflow-server
#   --dry-run                 print the mlflow command and exit
# MLflow's GenAI job runner (a pool of huey consumers) is off unless MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true:
# training runs only log params, metrics and artifacts, and the pool costs CPU and startup time.
set -euo pipefail
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

stop_server() {
    local dir="$1" pgid
    [[ -f "$dir/server.pid" ]] || { echo "no $dir/server.pid: nothing to stop" >&2; return 1; }
    pgid="$(cat "$dir/server.pid")"
    # The server was started with setsid, so its pid is its process-group id: this reaches the mlflow
    # parent, its uvicorn workers and its job runner, and nothing else.
    if kill -TERM -- "-$pgid" 2>/dev/null; then
        for _ in $(seq 50); do kill -0 -- "-$pgid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL -- "-$pgid" 2>/dev/null || true
        echo "stopped MLflow server (process group $pgid)"
    else
        echo "MLflow server (process group $pgid) was not running"
    fi
    rm -f "$dir/server.pid"
}

if [[ "${1:-}" == "stop" ]]; then
    [[ $# -eq 2 ]] || { usage >&2; exit 2; }
    stop_server "$2"
    exit $?
fi

host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"
backend="${MLFLOW_BACKEND_STORE_URI:-}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-}"
allowed="${MLFLOW_SERVER_ALLOWED_HOSTS:-}"
workers="${MLFLOW_WORKERS:-1}"
data_dir="${MLFLOW_SERVER_DIR:-}"
background=""
dry_run=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --host) host="$2"; shift 2 ;;
        --port) port="$2"; shift 2 ;;
        --backend-store-uri) backend="$2"; shift 2 ;;
        --artifacts-destination) artifacts="$2"; shift 2 ;;
        --allowed-hosts) allowed="$2"; shift 2 ;;
        --workers) workers="$2"; shift 2 ;;
        --data-dir) data_dir="$2"; shift 2 ;;
        --background) background="$2"; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown option '$1'" >&2; usage >&2; exit 2 ;;
    esac
done

if [[ -z "$data_dir" ]]; then data_dir="${background:-mlflow-server}"; fi
[[ "$data_dir" == /* ]] || data_dir="$PWD/$data_dir"
backend="${backend:-sqlite:///$data_dir/mlflow.db}"
artifacts="${artifacts:-$data_dir/artifacts}"
if [[ -z "$allowed" ]]; then
    allowed="localhost,localhost:*,127.0.0.1,127.0.0.1:*"
    case "$host" in
        127.0.0.1|localhost) ;;
        *) allowed="$allowed,$host,$host:*" ;;
    esac
fi

mlflow_bin="${MLFLOW_BIN:-mlflow}"
cmd=("$mlflow_bin" server --host "$host" --port "$port" --workers "$workers"
     --backend-store-uri "$backend" --artifacts-destination "$artifacts" --allowed-hosts "$allowed")

if [[ $dry_run -eq 1 ]]; then
    printf '%q ' "${cmd[@]}"; echo
    exit 0
fi
mkdir -p "$data_dir"
if [[ -z "$background" ]]; then
    exec "${cmd[@]}"
fi

mkdir -p "$background"
if [[ -f "$background/server.pid" ]] && kill -0 -- "-$(cat "$background/server.pid")" 2>/dev/null; then
    echo "error: an MLflow server from $background is already running (stop it: $0 stop $background)" >&2
    exit 1
fi
# Without job control a background child is not a group leader, so setsid does not fork: $! is the new
# session's (and process group's) id.
setsid "${cmd[@]}" >"$background/server.log" 2>&1 < /dev/null &
echo $! > "$background/server.pid"
py="$(command -v python3 || command -v python)"
for _ in $(seq 120); do
    if "$py" - "$host" "$port" <<'EOF' 2>/dev/null; then
import sys, urllib.request
host = sys.argv[1] if sys.argv[1] != "0.0.0.0" else "127.0.0.1"
urllib.request.urlopen(f"http://{host}:{sys.argv[2]}/health", timeout=2)
EOF
        echo "MLflow server up: MLFLOW_TRACKING_URI=http://$host:$port (log: $background/server.log)"
        exit 0
    fi
    kill -0 "$(cat "$background/server.pid")" 2>/dev/null || break
    sleep 0.5
done
echo "error: MLflow server did not become healthy; last lines of $background/server.log:" >&2
tail -n 20 "$background/server.log" >&2
stop_server "$background" >/dev/null || true
exit 1
