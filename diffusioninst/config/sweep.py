"""Sweep files: an experiment file plus a ``sweep:`` section (Ray Tune ablations, sampler sweeps).

A sweep file names its base experiment with ``_base_`` (and may override experiment keys like any experiment
file); ``sweep.search_space`` maps dotted experiment keys to plain-YAML domains::

    _base_: coco_r50.yaml
    name: ablation_lambda
    sweep:
      kind: train
      metric: eval/steps_1/segm/AP
      search_space:
        model.loss.mask_weight: {grid_search: [1.0, 2.0, 5.0, 8.0]}

Everything is validated before any work starts: every search-space key must be a leaf key of the experiment
schema, every ``grid_search``/``choice`` value (and every range bound) is applied as an override and the
experiment config rebuilt, so a bad value is reported with the same message ``--set`` would give.
"""

from __future__ import annotations

import copy
import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from diffusioninst.config.fields import option, section
from diffusioninst.config.loader import ConfigError, build_config, describe_keys, load_config, to_dict
from diffusioninst.config.schema import ExperimentConfig, Problem

DOMAIN_KINDS = ("grid_search", "choice", "uniform", "loguniform", "randint")
RANGE_KINDS = ("uniform", "loguniform", "randint")
SWEEP_KEY = "sweep"
_SWEPT = "<swept value>"
TASKS = ("bbox", "segm")
TRAIN_METRIC_RE = re.compile(r"^eval/steps_(\d+)/(\w+)/(\w+)$")
SAMPLER_METRIC_RE = re.compile(r"^eval/(\w+)/(\w+)$")


@dataclass
class SchedulerConfig:
    type: Literal["asha", "none"] = option(
        "none", help="trial scheduler: asha = stop bad trials early (AsyncHyperBand), none = run every trial fully"
    )
    time_attr: Literal["iteration"] = option(
        "iteration", help="progress measure ASHA compares trials at: the reported training iteration"
    )
    grace_period: int = option(1, min=1, help="ASHA: iterations every trial runs before it can be stopped")
    max_t: int | None = option(None, min=1, help="ASHA: iterations of a full trial (null = solver.max_iter)")
    reduction_factor: float = option(
        2.0, min=1.0, min_exclusive=True, help="ASHA: keep the best 1/reduction_factor of the trials at each rung"
    )


@dataclass
class SweepSpec:
    kind: Literal["train", "sampler"] = option(
        "train",
        help="train = one training run per trial (Ray Tune); sampler = evaluate one checkpoint under every "
        "sampler setting (no retraining)",
    )
    search_space: dict[str, Any] = option(
        {},
        help="dotted experiment key -> {grid_search|choice: [values]} or {uniform|loguniform|randint: [lo, hi]}",
    )
    metric: str = option(
        "eval/steps_1/segm/AP",
        help="what 'best' means: train sweeps eval/steps_<S>/<bbox|segm>/<AP...>; sampler sweeps "
        "eval/<bbox|segm>/<AP...> (at each setting's own step count)",
    )
    mode: Literal["max", "min"] = option("max", help="maximise or minimise the metric")
    scheduler: SchedulerConfig = section(SchedulerConfig, help="early stopping of train trials")
    num_samples: int = option(
        1, min=1, help="repeats of the search space (grid_search is expanded once per sample; random domains drawn)"
    )
    max_concurrent_trials: int = option(
        1, min=1, help="train trials run at once; each needs ray.num_workers x (cpus|gpus)_per_worker"
    )
    trial_max_failures: int = option(1, min=-1, help="restarts of a failed trial (its Train run resumes)")
    driver_resource: str | None = option(
        "driver",
        help="custom Ray resource trial drivers request (1 unit) when the cluster advertises it (only the head "
        "does, see cluster/aws-a100.yaml); otherwise a driver takes driver_cpus",
    )
    driver_cpus: float = option(0.01, min=0.0, min_exclusive=True, help="CPUs of a trial driver without that resource")
    seed: int | None = option(None, help="seed of random domains (choice/uniform/...); null = a fresh draw")
    checkpoint: str | None = option(
        None, help="sampler sweeps: checkpoint to evaluate (null = train the base experiment once, resumably)"
    )
    settings_per_pass: int = option(
        8,
        min=0,
        help="sampler sweeps: settings sampled per pass over the images (one encoder run per image and pass; "
        "results are stored after each pass); 0 = all in one pass",
    )


