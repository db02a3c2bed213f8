"""Optimizer/schedule against closed forms; MLflow helpers against a real SQLite store."""

from __future__ import annotations

import math

import pytest
import torch

from diffusioninst.config import SolverConfig
from diffusioninst.engine.checkpoint import CheckpointError, read_state, write_checkpoint
from diffusioninst.engine.solver import TrainClock, build_lr_scheduler, build_optimizer, clip_gradients, lr_factor
from diffusioninst.tracking import TrackingError, check_tracking_uri, resolve_tracking_uri, start_or_resume_run


def test_warmup_multistep_matches_closed_form():
    cfg = SolverConfig(base_lr=1.0, max_iter=100, steps=[60, 80], warmup_iters=10, warmup_factor=0.01, gamma=0.1)
    # detectron2 WarmupMultiStepLR: linear warmup factor*(1-a)+a, a = it/warmup; gamma^(#milestones <= it)
    assert lr_factor(0, cfg) == pytest.approx(0.01)
    assert lr_factor(5, cfg) == pytest.approx(0.01 * 0.5 + 0.5)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(59, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.1)
    assert lr_factor(80, cfg) == pytest.approx(0.01)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_linear_and_cosine_decay_match_closed_form(kind):
    cfg = SolverConfig(
        base_lr=1.0, max_iter=100, warmup_iters=10, warmup_factor=0.1, lr_schedule=kind, lr_end_factor=0.2
    )
    shape = {"linear": lambda p: 1 - p, "cosine": lambda p: 0.5 * (1 + math.cos(math.pi * p))}[kind]
    for it in (0, 5, 10, 25, 50, 99, 100, 150):
        warm = 0.1 * (1 - it / 10) + it / 10 if it < 10 else 1.0
        p = min(it / 100, 1.0)
        assert lr_factor(it, cfg) == pytest.approx(warm * (0.2 + 0.8 * shape(p))), it
    assert lr_factor(100, cfg) == pytest.approx(0.2)  # the end factor, then flat
    # with a time budget the decay follows the fraction of the budget spent: 3/4 of it -> p = 0.75
    budget = SolverConfig(base_lr=1.0, max_iter=100, warmup_iters=0, lr_schedule=kind, time_budget_min=1.0)
    clock = TrainClock(budget, seconds=45.0)
    assert lr_factor(5, budget, clock.progress_iteration(5)) == pytest.approx(shape(0.75))


def test_scheduler_steps_the_optimizer_lr_per_iteration():
    cfg = SolverConfig(base_lr=2e-3, max_iter=20, steps=[10], warmup_iters=4, warmup_factor=0.25, gamma=0.5)
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model, cfg)
    sched = build_lr_scheduler(opt, cfg)
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [2e-3 * lr_factor(i, cfg) for i in range(12)]
    assert seen == pytest.approx(expected)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["weight_decay"] == cfg.weight_decay


def test_time_budget_reads_milestones_as_fractions_of_the_run():
    cfg = SolverConfig(base_lr=1.0, max_iter=100, steps=[80], warmup_iters=0, gamma=0.1, time_budget_min=1.0)
    clock = TrainClock(cfg)
    assert clock.progress_iteration(10) == 10 and not clock.exhausted and clock.remaining_s() == 60.0
    clock.seconds = 30.0  # half the budget after 10 iterations: the schedule stands at iteration 50
    assert clock.progress_iteration(10) == 50 and clock.fraction(10) == pytest.approx(0.5)
    assert lr_factor(10, cfg, clock.progress_iteration(10)) == 1.0
    clock.seconds = 48.0  # 80% of the budget: past the milestone at 80 / 100
    assert lr_factor(10, cfg, clock.progress_iteration(10)) == pytest.approx(0.1)
    assert clock.progress_iteration(90) == 90  # iterations still count when they run out first
    clock.seconds = 60.0
    assert clock.exhausted and clock.remaining_s() == 0.0 and clock.fraction(10) == 1.0
    assert not TrainClock(SolverConfig(max_iter=100)).exhausted  # no budget: never


def test_scheduler_follows_the_clock():
    cfg = SolverConfig(base_lr=1e-3, max_iter=1000, steps=[500], warmup_iters=0, gamma=0.5, time_budget_min=1.0)
    clock = TrainClock(cfg)
    opt = build_optimizer(torch.nn.Linear(2, 2), cfg)
    sched = build_lr_scheduler(opt, cfg, clock)
    for seconds in (10.0, 29.0, 31.0):  # 31 s > half of 60 s: milestone 500 / 1000 passed at iteration 3
        clock.seconds = seconds
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)


def test_backbone_multiplier_and_frozen_params():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = torch.nn.Linear(2, 2)
            self.head = torch.nn.Linear(2, 2)
            self.frozen = torch.nn.Linear(2, 2)
            self.frozen.requires_grad_(False)

    cfg = SolverConfig(base_lr=1e-3, backbone_lr_multiplier=0.1)
    opt = build_optimizer(M(), cfg)
    lrs = sorted(g["lr"] for g in opt.param_groups)
    assert lrs == pytest.approx([1e-4, 1e-3])
    assert sum(len(g["params"]) for g in opt.param_groups) == 4  # frozen layer excluded


def test_clip_gradients_full_model_l2():
    model = torch.nn.Linear(4, 1, bias=False)
    model.weight.grad = torch.tensor([[3.0, 4.0, 0.0, 0.0]])
    norm = clip_gradients(model, max_norm=1.0)
    assert norm == pytest.approx(5.0)
    assert float(model.weight.grad.norm()) == pytest.approx(1.0, rel=1e-5)


