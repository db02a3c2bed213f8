"""Driver side of a training run: checks, Ray start-up, ``TorchTrainer.fit`` and the result.

Used by ``pipelines/train.py`` and by the Tune trial driver. Everything that can fail fast (config,
tracking store, dataset paths, CPU budget) is checked before Ray starts.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffusioninst.config import ExperimentConfig, flatten, save_config, to_dict
from diffusioninst.engine.session import LocalSession
from diffusioninst.engine.train import STATUS_NONFINITE, NonFiniteLossError, TrackingInfo

REPO_ROOT = Path(__file__).resolve().parents[2]


TRAINING_STARTED_TAG = "diffusioninst.training_started"


class LaunchError(RuntimeError):
    """A run cannot start: the message says what to fix."""


@dataclass
class RunOutcome:
    status: str
    metrics: dict[str, Any]
    checkpoint_path: str | None
    output_dir: Path
    tracking_uri: str | None
    run_id: str | None
    table: str = ""
    files: dict[str, Path] = field(default_factory=dict)


def storage_uri(path: str) -> str:
    """Absolute local path, or a URI (``s3://``, ``gs://``, ...) left as is."""
    return path if "://" in path else str(Path(path).resolve())


def run_key(cfg: ExperimentConfig) -> str:
    """Identity of a training run across re-runs: where Ray Train keeps its state."""
    return f"{storage_uri(cfg.ray.storage_path)}/{cfg.name}"


def local_run_layout(cfg: ExperimentConfig) -> LocalSession | None:
    """The folder layout of this run under a local ``ray.storage_path`` (``LocalSession`` uses Ray Train's
    checkpoint folder names); None for remote storage (``s3://`` ...), which is not inspected."""
    return None if "://" in cfg.ray.storage_path else LocalSession(cfg.ray.storage_path, cfg.name)


def prepare(cfg: ExperimentConfig) -> ExperimentConfig:
    """Fail fast on unusable inputs and generate/resolve the dataset; returns the config with data paths."""
    from diffusioninst.data import ensure_dataset

    check_cpu_budget(cfg)
    check_resume_compatible(cfg)
    cfg = ensure_dataset(cfg)
    check_dataset_paths(cfg)
    return cfg


def check_resume_compatible(cfg: ExperimentConfig) -> None:
    """A re-run resumes from the latest checkpoint under ``ray.storage_path/name``: its model must be this one.

    Compares the ``model`` section of that checkpoint's ``config.yaml`` with ``cfg`` (keys present in both;
    local storage only) and fails before Ray starts, naming every differing key, instead of a state-dict
    error in every worker and every restart.
    """
    import yaml

    layout = local_run_layout(cfg)
    if layout is None:
        return
    run_dir = layout.run_dir
    found = [p / "config.yaml" for p in layout.checkpoints() if (p / "config.yaml").is_file()]
    if not found:
        return
    latest = found[-1]
    try:
        saved = yaml.safe_load(latest.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise LaunchError(f"cannot read {latest} to check the run it would resume: {e}") from e
    then = flatten({"model": saved.get("model") or {}})
    now = flatten({"model": to_dict(cfg.model)})
    differ = [f"{k}: {then[k]!r} there, {now[k]!r} now" for k in sorted(now) if k in then and then[k] != now[k]]
    if differ:
        raise LaunchError(
            f"{run_dir} holds a run of another model (latest checkpoint {latest.parent.name}), and re-running "
            f"'{cfg.name}' would resume it:\n  " + "\n  ".join(differ) + f"\nDelete {run_dir}, train under another "
            "name (--set name=...), or set the model back to those values."
        )


def check_dataset_paths(cfg: ExperimentConfig) -> None:
    """Every configured dataset file/folder exists (checked on the driver, before Ray starts)."""
    problems = []
    for split in ("train", "val"):
        s = getattr(cfg.data, split)
        if s.parquet is not None:
            manifest = Path(s.parquet) / "manifest.json"
            if "://" not in s.parquet and not manifest.is_file():
                problems.append(f"data.{split}.parquet: {manifest} not found (run pipelines/preprocess.py first)")
            continue
        for key, want_dir in (("images", True), ("annotations", False)):
            value = getattr(s, key)
            if value is None or "://" in value:
                continue
            path = Path(value)
            ok = path.is_dir() if want_dir else path.is_file()
            if not ok:
                kind = "folder" if want_dir else "file"
                problems.append(f"data.{split}.{key}: {kind} not found: {path.resolve()}")
    if problems:
        raise LaunchError("dataset paths are missing:\n  " + "\n  ".join(problems))


def check_cpu_budget(cfg: ExperimentConfig) -> None:
    """Ray Data needs CPUs left over by the Train workers, or the pipeline hangs (ecosystem pitfall 14)."""
    if cfg.ray.num_workers == 0 or cfg.ray.address is not None or cfg.data.loader != "ray_data":
        return
    total = cfg.ray.local_num_cpus or os.cpu_count() or 1
    reserved = cfg.ray.num_workers * cfg.ray.cpus_per_worker
    if reserved >= total:
        raise LaunchError(
            f"ray.num_workers x ray.cpus_per_worker = {reserved:g} CPUs leaves none of the {total} local CPUs for "
            f"Ray Data (data.loader: ray_data) and would hang; lower ray.cpus_per_worker or use data.loader: local"
        )


def open_tracking(cfg: ExperimentConfig, parent_run_id: str | None = None) -> tuple[Any, TrackingInfo]:
    """Check the tracking store and create (or resume) the run; log the flattened config as params."""
    from diffusioninst.tracking import (
        NullRun,
        check_tracking_uri,
        resolve_tracking_uri,
        start_or_resume_run,
    )

    if not cfg.tracking.enabled:
        return NullRun(), TrackingInfo()
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri, REPO_ROOT)
    check_tracking_uri(uri)
    layout = local_run_layout(cfg)
    run, resumed = start_or_resume_run(
        uri,
        cfg.tracking.experiment_name,
        cfg.tracking.run_name or cfg.name,
        run_key=run_key(cfg),
        tags={"diffusioninst.config_name": cfg.name},
        parent_run_id=parent_run_id,
        # a training resumes its MLflow run only while its Ray Train state exists (local storage: the folder),
        # or if the run was created for it and no training has logged into it yet (a Tune trial's run)
        resume=layout is None or layout.run_dir.exists(),
        started_tag=TRAINING_STARTED_TAG,
    )
    run.log_params(flatten(cfg))
    print(f"[mlflow] {'resuming' if resumed else 'logging to'} run {run.run_id} at {uri}", flush=True)
    return run, TrackingInfo(tracking_uri=uri, run_id=run.run_id)


def open_eval_tracking(cfg: ExperimentConfig, checkpoint: str | Path, steps: list[int]) -> Any:
    """A fresh MLflow run for a stand-alone evaluation (params: the config, the checkpoint and steps)."""
    from diffusioninst.tracking import NullRun, check_tracking_uri, resolve_tracking_uri, start_or_resume_run

    if not cfg.tracking.enabled:
        return NullRun()
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri, REPO_ROOT)
    check_tracking_uri(uri)
    run, _ = start_or_resume_run(
        uri, cfg.tracking.experiment_name, f"eval-{cfg.name}", tags={"diffusioninst.kind": "evaluation"}
    )
    run.log_params({**flatten(cfg), "eval.checkpoint": str(Path(checkpoint).resolve()), "eval.steps": steps})
    return run


