"""Sampler sweeps: one trained checkpoint evaluated under every sampler setting, without retraining.

Steps:

1. the checkpoint: ``sweep.checkpoint``, else the base experiment is trained once (a child run with role
   ``base``; re-running resumes that training, and a finished one is found again through
   ``<storage>/<sweep>/base_checkpoint.json``);
2. the settings: the search space expanded (``settings.json`` keeps them, so random draws survive a resume),
   canonicalised and de-duplicated (:func:`~diffusioninst.tune.space.sampler_settings`);
3. settings without a stored result are evaluated in passes of ``sweep.settings_per_pass`` (one encoder run
   per image and pass); each result is stored as ``sampler/results/<setting id>.json`` right after its pass;
4. each setting becomes one child run (params: its config and swept values; metrics
   ``eval/steps_<S>/<task>/<column>`` plus ``eval/<task>/<column>``; its AP tables), then the comparison.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusioninst.config import ExperimentConfig, SamplerConfig, flatten
from diffusioninst.config.sweep import experiment_of
from diffusioninst.engine.launch import LaunchError, prepare, run_key, train
from diffusioninst.tracking import start_or_resume_run
from diffusioninst.tracking.compare import ROLE_TAG
from diffusioninst.tune import store
from diffusioninst.tune.common import SweepContext, axis_label, axis_params, finalize
from diffusioninst.tune.space import expand, sampler_settings, setting_id

SETTING_TAG = "diffusioninst.sweep.setting_id"


@dataclass
class Setting:
    sid: str
    params: dict[str, Any]  # swept values as shown (None = no effect in this setting)
    sampler: SamplerConfig


def base_checkpoint(ctx: SweepContext, base: ExperimentConfig) -> str:
    """``sweep.checkpoint``, or the final checkpoint of the base training (trained here once, resumably)."""
    if ctx.cfg.sweep.checkpoint:
        return ctx.cfg.sweep.checkpoint
    marker = store.join(ctx.key, "base_checkpoint.json")
    found = store.read_json(marker)
    if found is not None:
        print(f"[sweep] using the base training's checkpoint {found['checkpoint']}", flush=True)
        return found["checkpoint"]
    cfg = dataclasses.replace(
        base,
        name=f"base-{ctx.parent.run_id[:8]}",
        output_dir=str(ctx.output_dir / "base"),
        ray=dataclasses.replace(base.ray, storage_path=ctx.train_storage),
    )
    start_or_resume_run(
        ctx.tracking_uri,
        cfg.tracking.experiment_name,
        f"{ctx.cfg.name}-base",
        run_key=run_key(cfg),
        tags={ROLE_TAG: "base", "diffusioninst.sweep.key": ctx.key},
        parent_run_id=ctx.parent.run_id,
    )
    print(f"[sweep] no sweep.checkpoint given: training the base experiment ({cfg.name}) first", flush=True)
    outcome = train(cfg, parent_run_id=ctx.parent.run_id)
    path = outcome.checkpoint_path
    if path is None:
        raise LaunchError(f"the base training {cfg.name} wrote no checkpoint")
    scheme = ctx.key.split("://", 1)[0] if store.is_uri(ctx.key) else None
    if scheme and not store.is_uri(path):
        path = f"{scheme}://{path}"
    store.write_json(marker, {"checkpoint": path, "run_id": outcome.run_id})
    return path


def sweep_settings(ctx: SweepContext, base: ExperimentConfig) -> tuple[list[Setting], int]:
    """The distinct settings (expanded once and kept in ``settings.json``) and how many duplicates were dropped."""
    sweep = ctx.cfg.sweep
    path = store.join(ctx.sampler_dir, "settings.json")
    saved = store.read_json(path)
    if saved is None:
        saved = {
            "search_space": sweep.search_space,
            "variants": expand(sweep.search_space, sweep.num_samples, sweep.seed),
        }
        store.write_json(path, saved)
    pairs, dropped = sampler_settings(base.sampler, saved["variants"])
    return [Setting(setting_id(s), shown, s) for shown, s in pairs], dropped


def result_path(ctx: SweepContext, sid: str) -> str:
    return store.join(ctx.sampler_dir, "results", f"{sid}.json")


def evaluate_pending(ctx: SweepContext, base: ExperimentConfig, checkpoint: str, pending: list[Setting]) -> None:
    """Evaluate ``pending`` in passes; store each result as soon as its pass is scored."""
    from diffusioninst.evaluation import flat_metrics
    from diffusioninst.tune.sampler_eval import evaluate_settings

    per_pass = ctx.cfg.sweep.settings_per_pass or len(pending)
    for start in range(0, len(pending), per_pass):
        group = pending[start : start + per_pass]
        t0 = time.perf_counter()
        print(f"[sweep] pass {start // per_pass + 1}: {len(group)} setting(s) on one encoder run per image", flush=True)
        results = evaluate_settings(base, checkpoint, {s.sid: s.sampler for s in group})
        for s in group:
            res = results[s.sid]
            record = {
                "setting_id": s.sid,
                "params": s.params,
                "sampler": dataclasses.asdict(s.sampler),
                "checkpoint": checkpoint,
                "metrics": flat_metrics({s.sampler.steps: res}, res.kind),
                "result": res.to_dict(),
            }
            store.write_json(result_path(ctx, s.sid), record)
        print(f"[sweep] pass scored in {time.perf_counter() - t0:.1f} s", flush=True)


def log_setting(ctx: SweepContext, base: ExperimentConfig, setting: Setting, record: dict[str, Any]) -> None:
    """The setting's child run (created once, keyed by parent run and setting id; finished runs are skipped)."""
    from diffusioninst.evaluation import EvalResult, write_ap_tables

    run, _ = start_or_resume_run(
        ctx.tracking_uri,
        base.tracking.experiment_name,
        axis_label(setting.params),
        run_key=f"{ctx.parent.run_id}/sampler/{setting.sid}",
        tags={ROLE_TAG: "setting", SETTING_TAG: setting.sid, "diffusioninst.sweep.key": ctx.key},
        parent_run_id=ctx.parent.run_id,
    )
    if run.client.get_run(run.run_id).data.tags.get("diffusioninst.sweep.logged") == "1":
        run.finish()
        return
    cfg = dataclasses.replace(base, sampler=setting.sampler)
    run.log_params({**flatten(cfg), **axis_params(setting.params), "eval.checkpoint": record["checkpoint"]})
    metrics = dict(record["metrics"])
    prefix = f"eval/steps_{setting.sampler.steps}/"
    metrics.update({"eval/" + k.removeprefix(prefix): v for k, v in record["metrics"].items() if k.startswith(prefix)})
    run.log_metrics(metrics)
    result = EvalResult.from_dict(record["result"])
    with tempfile.TemporaryDirectory() as tmp:
        write_ap_tables({setting.sampler.steps: result}, Path(tmp), result.kind)
        run.log_artifacts(tmp, "eval")
    run.set_tags({"diffusioninst.sweep.logged": "1"})
    run.finish()


def run_sampler_sweep(ctx: SweepContext) -> list[Setting]:
    """Evaluate every pending setting, log every setting's child run, write the comparison."""
    base = prepare(experiment_of(ctx.cfg))
    checkpoint = base_checkpoint(ctx, base)
    settings, dropped = sweep_settings(ctx, base)
    pending = [s for s in settings if store.read_json(result_path(ctx, s.sid)) is None]
    print(
        f"[sweep] {ctx.cfg.name}: {len(settings)} distinct sampler setting(s) ({dropped} duplicate(s) dropped: "
        f"knobs without effect at 1 step / without ensembling), {len(settings) - len(pending)} already evaluated, "
        f"{len(pending)} to evaluate on {checkpoint}",
        flush=True,
    )
    if pending:
        evaluate_pending(ctx, base, checkpoint, pending)
    for s in settings:
        log_setting(ctx, base, s, store.read_json(result_path(ctx, s.sid)))
    finalize(ctx, role="setting")
    ctx.parent.finish("FINISHED")
    return settings
