"""Train sweeps: a Ray Tune experiment whose trials are full training runs (see :mod:`.trainable`).

Resuming: when ``<storage>/<sweep>/tune`` holds an experiment, ``Tuner.restore(..., resume_errored=True)``
continues it: finished (and early-stopped) trials are kept as they are, unfinished ones restart their driver,
whose Train run resumes from its last checkpoint, and errored ones are retried the same way.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from diffusioninst.config import to_dict
from diffusioninst.config.sweep import experiment_of
from diffusioninst.engine.launch import LaunchError, init_ray, prepare
from diffusioninst.tracking.compare import STATUS_TAG
from diffusioninst.tracking.mlflow_run import MlflowRun
from diffusioninst.tune.common import TRIAL_TAG, SweepContext, finalize
from diffusioninst.tune.space import to_tune_space
from diffusioninst.tune.trainable import TrialSetup, train_driver


@dataclass
class TrialSummary:
    trial_id: str
    params: dict[str, Any]
    status: str  # finished | stopped at iteration N | failed: ... | unfinished
    iteration: int | None
    metric: float | None


def driver_resources(ctx: SweepContext) -> dict[str, float]:
    """1 unit of the cluster's driver resource (only the head advertises it), else a sliver of a CPU.

    A local Ray started by the sweep advertises ``max_concurrent_trials`` driver slots itself, so the drivers
    take no CPU at all: with 2 CPUs, two 1-CPU Train workers still fit next to two drivers (with 0.01 CPU each,
    only 1.98 CPUs would be left and the second Train run would wait).
    """
    import ray

    name = ctx.cfg.sweep.driver_resource
    if name and ray.cluster_resources().get(name, 0) >= 1:
        return {name: 1.0}
    return {"CPU": ctx.cfg.sweep.driver_cpus}


def check_local_capacity(ctx: SweepContext) -> None:
    """On a local Ray, one trial's Train run must fit at all; say so when fewer trials than asked fit at once."""
    cfg = ctx.cfg
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        return
    total = cfg.ray.local_num_cpus or os.cpu_count() or 1
    per_trial = cfg.ray.num_workers * cfg.ray.cpus_per_worker
    if per_trial > total:
        raise LaunchError(
            f"one trial needs ray.num_workers x ray.cpus_per_worker = {per_trial:g} CPUs but the local Ray has "
            f"{total}; lower ray.cpus_per_worker (or set ray.local_num_cpus)"
        )
    fit = int(total // per_trial) if per_trial else cfg.sweep.max_concurrent_trials
    if fit < cfg.sweep.max_concurrent_trials:
        print(
            f"[sweep] note: {total} local CPUs fit {fit} trial(s) at once (each {per_trial:g} CPUs), not "
            f"max_concurrent_trials={cfg.sweep.max_concurrent_trials}; the others wait",
            flush=True,
        )


def _scheduler(ctx: SweepContext) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    sch = ctx.cfg.sweep.scheduler
    if sch.type == "none":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr=sch.time_attr,
        max_t=sch.max_t or ctx.cfg.solver.max_iter,
        grace_period=sch.grace_period,
        reduction_factor=sch.reduction_factor,
    )


