"""What both sweep kinds share: absolute paths, the MLflow parent run, resume/restart and the final comparison.

Layout of a sweep named ``<name>`` (the sweep file's ``name``) under ``ray.storage_path``::

    <storage>/<name>/tune/            Ray Tune experiment state (train sweeps; Tuner.restore reads it)
    <storage>/<name>/train/trial_<id>  the Ray Train run of each trial (its checkpoints)
    <storage>/<name>/train/base-<run>  sampler sweeps: the base training (when no checkpoint is given)
    <storage>/<name>/sampler/          sampler sweeps: settings.json and one result JSON per setting
    <output_dir>/                      comparison.md/.csv/.png, per-trial outputs under trials/

The MLflow parent run is tagged with the sweep key ``<storage>/<name>`` and reused when the sweep resumes; every
trial (or sampler setting) is a child run (tag ``mlflow.parentRunId``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from diffusioninst.config import build_config, flatten, to_dict, to_yaml
from diffusioninst.config.sweep import SweepConfig
from diffusioninst.engine.launch import REPO_ROOT, LaunchError, storage_uri
from diffusioninst.tracking.compare import (
    AXES_TAG,
    METRIC_TAG,
    MODE_TAG,
    ROLE_TAG,
    Comparison,
    build_comparison,
    comparison_markdown,
    fetch_runs,
    log_comparison,
    write_comparison,
)
from diffusioninst.tracking.mlflow_run import RUN_KEY_TAG, MlflowRun, get_or_create_experiment
from diffusioninst.tune import store

Mode = Literal["auto", "resume", "restart"]
KIND_TAG = "diffusioninst.kind"
SPEC_TAG = "diffusioninst.sweep.spec_hash"
TRIAL_TAG = "diffusioninst.sweep.trial_id"
# sweep keys that may change between an interrupted run and its resumption
_RUNTIME_KEYS = ("max_concurrent_trials", "trial_max_failures", "driver_resource", "driver_cpus", "settings_per_pass")
_PATH_KEYS = (
    "output_dir",
    "data.synthetic.root",
    "data.train.images",
    "data.train.annotations",
    "data.train.parquet",
    "data.val.images",
    "data.val.annotations",
    "data.val.parquet",
    "model.weights",
    "model.backbone.weights",
    "sweep.checkpoint",
)


@dataclass
class SweepContext:
    """A sweep being run: its resolved config, where things live, and its MLflow parent run."""

    cfg: SweepConfig
    key: str
    output_dir: Path
    tracking_uri: str
    parent: MlflowRun
    resumed: bool

    @property
    def tune_dir(self) -> str:
        return store.join(self.key, "tune")

    @property
    def train_storage(self) -> str:
        return store.join(self.key, "train")

    @property
    def sampler_dir(self) -> str:
        return store.join(self.key, "sampler")

    @property
    def axes(self) -> list[str]:
        return list(self.cfg.sweep.search_space)


def absolute_config(cfg: SweepConfig) -> SweepConfig:
    """Resolve every relative path against the current directory (trial actors run in other directories)."""
    from diffusioninst.tracking import resolve_tracking_uri

    tree = to_dict(cfg)
    for dotted in _PATH_KEYS:
        *parents, leaf = dotted.split(".")
        node = tree
        for p in parents:
            node = node[p]
        value = node[leaf]
        if isinstance(value, str) and value and not store.is_uri(value):
            node[leaf] = str(Path(value).expanduser().resolve())
    tree["ray"]["storage_path"] = storage_uri(cfg.ray.storage_path)
    tree["tracking"]["tracking_uri"] = resolve_tracking_uri(cfg.tracking.tracking_uri, REPO_ROOT)
    return build_config(SweepConfig, tree)


def spec_hash(cfg: SweepConfig) -> str:
    """Hash of what defines the sweep's trials (runtime-only sweep keys excluded)."""
    tree = to_dict(cfg)
    for k in _RUNTIME_KEYS:
        tree["sweep"].pop(k, None)
    return hashlib.sha1(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _runs_with_key(tracking_uri: str, experiment_id: str, key: str) -> list[Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    return client.search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'")


def open_sweep(cfg: SweepConfig, mode: Mode = "auto") -> SweepContext:
    """Resolve paths, check tracking, and create (or, resuming, reuse) the MLflow parent run.

    ``restart`` deletes the sweep's storage folder and retires the old parent run (its key tag is renamed), so
    nothing of the previous attempt is reused. ``resume`` requires an earlier attempt.
    """
    from diffusioninst.tracking import check_tracking_uri, start_or_resume_run

    cfg = absolute_config(cfg)
    if not cfg.tracking.enabled:
        raise LaunchError("sweeps compare their trials through MLflow: tracking.enabled must be true")
    uri = cfg.tracking.tracking_uri
    check_tracking_uri(uri)
    key = store.join(cfg.ray.storage_path, cfg.name)
    experiment_id = get_or_create_experiment(uri, cfg.tracking.experiment_name)
    earlier = _runs_with_key(uri, experiment_id, key)
    if mode == "restart":
        for run in earlier:
            MlflowRun(uri, run.info.run_id).set_tags({RUN_KEY_TAG: f"{key}#retired-{run.info.run_id[:8]}"})
            if run.info.status == "RUNNING":
                MlflowRun(uri, run.info.run_id).finish("KILLED")
        store.remove_tree(key)
        earlier = []
    if mode == "resume" and not earlier:
        raise LaunchError(
            f"nothing to resume: no sweep '{cfg.name}' under {cfg.ray.storage_path} in MLflow experiment "
            f"'{cfg.tracking.experiment_name}' ({uri}); run without --resume to start it"
        )
    digest = spec_hash(cfg)
    if earlier:
        old = earlier[0].data.tags.get(SPEC_TAG)
        if old is not None and old != digest:
            raise LaunchError(
                f"sweep '{cfg.name}' was started from a different sweep file or --set values (spec {old}, now "
                f"{digest}); re-run with --restart to start over, or restore the original settings to resume"
            )
    tags = {
        KIND_TAG: "sweep",
        "diffusioninst.sweep.kind": cfg.sweep.kind,
        AXES_TAG: json.dumps(list(cfg.sweep.search_space)),
        METRIC_TAG: cfg.sweep.metric,
        MODE_TAG: cfg.sweep.mode,
        SPEC_TAG: digest,
    }
    parent, resumed = start_or_resume_run(uri, cfg.tracking.experiment_name, cfg.name, run_key=key, tags=tags)
    params = {k: v for k, v in flatten(cfg).items() if k.startswith("sweep.") and k != "sweep.search_space"}
    params["sweep.search_space"] = json.dumps(cfg.sweep.search_space)
    parent.log_params(params)
    parent.log_text(to_yaml(cfg), "sweep/sweep.yaml")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    return SweepContext(cfg, key, out, uri, parent, resumed)


def axis_params(params: dict[str, Any]) -> dict[str, str]:
    """Swept values as MLflow params ``axis.<key>`` (``None`` = has no effect in this setting)."""
    return {f"axis.{k}": str(v) for k, v in params.items()}


def axis_label(params: dict[str, Any]) -> str:
    """Short run name from the swept values, e.g. ``mask_weight=2.0``."""
    from diffusioninst.config.sweep import short_names

    names = short_names(list(params))
    return ",".join(f"{names[k]}={'n/a' if v is None else v}" for k, v in params.items())


def finalize(ctx: SweepContext, role: str) -> Comparison | None:
    """Compare every child run of ``role``; write/log comparison.md/.csv/.png; print the table."""
    runs, _ = fetch_runs(ctx.tracking_uri, parent=ctx.parent.run_id)
    runs = [r for r in runs if r.tags.get(ROLE_TAG) == role]
    if not runs:
        print("[sweep] no finished trial has AP metrics yet: nothing to compare", flush=True)
        return None
    sweep = ctx.cfg.sweep
    comp = build_comparison(runs, axes=ctx.axes, metric=sweep.metric, mode=sweep.mode)
    files = write_comparison(comp, ctx.output_dir)
    log_comparison(ctx.tracking_uri, ctx.parent.run_id, files.values())
    if comp.best is not None:
        ctx.parent.log_metrics({f"best/{sweep.metric}": comp.best["value"]})
        ctx.parent.set_tags({"diffusioninst.sweep.best_run": comp.best["run_id"]})
    print(f"\n{comparison_markdown(comp)}", flush=True)
    print(f"comparison: {', '.join(str(p) for p in files.values())}", flush=True)
    print(f"mlflow: parent run {ctx.parent.run_id} in {ctx.tracking_uri}", flush=True)
    return comp
