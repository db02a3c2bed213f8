"""Optimizer, learning-rate schedule and gradient clipping of the official recipe.

AdamW over every parameter with the same weight decay (no norm/bias exclusion, as detectron2's
``build_optimizer`` in the official code), an optional backbone lr multiplier, detectron2's
``WarmupMultiStepLR`` (linear warmup from ``warmup_factor``, then x``gamma`` at each milestone), and
full-model L2 gradient clipping.
"""

from __future__ import annotations

import bisect

import torch
from torch import nn

from diffusioninst.config.schema import SolverConfig


def lr_factor(iteration: int, cfg: SolverConfig) -> float:
    """Multiplier of ``base_lr`` at ``iteration`` (0-based), detectron2 ``WarmupMultiStepLR`` semantics.

    ``factor = warmup(iteration) * gamma ** (number of milestones <= iteration)`` where the linear warmup is
    ``warmup_factor * (1 - a) + a`` with ``a = iteration / warmup_iters`` for ``iteration < warmup_iters``.
    """
    warm = 1.0
    if iteration < cfg.warmup_iters:
        alpha = iteration / cfg.warmup_iters
        warm = cfg.warmup_factor * (1.0 - alpha) + alpha
    return warm * cfg.gamma ** bisect.bisect_right(cfg.steps, iteration)


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
    return torch.optim.AdamW(groups, lr=cfg.base_lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: SolverConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration schedule: call ``scheduler.step()`` once after every optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, cfg))


def clip_gradients(model: nn.Module, max_norm: float) -> float:
    """Full-model L2 clipping (``max_norm`` 0 disables); returns the pre-clip total norm."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    if max_norm <= 0:
        return float(torch.norm(torch.stack([p.grad.detach().norm(2) for p in params]), 2))
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=2.0))