def init_ray(cfg: ExperimentConfig, resources: dict[str, float] | None = None) -> None:
    """Connect to ``ray.address`` (or ``$RAY_ADDRESS``), else start a local Ray bound to 127.0.0.1.

    ``resources``: custom resources a local Ray advertises (a sweep's ``driver`` slots); ignored on a cluster.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # avoid every worker line printed twice
    env = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "PYTHONUNBUFFERED": "1"}
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=cfg.ray.address or os.environ["RAY_ADDRESS"], runtime_env={"env_vars": env})
        return
    ray.init(
        num_cpus=cfg.ray.local_num_cpus or os.cpu_count(),
        resources=dict(resources or {}),
        # Ray Train V2's PlacementGroupCleaner polls the state API, which the dashboard serves: without it,
        # a warning every second (tried for the demo's ~3% of a core; measured, then reverted)
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        runtime_env={"env_vars": env},
        log_to_driver=True,
        configure_logging=True,
        logging_level="WARNING",
    )


def fit(
    cfg: ExperimentConfig,
    tracking: TrackingInfo,
    datasets: dict[str, Any] | None = None,
    callbacks: list[Any] | None = None,
) -> Any:
    """Build and run the ``TorchTrainer``; re-running with the same name/storage resumes it.

    ``callbacks``: Ray Train ``UserCallback``s for the Train ``RunConfig`` (a Tune trial passes its report callback).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from diffusioninst.data.ray_partition import PartitionedTrainConfig
    from diffusioninst.engine.train import train_loop_per_worker

    resources = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        resources["GPU"] = cfg.ray.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(cfg), "tracking": vars(tracking)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=storage_uri(cfg.ray.storage_path),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.ray.num_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # our own progress lines suffice
            callbacks=list(callbacks or []),
        ),
        datasets=datasets,
        dataset_config=PartitionedTrainConfig(seed=cfg.solver.seed),  # a cached train split: no split coordinator
    )
    return trainer.fit()


