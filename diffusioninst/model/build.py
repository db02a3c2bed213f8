"""``build_model(cfg.model)`` -> :class:`DiffusionInst`, optionally loading ``cfg.model.weights``."""

from __future__ import annotations

from diffusioninst.config.schema import ModelConfig
from diffusioninst.model.detector import DiffusionInst

__all__ = ["build_model"]


def build_model(cfg: ModelConfig) -> DiffusionInst:
    """Build the model from its config; ``cfg.weights`` (ours or an official checkpoint) is loaded strictly."""
    problems = cfg.check()
    if problems:
        raise ValueError("invalid model config:" + "".join(f"\n  - {k}: {m}" for k, m in problems))
    model = DiffusionInst(cfg)
    if cfg.weights:
        from diffusioninst.convert import load_checkpoint

        load_checkpoint(model, cfg.weights)
    return model