@dataclass
class SweepConfig(ExperimentConfig):
    """An experiment config plus the ``sweep`` section; ``name`` names the sweep."""

    sweep: SweepSpec = section(SweepSpec, help="the sweep: search space, metric, scheduler, resources")

    def check(self) -> list[Problem]:
        problems = super().check()
        base = experiment_tree(self)
        space = self.sweep.search_space
        if not space:
            problems.append(("sweep.search_space", "is empty: give at least one key to vary"))
        for key, domain in space.items():
            problems.extend(_check_axis(base, self.sweep.kind, key, domain))
        problems.extend(_check_metric(self))
        problems.extend(_check_scheduler(self))
        if self.sweep.kind == "train" and self.ray.num_workers == 0:
            problems.append(("ray.num_workers", "a train sweep runs each trial as a Ray Train run: needs >= 1 worker"))
        if self.sweep.kind == "train" and self.sweep.checkpoint is not None:
            problems.append(("sweep.checkpoint", "only sampler sweeps evaluate a given checkpoint"))
        return problems


# ----------------------------------------------------------------------------------------------
# Domains


@dataclass(frozen=True)
class Domain:
    """A parsed search-space domain: ``kind`` in :data:`DOMAIN_KINDS`, ``values`` (grid/choice) or ``bounds``."""

    kind: str
    values: tuple[Any, ...] = ()
    bounds: tuple[float, float] | None = None


def parse_domain(raw: Any) -> Domain:
    """Check the YAML shape of one domain; raises ``ValueError`` with the problem (no key or file in it)."""
    allowed = ", ".join(DOMAIN_KINDS)
    if not isinstance(raw, dict) or len(raw) != 1:
        raise ValueError(f"expected a mapping with exactly one of {allowed}, e.g. {{grid_search: [1, 2]}}; got {raw!r}")
    ((kind, arg),) = raw.items()
    if kind not in DOMAIN_KINDS:
        near = difflib.get_close_matches(str(kind), DOMAIN_KINDS, n=1, cutoff=0.6)
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise ValueError(f"unknown domain '{kind}'{hint}; allowed: {allowed}")
    if kind in ("grid_search", "choice"):
        if not isinstance(arg, list) or not arg:
            raise ValueError(f"{kind} needs a non-empty list of values, got {arg!r}")
        return Domain(kind, values=tuple(arg))
    numbers = isinstance(arg, list) and len(arg) == 2 and all(_is_number(v) for v in arg)
    if not numbers:
        raise ValueError(f"{kind} needs [low, high] (two numbers), got {arg!r}")
    lo, hi = arg
    if kind == "randint" and not all(isinstance(v, int) for v in arg):
        raise ValueError(f"randint needs integer bounds [low, high) , got {arg!r}")
    if not lo < hi:
        raise ValueError(f"{kind} needs low < high, got [{lo}, {hi}]")
    if kind == "loguniform" and lo <= 0:
        raise ValueError(f"loguniform needs 0 < low, got [{lo}, {hi}]")
    return Domain(kind, bounds=(lo, hi))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def probe_values(domain: Domain) -> list[Any]:
    """Values that must all be valid for the key: every grid/choice value, the range bounds (randint: hi - 1)."""
    if domain.values:
        return list(domain.values)
    lo, hi = domain.bounds
    if domain.kind == "randint":
        return [lo, hi - 1]
    return [float(lo), float(hi)]


