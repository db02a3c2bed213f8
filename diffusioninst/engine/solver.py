"""Optimizer, learning-rate schedule and gradient clipping of the official recipe.

AdamW over every parameter with the same weight decay (no norm/bias exclusion, as detectron2's
``build_optimizer`` in the official code), an optional backbone lr multiplier, detectron2's
``WarmupMultiStepLR`` (linear warmup from ``warmup_factor``, then x``gamma`` at each milestone), and
full-model L2 gradient clipping. ``lr_schedule: linear | cosine`` (not in the official recipe) replace the
milestones by a decay from ``base_lr`` after warmup down to ``lr_end_factor * base_lr`` at the end of the run.

With ``solver.time_budget_min`` the run also ends when the budget is spent, and the milestones are read
as fractions of the run: at iteration ``i`` after ``t`` seconds the schedule is at
``progress_iteration = max(i, floor(t / budget * max_iter))``, so the lr decays at ``steps[k] / max_iter``
of whichever limit comes first (warmup still counts real iterations).
"""

from __future__ import annotations

import bisect
import math

import torch
from torch import nn

from diffusioninst.config.schema import SolverConfig


def lr_factor(iteration: int, cfg: SolverConfig, progress_iteration: int | None = None) -> float:
    """Multiplier of ``base_lr`` at ``iteration`` (0-based).

    ``factor = warmup(iteration) * decay(progress_iteration)``. The linear warmup is
    ``warmup_factor * (1 - a) + a`` with ``a = iteration / warmup_iters`` for ``iteration < warmup_iters``;
    ``progress_iteration`` defaults to ``iteration`` (see :class:`TrainClock`). The decay, with
    ``p = min(progress_iteration / max_iter, 1)`` and ``e = lr_end_factor``:

    * ``multistep`` (official, detectron2 ``WarmupMultiStepLR``): ``gamma ** (number of steps <= progress_iteration)``;
    * ``linear``: ``e + (1 - e) * (1 - p)``;
    * ``cosine``: ``e + (1 - e) * (1 + cos(pi * p)) / 2``.
    """
    warm = 1.0
    if iteration < cfg.warmup_iters:
        alpha = iteration / cfg.warmup_iters
        warm = cfg.warmup_factor * (1.0 - alpha) + alpha
    progress = iteration if progress_iteration is None else progress_iteration
    if cfg.lr_schedule == "multistep":
        return warm * cfg.gamma ** bisect.bisect_right(cfg.steps, progress)
    p = min(progress / cfg.max_iter, 1.0)
    shape = 1.0 - p if cfg.lr_schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * p))
    return warm * (cfg.lr_end_factor + (1.0 - cfg.lr_end_factor) * shape)


class TrainClock:
    """Where a run stands against ``max_iter`` and the optional time budget.

    ``seconds`` is the training time spent so far (set by the loop from a clock all ranks agree on, and
    restored from the checkpoint on resume); ``progress_iteration(it)`` is the iteration the lr schedule
    uses and ``exhausted`` says the budget is spent.
    """

    def __init__(self, cfg: SolverConfig, seconds: float = 0.0):
        self.max_iter = cfg.max_iter
        self.budget_s = None if cfg.time_budget_min is None else 60.0 * cfg.time_budget_min
        self.seconds = float(seconds)

    def fraction(self, iteration: int) -> float:
        """Fraction of the run done: iterations, or time if the budget binds first (0..1)."""
        done = iteration / self.max_iter
        if self.budget_s is not None:
            done = max(done, self.seconds / self.budget_s)
        return min(done, 1.0)

    def progress_iteration(self, iteration: int) -> int:
        if self.budget_s is None:
            return iteration
        return max(iteration, int(self.seconds / self.budget_s * self.max_iter))

    @property
    def exhausted(self) -> bool:
        return self.budget_s is not None and self.seconds >= self.budget_s

    def remaining_s(self) -> float | None:
        return None if self.budget_s is None else max(0.0, self.budget_s - self.seconds)


def build_optimizer(model: nn.Module, cfg: SolverConfig) -> torch.optim.Optimizer:
    """AdamW with two groups (backbone, rest) so ``backbone_lr_multiplier`` can differ; frozen params skipped."""
    backbone, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (backbone if "backbone" in name else rest).append(p)  # official: every key containing "backbone"
    groups = [
        {"params": rest, "lr": cfg.base_lr, "lr_multiplier": 1.0},
        {
            "params": backbone,
            "lr": cfg.base_lr * cfg.backbone_lr_multiplier,
            "lr_multiplier": cfg.backbone_lr_multiplier,
        },
    ]
    groups = [g for g in groups if g["params"]]
    kwargs = {"lr": cfg.base_lr, "betas": tuple(cfg.betas), "weight_decay": cfg.weight_decay}
    try:  # one fused kernel per step: ~4x faster than the per-parameter loop on CPU (torch >= 2.4)
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: SolverConfig, clock: TrainClock | None = None
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration schedule: call ``scheduler.step()`` once after every optimizer step (and, with a time
    budget, after updating ``clock.seconds``)."""
    if clock is None:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, cfg))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, cfg, clock.progress_iteration(it)))


def clip_gradients(model: nn.Module, max_norm: float) -> float:
    """Full-model L2 clipping (``max_norm`` 0 disables); returns the pre-clip total norm."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    if max_norm <= 0:
        return float(torch.norm(torch.stack([p.grad.detach().norm(2) for p in params]), 2))
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=2.0))
