"""The Tune trial of a train sweep: a driver that launches one Ray Train run, nothing more.

Runs inside a Tune trial actor (so only ``ray.tune.*`` session calls are used here). It applies the trial's
swept values to the base experiment, names the Train run after the trial id (``trial_<id>`` under
``<storage>/<sweep>/train``, so a restarted trial resumes its Train run), creates the MLflow child run under the
sweep's parent, and calls :func:`diffusioninst.engine.launch.train` with a report callback that forwards the
rank-0 reports carrying the sweep metric to Tune (ASHA reads ``iteration`` and the metric from them).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from diffusioninst.config.sweep import apply_params


@dataclass
class TrialSetup:
    """Everything a trial needs besides its swept values (sent once through ``tune.with_parameters``)."""

    base: dict[str, Any]  # resolved base experiment (absolute paths, dataset located)
    axes: list[str]
    metric: str
    sweep_key: str
    train_storage: str
    output_dir: str
    tracking_uri: str
    parent_run_id: str
    extra_tags: dict[str, str] = field(default_factory=dict)


class MetricReportCallback(TuneReportCallback):
    """Forward only the reports that carry ``metric`` (Tune rejects results without it).

    Checkpoint reports made before the first evaluation, and the report of a run stopped by a non-finite loss,
    carry no AP; Tune would fail the trial on them with an unrelated message.
    """

    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if metrics and self.metric in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


def trial_config(setup: TrialSetup, params: dict[str, Any], trial_id: str):
    """The trial's experiment: swept values applied, named ``trial_<id>``, stored under the sweep."""
    from diffusioninst.tune.common import axis_label

    cfg = apply_params(setup.base, params)
    return dataclasses.replace(
        cfg,
        name=f"trial_{trial_id}",
        output_dir=f"{setup.output_dir}/trials/trial_{trial_id}",
        ray=dataclasses.replace(cfg.ray, storage_path=setup.train_storage),
        tracking=dataclasses.replace(cfg.tracking, tracking_uri=setup.tracking_uri, run_name=axis_label(params)),
    )


def train_driver(config: dict[str, Any], setup: TrialSetup) -> None:
    """Tune function trainable: ``config`` holds the swept values under their dotted keys."""
    import ray.tune

    from diffusioninst.engine.launch import run_key, train
    from diffusioninst.tracking import start_or_resume_run
    from diffusioninst.tracking.compare import ROLE_TAG
    from diffusioninst.tune.common import TRIAL_TAG, axis_params

    trial_id = ray.tune.get_context().get_trial_id()
    params = {k: config[k] for k in setup.axes}
    cfg = trial_config(setup, params, trial_id)
    # Created here (not by train()) so the run carries the sweep tags even if the trial is stopped early;
    # train() finds it again by its run key and logs into it.
    run, _ = start_or_resume_run(
        setup.tracking_uri,
        cfg.tracking.experiment_name,
        cfg.tracking.run_name,
        run_key=run_key(cfg),
        tags={ROLE_TAG: "trial", TRIAL_TAG: trial_id, "diffusioninst.sweep.key": setup.sweep_key, **setup.extra_tags},
        parent_run_id=setup.parent_run_id,
    )
    run.log_params(axis_params(params))
    train(cfg, parent_run_id=setup.parent_run_id, callbacks=[MetricReportCallback(setup.metric)])
