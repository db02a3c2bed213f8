"""Training loop, checkpoints, evaluation and prediction drivers (import submodules directly)."""