def collect(
    cfg: ExperimentConfig,
    result_metrics: dict[str, Any] | None,
    checkpoint_dir: str | None,
    tracking: TrackingInfo,
    checkpoint_path: str | None = None,
) -> RunOutcome:
    """Copy tables/plots of the final checkpoint to ``output_dir`` and build the outcome."""
    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    files: dict[str, Path] = {"config": out / "config.yaml"}
    table = ""
    if checkpoint_dir is not None:
        for sub in ("eval", "plots"):
            src = Path(checkpoint_dir) / sub
            if src.is_dir():
                shutil.copytree(src, out / sub, dirs_exist_ok=True)
                files.update({f"{sub}/{p.name}": out / sub / p.name for p in sorted((out / sub).iterdir())})
        table_file = out / "eval" / "ap_table.md"
        table = table_file.read_text() if table_file.is_file() else ""
    metrics = dict(result_metrics or {})
    if metrics.get("status") == STATUS_NONFINITE:
        raise NonFiniteLossError(metrics.get("message", "non-finite loss"))
    return RunOutcome(
        status=str(metrics.get("status", "ok")),
        metrics=metrics,
        checkpoint_path=checkpoint_path,
        output_dir=out,
        tracking_uri=tracking.tracking_uri,
        run_id=tracking.run_id,
        table=table,
        files=files,
    )


def train(cfg: ExperimentConfig, parent_run_id: str | None = None, callbacks: list[Any] | None = None) -> RunOutcome:
    """Whole training run from a validated config: checks, tracking, Ray (or in-process), results.

    ``callbacks`` go to the Train ``RunConfig`` (ignored in-process, ``ray.num_workers: 0``).
    """
    from diffusioninst.engine.train import run_local

    cfg = prepare(cfg)
    logger, tracking = open_tracking(cfg, parent_run_id=parent_run_id)
    status = "FAILED"
    try:
        if cfg.ray.num_workers == 0:
            metrics = run_local(cfg, tracking)
            latest = LocalSession(cfg.ray.storage_path, cfg.name).checkpoints()
            ckpt = str(latest[-1]) if latest else None
            outcome = collect(cfg, metrics, ckpt, tracking, checkpoint_path=ckpt)
        else:
            init_ray(cfg)
            datasets = None
            if cfg.data.loader == "ray_data":
                from diffusioninst.data.ray_ingest import build_ray_dataset

                datasets = {"train": build_ray_dataset(cfg, "train")}
            result = fit(cfg, tracking, datasets, callbacks)
            if result.error is not None:
                raise result.error
            ckpt = result.checkpoint
            if ckpt is None:
                outcome = collect(cfg, result.metrics, None, tracking)
            else:
                with ckpt.as_directory() as d:
                    outcome = collect(cfg, result.metrics, d, tracking, checkpoint_path=ckpt.path)
        for name, path in outcome.files.items():
            if name.startswith(("eval/", "plots/")):
                continue
            logger.log_artifact(path, "outputs")
        status = "FINISHED"
        return outcome
    finally:
        logger.finish(status)
