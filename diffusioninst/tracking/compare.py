"""Compare MLflow runs by their final box/mask AP: a table (markdown/CSV) and a plot of AP against each axis.

A run's AP values are its latest ``eval/steps_<S>/<bbox|segm>/<column>`` metrics; the table has one row per
(run, step count S) and one column per task and AP column. The "axes" are what distinguishes the runs: the
keys a sweep varied (tag ``diffusioninst.sweep.axes`` on the runs or their parent), else every parameter whose
value differs between the runs (bookkeeping keys such as names and paths excluded).
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from diffusioninst.evaluation.eval_result import COCO_AP_COLUMNS, LVIS_AP_COLUMNS, TASKS
from diffusioninst.evaluation.tables import _markdown

AP_METRIC_RE = re.compile(r"^eval/steps_(\d+)/(bbox|segm)/(\w+)$")
AXES_TAG = "diffusioninst.sweep.axes"
METRIC_TAG = "diffusioninst.sweep.metric"
MODE_TAG = "diffusioninst.sweep.mode"
STATUS_TAG = "diffusioninst.sweep.trial_status"
ROLE_TAG = "diffusioninst.sweep.role"  # trial | setting | base (the training a sampler sweep evaluates)
PARENT_TAG = "mlflow.parentRunId"
AXIS_PARAM = "axis."  # children log their swept values as axis.<key> (None = no effect in that setting)
# params that differ between runs without being an experimental factor
_BOOKKEEPING = {"name", "output_dir", "data.synthetic.root", "ray.storage_path", "ray.address", "eval.checkpoint"}
_BOOKKEEPING_PREFIXES = ("tracking.", "data.train.", "data.val.")


@dataclass
class RunRecord:
    """What the comparison needs of one MLflow run (params parsed back from strings)."""

    run_id: str
    name: str
    status: str
    params: dict[str, Any]
    metrics: dict[str, float]
    tags: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_mlflow(cls, run: Any) -> RunRecord:
        tags = dict(run.data.tags)
        return cls(
            run_id=run.info.run_id,
            name=run.info.run_name or run.info.run_id[:8],
            status=tags.get(STATUS_TAG) or run.info.status.lower(),
            params={k: parse_param(v) for k, v in run.data.params.items()},
            metrics=dict(run.data.metrics),
            tags=tags,
        )


@dataclass
class Comparison:
    """Rows (one per run and step count) of AP values plus the axes that tell the runs apart."""

    axes: list[str]
    labels: dict[str, str]
    value_columns: list[str]  # "<task>/<column>"
    rows: list[dict[str, Any]]
    show_steps: bool = True
    metric: str | None = None
    mode: str = "max"
    best: dict[str, Any] | None = None


def parse_param(text: str) -> Any:
    """MLflow params are strings; read them back as YAML scalars/lists (``'None'`` -> None)."""
    if text == "None":
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


# ----------------------------------------------------------------------------------------------
# Fetching


def fetch_runs(
    tracking_uri: str,
    *,
    experiment: str | None = None,
    run_ids: Sequence[str] | None = None,
    parent: str | None = None,
) -> tuple[list[RunRecord], dict[str, str]]:
    """Runs to compare (exactly one selector) and the tags of the parent run when ``parent`` is given.

    Only runs that logged at least one ``eval/steps_*`` metric are returned.
    """
    from mlflow.tracking import MlflowClient

    if sum(x is not None for x in (experiment, run_ids, parent)) != 1:
        raise ValueError("give exactly one of experiment, run_ids or parent")
    client = MlflowClient(tracking_uri)
    parent_tags: dict[str, str] = {}
    if run_ids is not None:
        runs = [client.get_run(rid) for rid in run_ids]
    elif parent is not None:
        prun = client.get_run(parent)
        parent_tags = dict(prun.data.tags)
        runs = _search(client, [prun.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent}'")
        runs = [r for r in runs if r.data.tags.get(ROLE_TAG) != "base"]
    else:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            names = sorted(e.name for e in client.search_experiments())
            raise ValueError(f"no MLflow experiment named {experiment!r} in {tracking_uri}; experiments: {names}")
        runs = _search(client, [exp.experiment_id], "")
    records = [RunRecord.from_mlflow(r) for r in runs]
    return [r for r in records if any(AP_METRIC_RE.match(k) for k in r.metrics)], parent_tags


def _search(client: Any, experiment_ids: list[str], filter_string: str) -> list[Any]:
    out, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=1000, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


# ----------------------------------------------------------------------------------------------
# Building


def detect_axes(runs: Sequence[RunRecord], parent_tags: dict[str, str] | None = None) -> list[str]:
    """Swept keys from the ``diffusioninst.sweep.axes`` tag (parent, else runs), else the ``axis.*`` params, else
    every parameter that all runs logged with differing values (bookkeeping keys excluded)."""
    for tags in [parent_tags or {}, *(r.tags for r in runs)]:
        if AXES_TAG in tags:
            return list(json.loads(tags[AXES_TAG]))
    swept = sorted({k.removeprefix(AXIS_PARAM) for r in runs for k in r.params if k.startswith(AXIS_PARAM)})
    if swept:
        return swept
    keys = sorted(set.intersection(*(set(r.params) for r in runs)))  # a param some runs lack is not an axis
    differing = []
    for key in keys:
        if key in _BOOKKEEPING or key.startswith(_BOOKKEEPING_PREFIXES):
            continue
        values = {json.dumps(r.params.get(key), sort_keys=True, default=str) for r in runs}
        if len(values) > 1:
            differing.append(key)
    return differing


def axis_value(run: RunRecord, axis: str) -> Any:
    """The run's value on ``axis``: its ``axis.<key>`` param if logged, else the config param ``<key>``."""
    return run.params[AXIS_PARAM + axis] if AXIS_PARAM + axis in run.params else run.params.get(axis)