def _trial_name(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def build_tuner(ctx: SweepContext, trainable: Any) -> Any:
    """Restore the sweep's Tune experiment if there is one, else a new ``Tuner``."""
    import ray.tune
    from ray.tune.search import BasicVariantGenerator

    if ray.tune.Tuner.can_restore(ctx.tune_dir):
        print(f"[sweep] resuming the Tune experiment in {ctx.tune_dir}", flush=True)
        return ray.tune.Tuner.restore(ctx.tune_dir, trainable=trainable, resume_errored=True)
    sweep = ctx.cfg.sweep
    return ray.tune.Tuner(
        trainable,
        param_space=to_tune_space(sweep.search_space),
        tune_config=ray.tune.TuneConfig(
            metric=sweep.metric,
            mode=sweep.mode,
            num_samples=sweep.num_samples,
            scheduler=_scheduler(ctx),
            # the concurrency cap lives on the generator (TuneConfig.max_concurrent_trials ignores generators)
            search_alg=BasicVariantGenerator(max_concurrent=sweep.max_concurrent_trials, random_state=sweep.seed),
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
        ),
        run_config=ray.tune.RunConfig(
            name="tune",
            storage_path=ctx.key,
            failure_config=ray.tune.FailureConfig(max_failures=sweep.trial_max_failures),
            verbose=1,
        ),
    )


def run_train_sweep(ctx: SweepContext) -> list[TrialSummary]:
    """Run (or resume) the sweep, mark each child run with its outcome, and write the comparison."""
    import ray.tune

    base = prepare(experiment_of(ctx.cfg))  # dataset generated/located once, before any trial starts
    check_local_capacity(ctx)
    slots = ctx.cfg.sweep.driver_resource
    init_ray(base, resources={slots: float(ctx.cfg.sweep.max_concurrent_trials)} if slots else None)
    setup = TrialSetup(
        base=to_dict(base),
        axes=ctx.axes,
        metric=ctx.cfg.sweep.metric,
        sweep_key=ctx.key,
        train_storage=ctx.train_storage,
        output_dir=str(ctx.output_dir),
        tracking_uri=ctx.tracking_uri,
        parent_run_id=ctx.parent.run_id,
    )
    resources = driver_resources(ctx)
    trainable = ray.tune.with_resources(ray.tune.with_parameters(train_driver, setup=setup), resources)
    print(f"[sweep] {ctx.cfg.name}: trial drivers request {resources}; Tune state in {ctx.tune_dir}", flush=True)
    t0 = time.perf_counter()
    grid = build_tuner(ctx, trainable).fit()
    summaries = summarize(ctx, grid)
    mark_children(ctx, summaries)
    unfinished = [s for s in summaries if s.status == "unfinished"]
    print(f"[sweep] Tune finished in {time.perf_counter() - t0:.0f} s: {len(summaries)} trial(s)", flush=True)
    for s in summaries:
        print(f"  trial_{s.trial_id}: {s.params} -> {s.status}", flush=True)
    if unfinished:
        print(f"[sweep] {len(unfinished)} trial(s) unfinished: re-run the same command to resume", flush=True)
    finalize(ctx, role="trial")
    if not unfinished:
        ctx.parent.finish("FINISHED")
    return summaries


def summarize(ctx: SweepContext, grid: Any) -> list[TrialSummary]:
    """Outcome of each trial from its last Tune result (``done`` marks a trial Tune will not run again)."""
    out = []
    max_iter = ctx.cfg.solver.max_iter
    for result in grid:
        metrics = result.metrics or {}
        config = result.config or {}
        trial_id = metrics.get("trial_id") or os.path.basename(result.path).removeprefix("trial_")
        iteration = metrics.get("iteration")
        target = int(config.get("solver.max_iter", max_iter))
        if result.error is not None:
            status = f"failed: {type(result.error).__name__}"
        elif not metrics.get("done"):
            status = "unfinished"
        elif iteration is not None and iteration >= target:
            status = "finished"
        else:
            status = f"stopped at iteration {iteration}"
        params = {k: config.get(k) for k in ctx.axes}
        out.append(TrialSummary(trial_id, params, status, iteration, metrics.get(ctx.cfg.sweep.metric)))
    return out


def mark_children(ctx: SweepContext, summaries: list[TrialSummary]) -> None:
    """Tag each trial's MLflow run with its outcome; close runs of trials that Tune stopped or lost."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(ctx.tracking_uri)
    experiment_id = client.get_run(ctx.parent.run_id).info.experiment_id
    for s in summaries:
        runs = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{ctx.parent.run_id}' and tags.`{TRIAL_TAG}` = '{s.trial_id}'",
        )
        for run in runs:
            child = MlflowRun(ctx.tracking_uri, run.info.run_id)
            child.set_tags({STATUS_TAG: s.status})
            if s.status == "unfinished" or run.info.status != "RUNNING":
                continue
            child.finish("FAILED" if s.status.startswith("failed") else "KILLED")
