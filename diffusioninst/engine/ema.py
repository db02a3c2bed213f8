"""Exponential moving average of the model weights (``solver.ema_decay``; not in the official recipe).

After every optimizer step the average moves toward the current weights,
``ema <- d_n * ema + (1 - d_n) * weights``, with a warmed-up decay ``d_n = min(decay, (1 + n) / (10 + n))``
(``n`` = updates so far) so that the random initialisation is forgotten within the first few dozen steps,
not after ~1 / (1 - decay) of them. Buffers (BatchNorm running statistics) are averaged the same way;
integer buffers (``num_batches_tracked``) are copied. The average is what evaluation, prediction samples
and the exported weights use; the raw weights keep training. Built on ``torch.optim.swa_utils.AveragedModel``.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

__all__ = ["build_ema", "ema_decay_at"]

WARMUP_OFFSET = 10  # d_n = (1 + n) / (10 + n) early on: 0.1, 0.18, 0.25, ... -> decay


def ema_decay_at(decay: float, num_updates: int) -> float:
    """Decay of the ``num_updates + 1``-th update: ``min(decay, (1 + n) / (WARMUP_OFFSET + n))``."""
    return min(decay, (1.0 + num_updates) / (WARMUP_OFFSET + num_updates))


def _multi_avg_fn(decay: float):
    def update(averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        d = ema_decay_at(decay, int(num_averaged))
        if averaged[0].is_floating_point() or averaged[0].is_complex():
            for a, c in zip(averaged, current, strict=True):  # a + (1 - d) * (c - a)
                a.lerp_(c, 1.0 - d)
        else:
            for a, c in zip(averaged, current, strict=True):
                a.copy_(c)

    return update


def build_ema(model: nn.Module, decay: float) -> AveragedModel:
    """A copy of ``model`` (``.module``) averaged by :meth:`AveragedModel.update_parameters` after each step.

    The first ``update_parameters`` call copies the weights; every later one applies the warmed-up decay.
    """
    if not 0.0 < decay < 1.0:
        raise ValueError(f"solver.ema_decay must be in (0, 1), got {decay}")
    return AveragedModel(model, multi_avg_fn=_multi_avg_fn(decay), use_buffers=True)
