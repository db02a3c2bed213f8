"""Sweeps: sweep-file validation, YAML domains -> Tune, sampler-setting folding, MLflow comparison, and one
end-to-end train sweep (Ray Tune + Ray Train + MLflow, resumed without re-running finished trials)."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffusioninst.config import ConfigError, SamplerConfig
from diffusioninst.config.sweep import load_sweep, parse_domain

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "experiments" / "demo.yaml"


def write_sweep(tmp_path: Path, sweep: dict, **experiment) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps({"_base_": str(DEMO), "name": "t", **experiment, "sweep": sweep}))
    return path


def problems_of(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as err:
        load_sweep(path, overrides)
    return str(err.value)


# ----------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    ("sweep", "expected"),
    [
        (
            {"search_space": {"model.loss.mask_weigth": {"grid_search": [1.0]}}},
            [
                "sweep.search_space.model.loss.mask_weigth",
                "unknown experiment key",
                "did you mean 'model.loss.mask_weight'",
            ],
        ),
        ({"search_space": {"model.loss": {"grid_search": [1.0]}}}, ["is a config section, not a value"]),
        (
            {"search_space": {"model.loss.mask_weight": {"gridsearch": [1.0]}}},
            ["unknown domain 'gridsearch'", "did you mean grid_search", "allowed: grid_search, choice, uniform"],
        ),
        ({"search_space": {"model.loss.mask_weight": [1.0, 2.0]}}, ["expected a mapping with exactly one of"]),
        ({"search_space": {"model.loss.mask_weight": {"uniform": [3.0, 1.0]}}}, ["uniform needs low < high"]),
        ({"search_space": {"solver.base_lr": {"loguniform": [0.0, 1.0]}}}, ["loguniform needs 0 < low"]),
        (
            {"search_space": {"model.loss.mask_weight": {"grid_search": [1.0, "heavy"]}}},
            ["grid_search value 'heavy' is invalid", "model.loss.mask_weight: expected float, got 'heavy'"],
        ),
        (
            {"search_space": {"model.loss.mask_weight": {"choice": [2.0, -1.0]}}},
            ["choice value -1.0 is invalid", "-1.0 is out of range; allowed: >= 0.0"],
        ),
        (
            {"search_space": {"model.head.num_proposals": {"uniform": [50, 300]}}},
            ["uniform draws floats but 'model.head.num_proposals' is int"],
        ),
        (
            {"search_space": {"model.head.num_proposals": {"randint": [0, 10]}}},
            ["randint value 0 is invalid", "model.head.num_proposals: 0 is out of range; allowed: >= 1"],
        ),
        (
            {"search_space": {"model.loss.mask_weight": {"grid_search": [1.0]}}, "mode": "maximize"},
            ["sweep.mode: expected one of 'max', 'min', got 'maximize'"],
        ),
        (
            {"search_space": {"model.loss.mask_weight": {"grid_search": [1.0]}}, "metric": "eval/steps_8/segm/AP"},
            ["'eval/steps_8/segm/AP' is never reported: eval.steps is [1, 4]"],
        ),
        (
            {"search_space": {"model.loss.mask_weight": {"grid_search": [1.0]}}, "metric": "segm/AP"},
            ["train sweeps rank trials by eval/steps_<S>/<task>/<column>"],
        ),
        (
            {"search_space": {"model.loss.mask_weight": {"grid_search": [1.0]}}, "metric": "eval/steps_1/segm/APx"},
            ["unknown AP column 'APx'"],
        ),
        ({"search_space": {"sampler.eta": {"grid_search": [0.0, 1.0]}}}, ["'sampler.eta' needs no retraining"]),
        (
            {
                "kind": "sampler",
                "metric": "eval/segm/AP",
                "search_space": {"model.loss.mask_weight": {"choice": [1.0]}},
            },
            ["only sampler.* keys can vary"],
        ),
        ({"search_space": {}}, ["sweep.search_space: is empty"]),
        (
            {"search_space": {"model.loss.mask_weight": {"grid_search": [1.0]}}, "scheduler": {"type": "asha"}},
            [f"{DEMO}: solver.eval_period: ASHA compares trials by eval/steps_1/segm/AP during training"],
        ),
        (
            {"search_space": {"model.loss.mask_weight": {"grid_search": [1.0]}}, "scheduler": {"type": "hyperband"}},
            ["sweep.scheduler.type: expected one of 'asha', 'none'"],
        ),
    ],
)
def test_sweep_validation_names_file_key_and_fix(tmp_path, sweep, expected):
    path = write_sweep(tmp_path, sweep)
    text = problems_of(path)
    assert str(path) in text or str(DEMO) in text  # the file that set the offending key
    for fragment in expected:
        assert fragment in text, f"{fragment!r} not in:\n{text}"


def test_sweep_validation_reports_every_problem_and_set_overrides(tmp_path):
    path = write_sweep(tmp_path, {"search_space": {"model.loss.mask_weight": {"grid_search": [1.0, -2.0]}}})
    text = problems_of(path, ["sweep.mode=best", "sweep.num_samples=0"])
    assert "--set: sweep.mode: expected one of 'max', 'min', got 'best'" in text
    assert "--set: sweep.num_samples: 0 is out of range; allowed: >= 1" in text
    # a --set that fixes the base config makes a value valid that the file alone rejects
    path = write_sweep(tmp_path, {"search_space": {"model.head.nheads": {"grid_search": [4, 3]}}})
    assert "model.head.nheads: must divide model.head.hidden_dim (64)" in problems_of(path)
    cfg = load_sweep(path, ["model.head.hidden_dim=96", "model.fpn.out_channels=96"])
    assert cfg.sweep.search_space == {"model.head.nheads": {"grid_search": [4, 3]}}


def test_shipped_sweep_files_validate():
    from diffusioninst.config.sweep import experiment_of
    from diffusioninst.tune.space import expand, sampler_settings

    counts = {}
    for path in sorted((ROOT / "experiments").glob("ablation_*.yaml")):
        cfg = load_sweep(path)
        variants = expand(cfg.sweep.search_space, cfg.sweep.num_samples, cfg.sweep.seed)
        if cfg.sweep.kind == "sampler":
            variants = sampler_settings(experiment_of(cfg).sampler, variants)[0]
        counts[path.stem] = len(variants)
    assert counts == {
        "ablation_lambda": 4,
        "ablation_lambda_smoke": 2,
        "ablation_proposals": 3,
        "ablation_proposals_smoke": 2,
        "ablation_sampler": 37,
        "ablation_sampler_smoke": 5,
        "ablation_signal_scale": 4,
        "ablation_signal_scale_smoke": 2,
    }


# ----------------------------------------------------------------------------------------------
# Domains


def test_yaml_domains_become_tune_domains():
    from ray import tune
    from ray.tune.search.sample import Categorical, Float, Integer

    from diffusioninst.tune.space import to_tune_space

    space = to_tune_space(
        {
            "a": {"grid_search": [1, 2]},
            "b": {"choice": ["x", "y"]},
            "c": {"uniform": [0.5, 2]},
            "d": {"loguniform": [1e-4, 1e-2]},
            "e": {"randint": [3, 7]},
        }
    )
    assert space["a"] == tune.grid_search([1, 2]) == {"grid_search": [1, 2]}
    assert isinstance(space["b"], Categorical) and space["b"].categories == ["x", "y"]
    assert isinstance(space["c"], Float) and (space["c"].lower, space["c"].upper) == (0.5, 2.0)
    assert type(space["c"].sampler).__name__ == "_Uniform"
    assert isinstance(space["d"], Float) and (space["d"].lower, space["d"].upper) == (1e-4, 1e-2)
    assert type(space["d"].sampler).__name__ == "_LogUniform"
    assert isinstance(space["e"], Integer) and (space["e"].lower, space["e"].upper) == (3, 7)


def test_expand_grid_and_seeded_random_draws():
    from diffusioninst.tune.space import expand

    space = {"g": {"grid_search": [1, 2, 3]}, "u": {"uniform": [0.5, 2.0]}, "r": {"randint": [3, 5]}}
    a = expand(space, num_samples=20, seed=7)
    assert len(a) == 60 and a == expand(space, num_samples=20, seed=7)
    assert [v["g"] for v in a[:3]] == [1, 2, 3]
    assert all(0.5 <= v["u"] <= 2.0 and isinstance(v["u"], float) for v in a)
    assert {v["r"] for v in a} == {3, 4}  # upper bound exclusive, as in Tune
    logs = [math.log10(v["d"]) for v in expand({"d": {"loguniform": [1e-4, 1e-0]}}, num_samples=400, seed=0)]
    assert all(-4 <= x <= 0 for x in logs)
    assert sum(x < -2 for x in logs) == pytest.approx(200, abs=40)  # uniform in log space: half below 1e-2


def test_parse_domain_rejects_non_integer_randint():
    with pytest.raises(ValueError, match="randint needs integer bounds"):
        parse_domain({"randint": [1.5, 3]})


def test_sampler_grid_folds_settings_without_effect():
    from diffusioninst.tune.space import canonical_sampler, expand, sampler_settings

    grid = {
        "sampler.steps": {"grid_search": [1, 2, 4, 8]},
        "sampler.eta": {"grid_search": [0.0, 1.0]},
        "sampler.box_renewal": {"grid_search": [True, False]},
        "sampler.ensemble": {"grid_search": [True, False]},
        "sampler.ensemble_last_step": {"grid_search": [False, True]},
    }
    settings, dropped = sampler_settings(SamplerConfig(), expand(grid))
    # 1 step: everything else is inert; >1 step: eta x renewal x (no ensemble | ensemble x last-step on/off)
    assert len(settings) == 1 + 3 * 2 * 2 * 3 and dropped == 64 - 37
    one = [shown for shown, s in settings if s.steps == 1]
    assert one == [{"sampler.steps": 1, **dict.fromkeys(list(grid)[1:])}]
    no_ens = [shown for shown, s in settings if s.steps > 1 and not s.ensemble]
    assert len(no_ens) == 12 and all(shown["sampler.ensemble_last_step"] is None for shown in no_ens)
    assert len({json.dumps(vars(s), sort_keys=True) for _, s in settings}) == 37
    assert canonical_sampler(SamplerConfig(steps=1, eta=0.0, ensemble=False)) == SamplerConfig(steps=1)


# ----------------------------------------------------------------------------------------------
# Comparison


def _log_run(client, exp_id, name, params, metrics, tags=None):
    from mlflow.entities import Metric, Param

    run = client.create_run(exp_id, run_name=name, tags=tags or {})
    client.log_batch(
        run.info.run_id,
        params=[Param(k, str(v)) for k, v in params.items()],
        metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()],
    )
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def _ap(steps: int, box: float, mask: float) -> dict[str, float]:
    out = {}
    for task, base in (("bbox", box), ("segm", mask)):
        for i, col in enumerate(("AP", "AP50", "AP75", "APs", "APm", "APl")):
            out[f"eval/steps_{steps}/{task}/{col}"] = base + i
    return out


@pytest.fixture
def sweep_store(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("cmp", artifact_location=(tmp_path / "art").as_uri())
    axes = json.dumps(["model.loss.mask_weight"])
    parent = _log_run(
        client,
        exp,
        "sweep",
        {},
        {},
        {"diffusioninst.sweep.axes": axes, "diffusioninst.sweep.metric": "eval/steps_1/segm/AP"},
    )
    child = {"mlflow.parentRunId": parent, "diffusioninst.sweep.role": "trial"}
    for lam, box, mask in ((8.0, 20.0, 15.0), (2.0, 30.0, 25.5), (5.0, 31.0, 24.0)):
        params = {"model.loss.mask_weight": lam, "name": f"trial_{lam}", "model.head.num_proposals": 100}
        _log_run(client, exp, f"mask_weight={lam}", params, {**_ap(1, box, mask), **_ap(4, box + 1, mask + 1)}, child)
    base = {"mlflow.parentRunId": parent, "diffusioninst.sweep.role": "base"}
    _log_run(client, exp, "base", {"model.loss.mask_weight": 5.0}, _ap(1, 99.0, 99.0), base)
    return uri, parent


def test_comparison_table_csv_and_plot_from_mlflow(sweep_store, tmp_path):
    from diffusioninst.tracking.compare import build_comparison, comparison_markdown, fetch_runs, write_comparison

    uri, parent = sweep_store
    runs, tags = fetch_runs(uri, parent=parent)
    assert sorted(r.name for r in runs) == ["mask_weight=2.0", "mask_weight=5.0", "mask_weight=8.0"]  # base excluded
    comp = build_comparison(runs, axes=["model.loss.mask_weight"], metric=tags["diffusioninst.sweep.metric"])
    assert [(r["model.loss.mask_weight"], r["steps"]) for r in comp.rows] == [
        (2.0, 1), (2.0, 4), (5.0, 1), (5.0, 4), (8.0, 1), (8.0, 4)
    ]  # fmt: skip
    assert comp.rows[0]["segm/AP"] == 25.5 and comp.rows[1]["bbox/AP75"] == 33.0 and comp.rows[5]["segm/APl"] == 21.0
    assert comp.best["model.loss.mask_weight"] == 2.0 and comp.best["value"] == 25.5
    md = comparison_markdown(comp)
    assert md.splitlines()[0].split("|")[1:5] == [" run             ", " status   ", " mask_weight ", " steps "]
    assert "| mask_weight=2.0 | finished |           2 |     1 |    30.0 |" in md
    assert "best by eval/steps_1/segm/AP (max): mask_weight=2.0 (mask_weight=2): 25.5" in md
    files = write_comparison(comp, tmp_path / "out")
    rows = list(csv.DictReader(files["comparison.csv"].open()))
    assert len(rows) == 6 and float(rows[2]["segm/AP"]) == 24.0 and rows[2]["model.loss.mask_weight"] == "5.0"
    assert float(rows[5]["bbox/APs"]) == 24.0
    png = files["comparison.png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_compare_cli_detects_axes_without_sweep_tags(sweep_store, capsys, tmp_path):
    sys.path.insert(0, str(ROOT / "pipelines"))
    import compare as compare_cli

    uri, _ = sweep_store
    assert compare_cli.main(["--experiment", "cmp", "--tracking-uri", uri, "--output", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    # no axes tag on the runs themselves: the differing param (mask_weight) is the axis; 'name' is bookkeeping
    assert out.splitlines()[0].split("|")[3].strip() == "mask_weight"
    assert "| base" in out and out.count("\n| ") == 7  # header + 7 rows (base: steps 1 only)
    assert (tmp_path / "o" / "comparison.png").is_file()
    assert compare_cli.main(["--experiment", "nope", "--tracking-uri", uri]) == 1
    assert "no MLflow experiment named 'nope'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Sampler sweep (in-process, no Ray)


def test_sampler_sweep_shares_checkpoint_and_resumes(tmp_path, monkeypatch, capsys):
    import torch

    from diffusioninst.config import to_yaml
    from diffusioninst.config.sweep import experiment_of
    from diffusioninst.engine.checkpoint import write_checkpoint
    from diffusioninst.model import build_model
    from diffusioninst.tune import run_sweep, sampler_eval

    sweep = {
        "kind": "sampler",
        "metric": "eval/segm/AP",
        "search_space": {
            "sampler.steps": {"grid_search": [1, 2]},
            "sampler.ensemble_last_step": {"grid_search": [False, True]},
        },
    }
    path = write_sweep(
        tmp_path,
        sweep,
        output_dir=str(tmp_path / "out"),
        data={"synthetic": {"root": str(tmp_path / "data"), "num_train": 2, "num_val": 2, "image_size": [96, 96],
                            "max_object_size": 60, "min_object_size": 16},
              "augmentation": {"min_size_test": 96, "max_size_test": 160}},
        model={"head": {"num_proposals": 20}},
        eval={"max_images": 2},
        ray={"num_workers": 0, "storage_path": str(tmp_path / "runs")},
        tracking={"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment_name": "s"},
    )  # fmt: skip
    cfg = load_sweep(path)
    torch.manual_seed(0)
    ckpt = tmp_path / "ckpt"
    base = experiment_of(cfg)
    write_checkpoint(ckpt, {"model": build_model(base.model).state_dict(), "iteration": 0}, to_yaml(base))
    cfg = load_sweep(path, [f"sweep.checkpoint={ckpt}"])

    calls = []
    real = sampler_eval.evaluate_settings
    monkeypatch.setattr(sampler_eval, "evaluate_settings", lambda c, k, s: calls.append(sorted(s)) or real(c, k, s))
    settings = run_sweep(cfg)
    assert len(settings) == 3 and len(calls) == 1 and len(calls[0]) == 3  # one pass: the encoder runs once
    first = capsys.readouterr().out
    assert "3 distinct sampler setting(s) (1 duplicate(s) dropped" in first

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("s").experiment_id
    parents = client.search_runs([exp], "tags.`diffusioninst.kind` = 'sweep'")
    assert len(parents) == 1
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    assert len(children) == 3 and {c.data.tags["diffusioninst.sweep.role"] for c in children} == {"setting"}
    for c in children:
        steps = int(c.data.params["sampler.steps"])
        assert c.data.metrics[f"eval/steps_{steps}/segm/AP"] == c.data.metrics["eval/segm/AP"]
        assert c.data.params["eval.checkpoint"] == str(ckpt) and c.info.status == "FINISHED"
    one_step = [c for c in children if c.data.params["sampler.steps"] == "1"]
    assert one_step[0].data.params["axis.sampler.ensemble_last_step"] == "None"
    arts = {a.path for a in client.list_artifacts(parents[0].info.run_id, "comparison")}
    assert arts == {"comparison/comparison.md", "comparison/comparison.csv", "comparison/comparison.png"}
    assert len(list(csv.DictReader((tmp_path / "out" / "comparison.csv").open()))) == 3

    settings = run_sweep(cfg)  # resumed: every setting's result is stored, nothing is evaluated again
    assert len(settings) == 3 and len(calls) == 1
    assert "3 already evaluated, 0 to evaluate" in capsys.readouterr().out
    assert len(client.search_runs([exp], "")) == 4


# ----------------------------------------------------------------------------------------------
# End to end (Ray Tune + Ray Train + MLflow)


def _sweep_cmd(tmp_path: Path) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "pipelines" / "tune.py"),
        str(ROOT / "experiments" / "ablation_lambda_smoke.yaml"),
        "--set",
        f"ray.storage_path={tmp_path / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"output_dir={tmp_path / 'out'}",
        f"data.synthetic.root={tmp_path / 'data'}",
    ]


def _run(cmd: list[str], timeout: int) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    return proc, time.perf_counter() - t0


@pytest.mark.slow
@pytest.mark.ray
def test_train_sweep_end_to_end_and_rerun_keeps_finished_trials(tmp_path):
    from mlflow.tracking import MlflowClient

    proc, first_s = _run(_sweep_cmd(tmp_path), timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("diffusioninst-sweeps-smoke").experiment_id
    parents = client.search_runs([exp], "tags.`diffusioninst.kind` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0].info.run_id
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(float(c.data.params["model.loss.mask_weight"]) for c in children) == [2.0, 8.0]
    for c in children:
        assert c.data.tags["diffusioninst.sweep.role"] == "trial"
        assert c.data.params["axis.model.loss.mask_weight"] == c.data.params["model.loss.mask_weight"]
        assert c.data.params["name"] == "trial_" + c.data.tags["diffusioninst.sweep.trial_id"]
        assert "eval/steps_1/segm/AP" in c.data.metrics and "eval/steps_1/bbox/AP" in c.data.metrics
        status = c.data.tags["diffusioninst.sweep.trial_status"]
        assert status == "finished" or status.startswith("stopped at iteration 4")  # ASHA may stop one
        train_dir = tmp_path / "runs" / "ablation_lambda_smoke" / "train" / c.data.params["name"]
        assert (train_dir / "checkpoint_0000004" / "state.pt").is_file()
    arts = {a.path for a in client.list_artifacts(parent, "comparison")}
    assert arts == {"comparison/comparison.md", "comparison/comparison.csv", "comparison/comparison.png"}
    rows = list(csv.DictReader((tmp_path / "out" / "comparison.csv").open()))
    by_lambda = {float(r["model.loss.mask_weight"]): r for r in rows}
    assert sorted(by_lambda) == [2.0, 8.0]
    for c in children:
        row = by_lambda[float(c.data.params["model.loss.mask_weight"])]
        assert float(row["segm/AP"]) == pytest.approx(c.data.metrics["eval/steps_1/segm/AP"])
    checkpoints = sorted(p.relative_to(tmp_path) for p in (tmp_path / "runs").rglob("checkpoint_0*"))

    proc, second_s = _run(_sweep_cmd(tmp_path), timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming the Tune experiment" in proc.stdout
    assert "[train]" not in proc.stdout + proc.stderr  # no training iteration ran again
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "runs").rglob("checkpoint_0*")) == checkpoints
    again = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert {c.info.run_id for c in again} == {c.info.run_id for c in children}
    assert len(client.search_runs([exp], "tags.`diffusioninst.kind` = 'sweep'")) == 1
    assert second_s < first_s


def test_trial_outcomes_are_tagged_on_child_runs(tmp_path):
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    from diffusioninst.tune.common import TRIAL_TAG, open_sweep
    from diffusioninst.tune.train_sweep import mark_children, summarize

    path = write_sweep(
        tmp_path,
        {"search_space": {"model.loss.mask_weight": {"grid_search": [1.0, 2.0, 5.0, 8.0]}}},
        output_dir=str(tmp_path / "out"),
        solver={"max_iter": 8, "steps": [6]},
        ray={"storage_path": str(tmp_path / "runs")},
        tracking={"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment_name": "o"},
    )
    ctx = open_sweep(load_sweep(path))
    client = MlflowClient(ctx.tracking_uri)
    exp = client.get_experiment_by_name("o").experiment_id
    ids = {}
    for t in ("a", "b", "c", "d"):
        run = client.create_run(exp, tags={"mlflow.parentRunId": ctx.parent.run_id, TRIAL_TAG: t})
        ids[t] = run.info.run_id
    client.set_terminated(ids["a"])  # train() finished it

    def result(trial, lam, error=None, **metrics):
        metrics = {"trial_id": trial, **metrics} if metrics else {}
        return SimpleNamespace(
            metrics=metrics, config={"model.loss.mask_weight": lam}, error=error, path=f"p/trial_{trial}"
        )

    grid = [
        result("a", 1.0, iteration=8, done=True),
        result("b", 2.0, iteration=4, done=True),  # ASHA stopped it
        result("c", 5.0, iteration=4, done=False),  # interrupted sweep
        result("d", 8.0, error=RuntimeError("x")),
    ]
    summaries = summarize(ctx, grid)
    assert [s.status for s in summaries] == ["finished", "stopped at iteration 4", "unfinished", "failed: RuntimeError"]
    assert summaries[3].trial_id == "d" and summaries[1].params == {"model.loss.mask_weight": 2.0}
    mark_children(ctx, summaries)
    got = {t: client.get_run(i) for t, i in ids.items()}
    assert {t: r.info.status for t, r in got.items()} == {"a": "FINISHED", "b": "KILLED", "c": "RUNNING", "d": "FAILED"}
    assert got["b"].data.tags["diffusioninst.sweep.trial_status"] == "stopped at iteration 4"