# ----------------------------------------------------------------------------------------------
# Checks


def experiment_keys() -> dict[str, str]:
    """Leaf keys of :class:`ExperimentConfig` -> type name."""
    return {key: tp for key, tp, _, _ in describe_keys(ExperimentConfig)}


def _check_axis(base: dict[str, Any], kind: str, key: str, raw: Any) -> list[Problem]:
    where = f"sweep.search_space.{key}"
    keys = experiment_keys()
    if key not in keys:
        sections = {k.rsplit(".", i)[0] for k in keys for i in range(1, k.count(".") + 1)}
        if key in sections:
            leaves = sorted(k for k in keys if k.startswith(key + "."))[:6]
            return [
                (where, f"'{key}' is a config section, not a value; vary one of its keys, e.g. {', '.join(leaves)}")
            ]
        near = difflib.get_close_matches(key, list(keys), n=1, cutoff=0.6)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        return [(where, f"unknown experiment key '{key}'{hint} (python pipelines/train.py --list-keys lists them)")]
    if kind == "sampler" and not key.startswith("sampler."):
        return [
            (
                where,
                f"a sampler sweep evaluates one checkpoint, so only sampler.* keys can vary; use kind: train "
                f"to vary '{key}'",
            )
        ]
    if kind == "train" and key.startswith("sampler."):
        return [(where, f"'{key}' needs no retraining: put it in a kind: sampler sweep (evaluates one checkpoint)")]
    try:
        domain = parse_domain(raw)
    except ValueError as e:
        return [(where, str(e))]
    if domain.kind in RANGE_KINDS:
        tp = keys[key]
        wanted = ("int", "int or null") if domain.kind == "randint" else ("float", "float or null", "int or float")
        if tp not in wanted:
            return [
                (
                    where,
                    f"{domain.kind} draws {'integers' if domain.kind == 'randint' else 'floats'} but "
                    f"'{key}' is {tp}; use grid_search or choice",
                )
            ]
    problems = []
    for value in probe_values(domain):
        bad = value_problems(base, key, value)
        if bad:
            problems.append((where, f"{domain.kind} value {value!r} is invalid: {'; '.join(bad)}"))
    return problems


def value_problems(base: dict[str, Any], key: str, value: Any) -> list[str]:
    """Problems of the experiment ``base`` with ``key`` set to ``value`` (empty when it builds)."""
    try:
        apply_params(base, {key: value})
    except ConfigError as e:
        return [p.removeprefix(f"{_SWEPT}: ") for p in e.problems]
    return []


def ap_metric_columns(cfg: ExperimentConfig) -> tuple[str, ...]:
    """AP columns the evaluation of ``cfg`` reports (COCO, or LVIS with APr/APc/APf)."""
    from diffusioninst.evaluation.eval_result import COCO_AP_COLUMNS, LVIS_AP_COLUMNS

    lvis = cfg.eval.evaluator == "lvis" or (cfg.eval.evaluator == "auto" and cfg.data.format == "lvis")
    return LVIS_AP_COLUMNS if lvis else COCO_AP_COLUMNS


def _check_metric(cfg: SweepConfig) -> list[Problem]:
    metric, columns = cfg.sweep.metric, ap_metric_columns(cfg)
    tasks = [t for t in TASKS if t in cfg.eval.tasks]
    if cfg.sweep.kind == "train":
        m = TRAIN_METRIC_RE.match(metric)
        if not m:
            return [
                (
                    "sweep.metric",
                    f"train sweeps rank trials by eval/steps_<S>/<task>/<column>, e.g. "
                    f"eval/steps_{cfg.eval.steps[0]}/segm/AP; got {metric!r}",
                )
            ]
        steps, task, column = int(m.group(1)), m.group(2), m.group(3)
        if steps not in cfg.eval.steps:
            return [("sweep.metric", f"{metric!r} is never reported: eval.steps is {cfg.eval.steps}")]
    else:
        m = SAMPLER_METRIC_RE.match(metric)
        if not m:
            return [
                (
                    "sweep.metric",
                    f"sampler sweeps rank settings by eval/<task>/<column> (at each setting's own "
                    f"step count), e.g. eval/segm/AP; got {metric!r}",
                )
            ]
        task, column = m.group(1), m.group(2)
    if task not in tasks:
        return [("sweep.metric", f"task '{task}' is not evaluated; eval.tasks: {tasks}")]
    if column not in columns:
        return [("sweep.metric", f"unknown AP column '{column}'; allowed: {', '.join(columns)}")]
    return []