def metric_value(run: RunRecord, metric: str | None) -> float | None:
    value = run.metrics.get(metric) if metric else None
    return None if value is None or math.isnan(value) else value


def build_comparison(
    runs: Sequence[RunRecord],
    axes: Sequence[str] | None = None,
    metric: str | None = None,
    mode: str = "max",
) -> Comparison:
    """Tabulate ``runs``; rows are sorted by the axes' values, ``best`` is the best run by ``metric``."""
    from diffusioninst.config.sweep import short_names

    if not runs:
        raise ValueError("no runs with eval/steps_* metrics to compare")
    axes = list(axes if axes is not None else detect_axes(runs))
    found: set[tuple[str, str]] = {
        (m.group(2), m.group(3)) for r in runs for k in r.metrics if (m := AP_METRIC_RE.match(k))
    }
    order = list(dict.fromkeys((*COCO_AP_COLUMNS, *LVIS_AP_COLUMNS)))
    value_columns = [f"{t}/{c}" for t in TASKS for c in order if (t, c) in found]
    rows = []
    for run in runs:
        steps = sorted({int(m.group(1)) for k in run.metrics if (m := AP_METRIC_RE.match(k))})
        for s in steps:
            row: dict[str, Any] = {"run_id": run.run_id, "run": run.name, "status": run.status}
            row.update({a: axis_value(run, a) for a in axes})
            row["steps"] = s
            for col in value_columns:
                row[col] = run.metrics.get(f"eval/steps_{s}/{col}", math.nan)
            rows.append(row)
    rows.sort(key=lambda r: ([_sort_key(r[a]) for a in axes], r["steps"], r["run"]))
    show_steps = not ("sampler.steps" in axes and all(r["steps"] == r["sampler.steps"] for r in rows))
    labels = short_names(axes)
    if show_steps and "steps" in labels.values():
        labels = {a: (a if lab == "steps" else lab) for a, lab in labels.items()}
    best = None
    in_order = sorted(runs, key=lambda r: ([_sort_key(axis_value(r, a)) for a in axes], r.name))
    scored = [(v, r) for r in in_order if (v := metric_value(r, metric)) is not None]  # ties: first in order
    if scored:
        value, run = (max if mode == "max" else min)(scored, key=lambda x: x[0])
        best = {"run_id": run.run_id, "run": run.name, "value": value, **{a: axis_value(run, a) for a in axes}}
    return Comparison(axes, labels, value_columns, rows, show_steps, metric, mode, best)


def _sort_key(value: Any) -> tuple[int, Any]:
    if value is None:
        return (0, 0)
    if isinstance(value, bool):
        return (1, int(value))
    if isinstance(value, (int, float)):
        return (2, value)
    return (3, str(value))


# ----------------------------------------------------------------------------------------------
# Output


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def _axis_text(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:g}" if isinstance(value, float) else str(value)


def header(comp: Comparison) -> list[str]:
    cols = ["run", "status", *(comp.labels[a] for a in comp.axes)]
    cols += ["steps"] if comp.show_steps else []
    return cols + [c.replace("/", " ") for c in comp.value_columns]


def comparison_markdown(comp: Comparison, digits: int = 1) -> str:
    """The table as GitHub markdown (AP with ``digits`` decimals), followed by the best run if a metric is set."""
    body = []
    for r in comp.rows:
        cells = [r["run"], r["status"], *(_axis_text(r[a]) for a in comp.axes)]
        cells += [str(r["steps"])] if comp.show_steps else []
        body.append(cells + [_fmt(r[c], digits) for c in comp.value_columns])
    text = _markdown(header(comp), body)
    if comp.best is not None:
        where = ", ".join(f"{comp.labels[a]}={_axis_text(comp.best[a])}" for a in comp.axes)
        text += (
            f"\nbest by {comp.metric} ({comp.mode}): {comp.best['run']} ({where}): {comp.best['value']:.{digits}f}\n"
        )
    return text


def write_csv(comp: Comparison, path: str | Path) -> Path:
    """Full-precision CSV: run_id, run, status, axes (dotted keys), steps, ``<task>/<column>``."""
    path = Path(path)
    cols = ["run_id", "run", "status", *comp.axes, "steps", *comp.value_columns]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(cols)
        for r in comp.rows:
            writer.writerow(["" if r[c] is None else (repr(r[c]) if isinstance(r[c], float) else r[c]) for c in cols])
    return path


def write_comparison(comp: Comparison, out_dir: str | Path, plot: bool = True) -> dict[str, Path]:
    """``comparison.md``, ``comparison.csv`` and (with axes) ``comparison.png`` in ``out_dir``."""
    from diffusioninst.tracking.compare_plot import plot_comparison

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"comparison.md": out_dir / "comparison.md", "comparison.csv": out_dir / "comparison.csv"}
    files["comparison.md"].write_text(comparison_markdown(comp))
    write_csv(comp, files["comparison.csv"])
    if plot and comp.axes:
        files["comparison.png"] = plot_comparison(comp, out_dir / "comparison.png")
    return files


def log_comparison(tracking_uri: str, run_id: str, files: Iterable[Path], artifact_path: str = "comparison") -> None:
    """Attach the comparison files to a (parent) run."""
    from diffusioninst.tracking.mlflow_run import MlflowRun

    MlflowRun(tracking_uri, run_id).log_files(files, artifact_path)
