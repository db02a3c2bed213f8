"""The per-worker training loop (runs in Ray Train workers, or in-process for tests and debugging).

``train_loop_per_worker(loop_config)`` is what ``TorchTrainer`` runs; ``run_training(cfg, session, ...)`` is
the same loop against any :class:`~diffusioninst.engine.session.Session`.

Per iteration: ``grad_accum_steps`` micro-batches of ``ims_per_batch / (world_size * grad_accum_steps)``
images, forward (bf16 autocast on GPU), backward (DDP all-reduce), a collective finiteness check of the
loss (after the backward, where the ranks are already in step: a check before it would make every rank
wait for the slowest forward), full-model gradient clipping, AdamW step, per-iteration lr schedule. DDP
does not sync buffers before every forward (as detectron2's ``broadcast_buffers=False``); BatchNorm
statistics are averaged over ranks before every evaluation and checkpoint instead. Every ``log_period``
iterations rank 0 prints a progress line and logs ``train/*`` metrics to MLflow; every
``checkpoint_period`` iterations and at the end a checkpoint is reported through the session; evaluation
runs every ``eval_period`` iterations (if set) and at the end, sharded over all ranks. With
``solver.ema_decay`` a moving average of the weights is updated after every step, and it is what is
evaluated, plotted and exported (engine/ema.py); checkpoints hold both.

A non-finite loss stops the run on every rank at the same iteration: nothing is written for that
iteration, and a final report carries ``status: nonfinite_loss`` with a message naming the iteration and
the loss terms, next to a copy of the last good checkpoint (so the run's latest checkpoint stays a good one).
"""

from __future__ import annotations

import inspect
import json
import math
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from diffusioninst.config import ExperimentConfig, build_config, to_yaml
from diffusioninst.data.loaders import per_rank_batch_size
from diffusioninst.engine import dist
from diffusioninst.engine.checkpoint import (
    STATE_FILE,
    read_state,
    rng_state,
    set_rng_state,
    write_checkpoint,
)
from diffusioninst.engine.ema import build_ema
from diffusioninst.engine.host import keep_freed_memory
from diffusioninst.engine.progress import Progress
from diffusioninst.engine.session import LocalSession, RaySession, Session
from diffusioninst.engine.solver import TrainClock, build_lr_scheduler, build_optimizer, clip_gradients
from diffusioninst.structures import Batch

STATUS_OK = "ok"
STATUS_NONFINITE = "nonfinite_loss"
CPU_DDP_BUCKET_MB = 4096  # larger than any model: a single gradient bucket


@dataclass
class TrackingInfo:
    """How rank 0 reaches the MLflow run the driver created (None/disabled -> no logging)."""

    tracking_uri: str | None = None
    run_id: str | None = None

    def open(self) -> Any:
        from diffusioninst.tracking import MlflowRun, NullRun

        if self.tracking_uri and self.run_id:
            return MlflowRun(self.tracking_uri, self.run_id)
        return NullRun()


