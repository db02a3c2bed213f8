"""Ablation sweeps: Ray Tune train sweeps and checkpoint-sharing sampler sweeps, compared in MLflow.

``run_sweep(cfg, mode)`` runs (or resumes) the sweep of a validated :class:`~diffusioninst.config.sweep.SweepConfig`;
see :mod:`.common` for the storage layout and :mod:`.train_sweep` / :mod:`.sampler_sweep` for the two kinds.
"""

from __future__ import annotations

from typing import Any


def run_sweep(cfg: Any, mode: str = "auto") -> Any:
    """Run the sweep ``cfg`` (``mode``: auto = resume if possible, resume = must resume, restart = start over).

    Returns:
        train sweeps: a list of ``TrialSummary``; sampler sweeps: the list of evaluated ``Setting``s.
    """
    from diffusioninst.tune.common import open_sweep

    ctx = open_sweep(cfg, mode)
    state = "resuming" if ctx.resumed else "starting"
    print(f"[sweep] {state} sweep '{ctx.cfg.name}' ({ctx.cfg.sweep.kind}); parent run {ctx.parent.run_id}", flush=True)
    if ctx.cfg.sweep.kind == "train":
        from diffusioninst.tune.train_sweep import run_train_sweep

        return run_train_sweep(ctx)
    from diffusioninst.tune.sampler_sweep import run_sampler_sweep

    return run_sampler_sweep(ctx)


__all__ = ["run_sweep"]
