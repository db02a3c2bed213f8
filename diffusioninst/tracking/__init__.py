"""Experiment tracking (MLflow) through explicit clients; see :mod:`diffusioninst.tracking.mlflow_run`."""

from diffusioninst.tracking.mlflow_run import (
    MlflowRun,
    NullRun,
    TrackingError,
    check_tracking_uri,
    default_tracking_uri,
    resolve_tracking_uri,
    start_or_resume_run,
)

__all__ = [
    "MlflowRun",
    "NullRun",
    "TrackingError",
    "check_tracking_uri",
    "default_tracking_uri",
    "resolve_tracking_uri",
    "start_or_resume_run",
]
