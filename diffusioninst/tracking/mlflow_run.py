"""MLflow tracking without global state.

Everything goes through an explicit ``MlflowClient`` and run id (``mlflow.set_experiment`` would write
``MLFLOW_EXPERIMENT_ID`` into the environment, which Ray's helpers then prefer over explicit names).

* :func:`resolve_tracking_uri` picks ``tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else a local
  SQLite store at an absolute path (``<root>/mlruns/mlflow.db``); relative SQLite paths are made absolute.
* :func:`check_tracking_uri` fails fast, before any work starts, when the store cannot be reached.
* :func:`start_or_resume_run` reuses the run of an interrupted training (same ``run_key``) so a resumed
  training keeps logging into one run.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

RUN_KEY_TAG = "diffusioninst.run_key"
MAX_PARAM_LENGTH = 6000
PARAM_BATCH = 100
METRIC_BATCH = 1000


class TrackingError(RuntimeError):
    """The MLflow tracking store is unusable (unreachable server, unwritable path, bad URI)."""


def default_tracking_uri(root: str | Path) -> str:
    """``sqlite:///<abs root>/mlruns/mlflow.db``."""
    return f"sqlite:///{(Path(root).resolve() / 'mlruns' / 'mlflow.db')}"


def resolve_tracking_uri(configured: str | None, root: str | Path) -> str:
    """The tracking URI to use: configured > ``$MLFLOW_TRACKING_URI`` > local SQLite under ``root``.

    A relative SQLite path (``sqlite:///mlflow.db``) is resolved against the current directory so every
    process (driver, Ray workers in other directories) writes to the same file.
    """
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(root)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri[len('sqlite:///') :]).resolve()}"
    return uri


def artifact_location_for(uri: str) -> str | None:
    """Artifact root for experiments we create: next to a local SQLite file; server-managed otherwise."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "artifacts").resolve().as_uri()
    return None


def check_tracking_uri(uri: str, timeout_s: float = 5.0) -> None:
    """Raise :class:`TrackingError` with a clear message when ``uri`` cannot be used.

    HTTP(S) servers are probed at ``/health``; SQLite parents must be creatable/writable; the deprecated
    file store is refused unless ``MLFLOW_ALLOW_FILE_STORE=true``.
    """
    hint = "set tracking.tracking_uri (or MLFLOW_TRACKING_URI), or disable tracking with --set tracking.enabled=false"
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:
                if resp.status != 200:
                    raise TrackingError(f"MLflow tracking server {uri} answered {resp.status} on /health; {hint}")
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise TrackingError(f"MLflow tracking server {uri} is unreachable ({e}); {hint}") from None
        return
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrackingError(f"cannot create the MLflow store folder {db.parent} ({e}); {hint}") from None
        if not os.access(db.parent, os.W_OK):
            raise TrackingError(f"MLflow store folder {db.parent} is not writable; {hint}")
        return
    if uri.startswith("file:") or "://" not in uri:
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
            raise TrackingError(
                f"tracking URI {uri!r} is an MLflow file store, which MLflow 3 refuses unless "
                f"MLFLOW_ALLOW_FILE_STORE=true; use sqlite:////abs/path/mlflow.db or an http(s) server"
            )
        return
    if not uri.startswith(("databricks", "postgresql", "mysql", "mssql")):
        raise TrackingError(f"unsupported MLflow tracking URI {uri!r}; {hint}")


def _clean_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if not math.isinf(f):  # NaN is kept: MLflow stores it, and COCO's "no objects of this size" is NaN
            out[k] = f
    return out


class MlflowRun:
    """One MLflow run addressed by id through an explicit client (safe to use from any process)."""

    def __init__(self, tracking_uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri)

    # -- logging ---------------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        items = [
            Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items() if k not in existing
        ]  # params are immutable: a resumed run keeps the ones it has
        for i in range(0, len(items), PARAM_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + PARAM_BATCH])

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log numeric values (NaN included, infinities and non-numbers skipped: MLflow metrics are floats)."""
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, v, ts, int(step or 0)) for k, v in _clean_metrics(metrics).items()]
        for i in range(0, len(items), METRIC_BATCH):
            self.client.log_batch(self.run_id, metrics=items[i : i + METRIC_BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(directory), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self.log_text(json.dumps(data, indent=2, default=str), artifact_file)

    def log_files(self, files: Iterable[str | Path], artifact_path: str | None = None) -> None:
        for f in files:
            self.log_artifact(f, artifact_path)

    def log_figure_file(self, fig: Any, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            fig.savefig(path, dpi=100, bbox_inches="tight")
            self.log_artifact(path, str(Path(artifact_file).parent) if "/" in artifact_file else None)

    # -- lifecycle -------------------------------------------------------------------------------
    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)]

    @property
    def url(self) -> str:
        run = self.client.get_run(self.run_id)
        return f"{self.tracking_uri} (experiment {run.info.experiment_id}, run {self.run_id})"


class NullRun:
    """Stands in for :class:`MlflowRun` when tracking is disabled; every call is a no-op."""

    tracking_uri = None
    run_id = None
    url = "(tracking disabled)"

    def __getattr__(self, name: str) -> Any:
        def noop(*args: Any, **kwargs: Any) -> Any:
            return [] if name == "metric_history" else None

        return noop


def get_or_create_experiment(tracking_uri: str, name: str) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location_for(tracking_uri))
    except Exception:  # another process created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def start_or_resume_run(
    tracking_uri: str,
    experiment_name: str,
    run_name: str,
    run_key: str | None = None,
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
    resume: bool = True,
    started_tag: str | None = None,
) -> tuple[MlflowRun, bool]:
    """Create a run, or reuse the newest run tagged with ``run_key`` (a resumed training).

    ``resume=False`` (the training state behind the tagged run is gone, a new training starts) reuses the
    tagged run only if it lacks ``started_tag`` (created ahead of its training, e.g. by a Tune trial), and
    otherwise creates a new one, still tagged with ``run_key``. The returned run gets ``started_tag``.

    Returns:
        (run, resumed): ``resumed`` is True when an existing run was reused.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment_id = get_or_create_experiment(tracking_uri, experiment_name)
    found = []
    if run_key is not None:
        found = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
    if found and (resume or (started_tag is not None and started_tag not in found[0].data.tags)):
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        if started_tag is not None:
            client.set_tag(run_id, started_tag, "true")
        return MlflowRun(tracking_uri, run_id), True
    all_tags = dict(tags or {})
    if run_key is not None:
        all_tags[RUN_KEY_TAG] = run_key
    if parent_run_id is not None:
        all_tags["mlflow.parentRunId"] = parent_run_id
    if started_tag is not None:
        all_tags[started_tag] = "true"
    run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    return MlflowRun(tracking_uri, run.info.run_id), False