class NonFiniteLossError(RuntimeError):
    """Raised by the driver when a run stopped on a NaN/Inf loss."""


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Entry point for ``TorchTrainer``: ``{"config": resolved config dict, "tracking": {...}}``."""
    cfg = build_config(ExperimentConfig, loop_config["config"])
    run_training(cfg, RaySession(), TrackingInfo(**(loop_config.get("tracking") or {})))


def autocast_context(cfg: ExperimentConfig, device: torch.device):
    use_bf16 = cfg.solver.amp == "bf16" or (cfg.solver.amp == "auto" and device.type == "cuda")
    if not use_bf16:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _train_batches(cfg: ExperimentConfig, session: Session, seed: int) -> Iterator[Batch]:
    """Endless stream of training batches for this rank (Ray Data shard if one was given, else a local loader)."""
    shard = session.dataset_shard("train")
    if shard is not None:
        from diffusioninst.data import iter_train_batches

        return iter_train_batches(shard, cfg, world_size=session.world_size, seed=seed)
    from diffusioninst.data import build_train_loader

    return iter(build_train_loader(cfg, rank=session.rank, world_size=session.world_size, seed=seed))


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# Buffers are synced once when DDP wraps the model, not before every forward (torch >= 2.14 names this
# forward_sync_buffers and deprecates broadcast_buffers; older versions only have the latter).
_NO_FORWARD_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    else {"broadcast_buffers": False}
)


def _wrap_ddp(model: nn.Module, cfg: ExperimentConfig, session: Session) -> nn.Module:
    if not dist.is_distributed():
        return model
    common = {"find_unused_parameters": cfg.solver.find_unused_parameters, **_NO_FORWARD_BUFFER_SYNC}
    if session.device.type == "cuda":
        return nn.parallel.DistributedDataParallel(model, device_ids=[session.device.index], **common)
    # CPU: one bucket, reduced once the backward is done. Gloo's reduction threads otherwise compete with the
    # backward for the worker's cores while it overlaps (demo, 2 workers x 1 CPU: 0.72 -> 0.54 s/iteration).
    return nn.parallel.DistributedDataParallel(model, bucket_cap_mb=CPU_DDP_BUCKET_MB, **common)


def run_training(cfg: ExperimentConfig, session: Session, tracking: TrackingInfo | None = None) -> dict[str, Any]:
    """Train (resuming from the session's latest checkpoint), evaluate, and return the final metrics."""
    from diffusioninst.model import GeneratorNoise, build_model

    device = session.device
    keep_freed_memory(cfg.host.keep_freed_memory)
    if device.type == "cpu" and isinstance(session, RaySession):
        torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    torch.manual_seed(cfg.solver.seed + session.rank)
    logger = (tracking or TrackingInfo()).open() if session.rank == 0 else TrackingInfo().open()

    model = build_model(cfg.model).to(device)
    optimizer = build_optimizer(model, cfg.solver)
    clock = TrainClock(cfg.solver)
    scheduler = build_lr_scheduler(optimizer, cfg.solver, clock)  # without a budget the clock is iterations
    ema = build_ema(model, cfg.solver.ema_decay) if cfg.solver.ema_decay else None
    start_iter, history = 0, []
    with session.latest_checkpoint() as ckpt_dir:
        if ckpt_dir is not None and (ckpt_dir / STATE_FILE).is_file():
            state = read_state(ckpt_dir, map_location=device)
            model.load_state_dict(state["model"])
            if ema is not None:  # a run that had no average yet starts it from the resumed weights
                ema.module.load_state_dict(state.get("model_ema") or state["model"])
                ema.n_averaged.fill_(int(state.get("ema_updates", 0)))
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_iter = int(state["iteration"])
            history = list(state.get("history", []))
            clock.seconds = float(state.get("train_seconds", 0.0))
            if "rng" in state and session.rank < len(state["rng"]):
                set_rng_state(state["rng"][session.rank])
            if session.rank == 0:
                print(f"[train] resuming from iteration {start_iter} ({ckpt_dir})", flush=True)
    ddp_model = _wrap_ddp(model, cfg, session)

    world = session.world_size
    batch_size = per_rank_batch_size(cfg, world)
    seed = cfg.solver.seed + 1_000_003 * start_iter  # a resumed run draws a fresh, deterministic stream
    batches = _train_batches(cfg, session, seed=seed)
    noise = GeneratorNoise(seed * 31 + session.rank, device)
    progress = Progress(cfg.solver.max_iter, start=start_iter)
    if session.rank == 0 and start_iter == 0:
        budget = f" or {cfg.solver.time_budget_min:g} min" if cfg.solver.time_budget_min else ""
        print(
            f"[train] {cfg.name}: {cfg.solver.max_iter} iterations{budget}, {world} worker(s) x {batch_size} image(s)"
            f" x {cfg.solver.grad_accum_steps} accumulation step(s), device {device}",
            flush=True,
        )

    window: dict[str, list[float]] = {}
    last_good_iter = start_iter
    latest_eval: dict[str, float] = {}  # reported with every checkpoint (Tune schedulers read it)
    loop_t0, seconds0 = time.perf_counter(), clock.seconds
    eval_model = model if ema is None else ema.module  # what evaluation, plots and exported weights use
    done = start_iter
    for it in range(start_iter, cfg.solver.max_iter):
        if clock.exhausted:  # every rank holds the same clock (agreed on in the step below)
            break
        ddp_model.train()
        optimizer.zero_grad(set_to_none=True)
        step_terms: dict[str, float] = {}
        for micro in range(cfg.solver.grad_accum_steps):
            batch = next(batches).to(device)
            sync = micro == cfg.solver.grad_accum_steps - 1 or not dist.is_distributed()
            with nullcontext() if sync else ddp_model.no_sync(), autocast_context(cfg, device):
                losses = ddp_model(batch.images, batch.image_sizes, batch.targets, noise=noise)
                loss = sum(losses.values())
            terms = {k: float(v.detach()) for k, v in losses.items()}
            bad = not all(math.isfinite(v) for v in terms.values())
            # every rank runs its backward whatever its loss, so the gradient reductions stay matched
            (loss / cfg.solver.grad_accum_steps).backward()
            # one collective per micro-batch: any rank's non-finite loss, and the slowest rank's clock
            flags = dist.max_over_ranks([float(bad), seconds0 + time.perf_counter() - loop_t0], device)
            clock.seconds = flags[1]
            if flags[0] > 0:  # no optimizer step: the non-finite gradients are dropped with the run
                return _stop_nonfinite(cfg, session, logger, it, terms, last_good_iter)
            for k, v in terms.items():
                step_terms[k] = step_terms.get(k, 0.0) + v / cfg.solver.grad_accum_steps
            progress.add_images(len(batch) * world)
        grad_norm = clip_gradients(model, cfg.solver.clip_grad_norm)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        step_terms["loss"] = sum(v for k, v in step_terms.items() if k != "loss")
        step_terms["grad_norm"] = grad_norm
        for k, v in step_terms.items():
            window.setdefault(k, []).append(v)

        done = it + 1
        last = done == cfg.solver.max_iter or clock.exhausted
        if done % cfg.solver.log_period == 0 or last:
            means = dist.mean_over_ranks({k: sum(v) / len(v) for k, v in window.items()}, device)
            window.clear()
            if session.rank == 0:
                shown = {"loss": means["loss"], **{k: v for k, v in means.items() if k not in ("loss", "grad_norm")}}
                speed = progress.line(done, shown, lr=lr, remaining_s=clock.remaining_s())
                record = {"iteration": done, "lr": lr, **means, **speed}
                history.append(record)
                logger.log_metrics({f"train/{k}": v for k, v in means.items()}, step=done)
                logger.log_metrics({"train/lr": lr, "train/img_per_s": speed["img_per_s"]}, step=done)

        if last:
            break
        if cfg.solver.eval_period and done % cfg.solver.eval_period == 0:
            latest_eval = _evaluate_and_log(cfg, eval_model, session, logger, done, out_dir=None) or latest_eval
        if done % cfg.solver.checkpoint_period == 0:
            _checkpoint(cfg, session, model, ema, optimizer, scheduler, done, history, clock.seconds, latest_eval)
            last_good_iter = done

    final_iter = done
    if session.rank == 0 and clock.exhausted and final_iter < cfg.solver.max_iter:
        print(f"[train] time budget of {cfg.solver.time_budget_min:g} min spent at iteration {final_iter}", flush=True)
    final_metrics: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as art:
        art_dir = Path(art)
        if cfg.eval.at_end:
            final_metrics = _evaluate_and_log(cfg, eval_model, session, logger, final_iter, out_dir=art_dir / "eval")
        if session.rank == 0:
            _final_artifacts(cfg, eval_model, history, logger, art_dir, device)
        _checkpoint(
            cfg,
            session,
            model,
            ema,
            optimizer,
            scheduler,
            final_iter,
            history,
            clock.seconds,
            final_metrics,
            extra_dir=art_dir if session.rank == 0 else None,
        )
    return {"status": STATUS_OK, "iteration": final_iter, **final_metrics}


def _checkpoint(
    cfg: ExperimentConfig,
    session: Session,
    model: nn.Module,
    ema: AveragedModel | None,
    optimizer: Any,
    scheduler: Any,
    iteration: int,
    history: list[dict],
    train_seconds: float,
    metrics: dict[str, Any],
    extra_dir: Path | None = None,
    status: dict[str, Any] | None = None,
) -> None:
    """Gather RNG states to rank 0, write the folder there, and report it (all ranks report: a barrier).

    With a weight average (``ema``, see engine/ema.py) the state also holds ``model_ema`` (what
    evaluation and prediction load, :func:`diffusioninst.model.state_io.read_state_dict`) and ``ema_updates``.
    """
    dist.average_buffers(_unwrap(model))
    if ema is not None:
        dist.average_buffers(ema.module)
    rngs = dist.gather_to_rank0(rng_state())
    report = {"iteration": iteration, "status": (status or {}).get("status", STATUS_OK), **metrics}
    if session.rank != 0:
        session.report(report)
        return
    tmp = Path(tempfile.mkdtemp(prefix="diffinst-ckpt-"))
    try:
        state = {
            "model": _unwrap(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "iteration": iteration,
            "train_seconds": train_seconds,
            "rng": rngs,
            "history": history,
        }
        if ema is not None:
            state["model_ema"] = ema.module.state_dict()
            state["ema_updates"] = int(ema.n_averaged)
        write_checkpoint(tmp, state, to_yaml(cfg), meta=report, status=status)
        if extra_dir is not None:
            for sub in ("eval", "plots"):
                if (extra_dir / sub).is_dir():
                    shutil.copytree(extra_dir / sub, tmp / sub, dirs_exist_ok=True)
        session.report(report, checkpoint_dir=tmp, name=f"checkpoint_{iteration:07d}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _stop_nonfinite(
    cfg: ExperimentConfig, session: Session, logger: Any, iteration: int, terms: dict[str, float], last_good_iter: int
) -> dict[str, Any]:
    """Stop every rank; report the last good state again, marked with the non-finite status."""
    all_terms = dist.gather_to_rank0(terms)
    message = ""
    if session.rank == 0:
        shown = {}
        for rank_terms in all_terms or [terms]:
            for k, v in rank_terms.items():
                if not math.isfinite(v) or k not in shown:
                    shown[k] = v
        listing = ", ".join(f"{k}={v:.6g}" for k, v in shown.items())
        where = f"iteration {last_good_iter}" if last_good_iter else "none (no checkpoint was written yet)"
        message = (
            f"non-finite loss at iteration {iteration + 1}: {listing}. Training stopped; last good checkpoint: {where}"
        )
        print(f"[train] ERROR {message}", flush=True)
        logger.set_tags({"diffusioninst.status": STATUS_NONFINITE, "diffusioninst.message": message[:5000]})
    status = {
        "status": STATUS_NONFINITE,
        "message": message,
        "iteration": iteration + 1,
        "last_good_iteration": last_good_iter,
    }
    report = {"iteration": last_good_iter, "status": STATUS_NONFINITE, "message": message}
    if session.rank != 0:
        session.report(report)
        return report
    tmp = Path(tempfile.mkdtemp(prefix="diffinst-ckpt-"))
    try:
        with session.last_reported_checkpoint() as good:
            if good is not None:
                shutil.copytree(good, tmp, dirs_exist_ok=True)
        write_status_only(tmp, status, to_yaml(cfg))
        session.report(report, checkpoint_dir=tmp, name=f"checkpoint_{last_good_iter:07d}_{STATUS_NONFINITE}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def write_status_only(directory: Path, status: dict[str, Any], config_yaml: str) -> None:
    (directory / "status.json").write_text(json.dumps(status, indent=2))
    if not (directory / "config.yaml").exists():
        (directory / "config.yaml").write_text(config_yaml)


def _evaluate_and_log(
    cfg: ExperimentConfig, model: nn.Module, session: Session, logger: Any, iteration: int, out_dir: Path | None
) -> dict[str, float]:
    """Sharded evaluation on all ranks; rank 0 logs ``eval/steps_S/...`` metrics and writes tables."""
    from diffusioninst.engine.evaluate import evaluate_model

    t0 = time.perf_counter()
    dist.average_buffers(_unwrap(model))  # every rank evaluates the same model
    outcome = evaluate_model(
        _unwrap(model),
        cfg,
        rank=session.rank,
        world_size=session.world_size,
        device=session.device,
        steps=cfg.eval.steps,
        max_images=cfg.eval.max_images,
        out_dir=out_dir,
    )
    if session.rank != 0 or outcome is None:
        return {}
    metrics = outcome.flat_metrics
    logger.log_metrics(metrics, step=iteration)
    if out_dir is None:  # periodic evaluation; the final table is printed by the driver
        print(outcome.table, flush=True)
    print(
        f"[eval] iteration {iteration}: evaluated {outcome.num_images} images in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    if out_dir is not None:
        logger.log_artifacts(out_dir, "eval")
    return metrics


def _final_artifacts(
    cfg: ExperimentConfig, model: nn.Module, history: list[dict], logger: Any, art_dir: Path, device: torch.device
) -> None:
    """Loss-curve and prediction-sample PNGs, the resolved config and the final weights, to MLflow."""
    from diffusioninst.engine.visualize import plot_loss_curves, prediction_samples

    plots = art_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    if history:
        plot_loss_curves(history, plots / "loss_curve.png")
    try:
        prediction_samples(_unwrap(model), cfg, plots / "predictions.png", device=device)
    except Exception as e:  # a plot must never fail a finished training
        print(f"[train] warning: could not render prediction samples: {type(e).__name__}: {e}", flush=True)
    logger.log_artifacts(plots, "plots")
    logger.log_text(to_yaml(cfg), "config/resolved_config.yaml")
    if cfg.tracking.log_checkpoint:
        weights = art_dir / "final_model"
        weights.mkdir(exist_ok=True)
        torch.save({"model": _unwrap(model).state_dict()}, weights / "model_final.pt")
        (weights / "config.yaml").write_text(to_yaml(cfg))
        logger.log_artifacts(weights, "checkpoint")


def run_local(cfg: ExperimentConfig, tracking: TrackingInfo | None = None) -> dict[str, Any]:
    """In-process training without Ray (``ray.num_workers: 0``): same loop, local checkpoints."""
    session = LocalSession(cfg.ray.storage_path, cfg.name, num_to_keep=cfg.ray.num_to_keep, use_gpu=cfg.ray.use_gpu)
    return run_training(cfg, session, tracking)