def test_checkpoint_round_trip_and_corruption(tmp_path):
    write_checkpoint(tmp_path, {"model": {"w": torch.arange(3.0)}, "iteration": 7}, "name: x\n")
    state = read_state(tmp_path)
    assert state["iteration"] == 7 and torch.equal(state["model"]["w"], torch.arange(3.0))
    (tmp_path / "state.pt").write_bytes((tmp_path / "state.pt").read_bytes()[:50])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        read_state(tmp_path)
    with pytest.raises(CheckpointError, match="no state.pt"):
        read_state(tmp_path / "missing")


def test_tracking_uri_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert resolve_tracking_uri(None, tmp_path) == "http://tracking.example:5000"
    assert resolve_tracking_uri("sqlite:////abs/db.sqlite", tmp_path) == "sqlite:////abs/db.sqlite"
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("sqlite:///rel.db", "/elsewhere") == f"sqlite:///{tmp_path.resolve()}/rel.db"


def test_unreachable_tracking_server_is_a_clear_error():
    with pytest.raises(TrackingError, match="unreachable"):
        check_tracking_uri("http://127.0.0.1:9", timeout_s=2)
    with pytest.raises(TrackingError, match="file store"):
        check_tracking_uri("file:///tmp/mlruns")


def test_run_is_resumed_by_key_and_metrics_are_logged(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run, resumed = start_or_resume_run(uri, "exp", "demo", run_key="runs/demo")
    assert not resumed
    run.log_params({"model.head.num_proposals": 100})
    run.log_metrics({"train/loss": 2.5, "eval/APl": math.nan, "train/bad": math.inf, "note": "text"}, step=10)
    again, resumed = start_or_resume_run(uri, "exp", "demo", run_key="runs/demo")
    assert resumed and again.run_id == run.run_id
    again.log_params({"model.head.num_proposals": 100, "extra": 1})  # existing params are kept, not re-logged
    again.log_metrics({"train/loss": 1.5}, step=20)
    data = again.client.get_run(run.run_id).data
    assert data.params == {"model.head.num_proposals": "100", "extra": "1"}
    assert again.metric_history("train/loss") == [(10, 2.5), (20, 1.5)]
    assert "train/bad" not in data.metrics and "note" not in data.metrics
    assert math.isnan(data.metrics["eval/APl"])
    other, resumed = start_or_resume_run(uri, "exp", "demo", run_key="runs/other")
    assert not resumed and other.run_id != run.run_id
    fresh, resumed = start_or_resume_run(uri, "exp", "demo", run_key="runs/demo", resume=False)  # state deleted
    assert not resumed and fresh.run_id not in (run.run_id, other.run_id)
    latest, resumed = start_or_resume_run(uri, "exp", "demo", run_key="runs/demo")  # the newest tagged run
    assert resumed and latest.run_id == fresh.run_id


def test_training_resumes_its_mlflow_run_only_while_its_train_state_exists(tmp_path):
    from diffusioninst.config import ExperimentConfig, load_config
    from diffusioninst.engine.launch import open_tracking, run_key

    overrides = [f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"ray.storage_path={tmp_path / 'runs'}"]
    cfg = load_config(ExperimentConfig, None, ["data.format=synthetic", *overrides])
    first, _ = open_tracking(cfg)
    (tmp_path / "runs" / cfg.name).mkdir(parents=True)  # Ray Train state of that run
    second, _ = open_tracking(cfg)
    assert second.run_id == first.run_id
    (tmp_path / "runs" / cfg.name).rmdir()  # the user deleted it: a new training, a new MLflow run
    third, _ = open_tracking(cfg)
    assert third.run_id != first.run_id
    # a run created ahead of its training (as a Tune trial does) is used by that training, state or not
    other = load_config(ExperimentConfig, None, ["data.format=synthetic", "name=trial", *overrides])
    ahead, _ = start_or_resume_run(
        other.tracking.tracking_uri, other.tracking.experiment_name, "t", run_key=run_key(other)
    )
    used, _ = open_tracking(other)
    assert used.run_id == ahead.run_id


def test_ema_follows_the_warmed_up_recurrence():
    from diffusioninst.engine.ema import build_ema

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = build_ema(model, decay=0.3)  # the warmup (2/11, 3/12) and then the cap (0.3 < 4/13) both apply
    expected_w = expected_mean = None
    for k in range(6):
        with torch.no_grad():
            model[0].weight.fill_(float(k + 1))
            model[1].running_mean.fill_(10.0 * k)
            model[1].num_batches_tracked.fill_(k)
        ema.update_parameters(model)
        if k == 0:  # the first update copies
            expected_w, expected_mean = float(k + 1), 10.0 * k
        else:  # d_n = min(decay, (1 + n) / (10 + n)), n = updates before this one
            d = min(0.3, (1 + k) / (10 + k))
            expected_w = d * expected_w + (1 - d) * (k + 1)
            expected_mean = d * expected_mean + (1 - d) * 10.0 * k
    avg = ema.module
    assert int(ema.n_averaged) == 6
    assert torch.allclose(avg[0].weight, torch.full((2, 2), expected_w), rtol=1e-6)
    assert torch.allclose(avg[1].running_mean, torch.full((2,), expected_mean), rtol=1e-6)
    assert int(avg[1].num_batches_tracked) == 5  # integer buffers are copied
    assert model[0].weight[0, 0].item() == 6.0  # the trained weights are untouched
    with pytest.raises(ValueError, match="ema_decay"):
        build_ema(model, decay=1.0)
    assert any(key == "solver.ema_decay" for key, _ in SolverConfig(ema_decay=1.0).check())