def _check_scheduler(cfg: SweepConfig) -> list[Problem]:
    sch = cfg.sweep.scheduler
    if sch.type == "none":
        return []
    if cfg.sweep.kind == "sampler":
        return [("sweep.scheduler.type", "a sampler sweep trains nothing to stop early; use none")]
    problems: list[Problem] = []
    max_t = sch.max_t or cfg.solver.max_iter
    if sch.max_t is not None and sch.max_t < cfg.solver.max_iter:
        problems.append(
            (
                "sweep.scheduler.max_t",
                f"would stop every trial before solver.max_iter ({cfg.solver.max_iter}); use null or >= it",
            )
        )
    if sch.grace_period > max_t:
        problems.append(("sweep.scheduler.grace_period", f"must be <= max_t ({max_t})"))
    if cfg.solver.eval_period == 0 or cfg.solver.eval_period > sch.grace_period:
        problems.append(
            (
                "solver.eval_period",
                f"ASHA compares trials by {cfg.sweep.metric} during training: set solver.eval_period > 0 and <= "
                f"sweep.scheduler.grace_period ({sch.grace_period}), ideally dividing it",
            )
        )
    return problems


# ----------------------------------------------------------------------------------------------
# Loading and applying


def experiment_tree(cfg: SweepConfig | ExperimentConfig) -> dict[str, Any]:
    """The experiment part of a (sweep) config as a plain mapping."""
    tree = to_dict(cfg)
    tree.pop(SWEEP_KEY, None)
    return tree


def experiment_of(cfg: SweepConfig) -> ExperimentConfig:
    """The base experiment of a sweep (already validated as part of the sweep file)."""
    return build_config(ExperimentConfig, experiment_tree(cfg))


def apply_params(base: dict[str, Any] | ExperimentConfig, params: dict[str, Any]) -> ExperimentConfig:
    """``base`` (mapping or config) with dotted ``params`` set, validated; raises :class:`ConfigError`."""
    tree = copy.deepcopy(base if isinstance(base, dict) else to_dict(base))
    sources = {}
    for key, value in params.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = _plain(value)
        sources[key] = _SWEPT
    return build_config(ExperimentConfig, tree, sources)


def _plain(value: Any) -> Any:
    """numpy scalars (drawn by Tune) -> Python numbers, so the typed validator accepts them."""
    item = getattr(value, "item", None)
    return item() if callable(item) and not isinstance(value, (list, dict, str)) else value


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> SweepConfig:
    """Load and validate a sweep file (``--set`` overrides may target experiment or ``sweep.*`` keys)."""
    return load_config(SweepConfig, path, overrides)


def short_names(keys: list[str]) -> dict[str, str]:
    """Shortest unambiguous trailing part of each dotted key (``model.loss.mask_weight`` -> ``mask_weight``)."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            cand = ".".join(parts[-n:])
            if sum(1 for k in keys if k == cand or k.endswith("." + cand)) == 1:
                out[key] = cand
                break
        else:
            out[key] = key
    return out


__all__ = [
    "DOMAIN_KINDS",
    "Domain",
    "SchedulerConfig",
    "SweepConfig",
    "SweepSpec",
    "apply_params",
    "experiment_of",
    "experiment_tree",
    "load_sweep",
    "parse_domain",
    "short_names",
]
