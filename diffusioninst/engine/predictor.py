"""Load a trained model from any checkpoint form and run batched inference on images.

Accepted checkpoints:

* a training checkpoint folder (``state.pt`` + ``config.yaml``, as written by Ray Train or locally);
* a weights file ``{"model": state_dict}`` (the ``model_final.pt`` artifact), with ``config.yaml`` beside it
  or an explicit config;
* an official DiffusionInst checkpoint (detectron2 naming, .pth/.pkl), converted on load; needs a config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffusioninst.config import ExperimentConfig
from diffusioninst.engine.checkpoint import CONFIG_FILE, STATE_FILE, CheckpointError


def find_config(checkpoint: str | Path) -> Path | None:
    """``config.yaml`` of a checkpoint folder, or next to a weights file."""
    p = Path(checkpoint)
    for cand in ((p / CONFIG_FILE) if p.is_dir() else None, p.parent / CONFIG_FILE):
        if cand is not None and cand.is_file():
            return cand
    return None


def load_model(cfg: ExperimentConfig, checkpoint: str | Path, device: torch.device | str = "cpu") -> torch.nn.Module:
    """Build the model of ``cfg`` and load ``checkpoint`` (ours or official) into it, strictly."""
    from diffusioninst.convert import load_checkpoint
    from diffusioninst.model import build_model

    p = Path(checkpoint)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    model = build_model(cfg.model)
    target = p / STATE_FILE if p.is_dir() else p
    if not target.is_file():
        raise CheckpointError(f"checkpoint folder {p} has no {STATE_FILE}")
    try:
        load_checkpoint(model, target)
    except CheckpointError:
        raise
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        raise CheckpointError(f"cannot load checkpoint {target}: {e}") from None
    return model.to(device).eval()


class Predictor:
    """Batched inference on raw RGB images, results in each image's own frame.

    Args:
        cfg: resolved config (test-time resize, sampler).
        model: a loaded model (see :func:`load_model`).
        device: where to run.
        seed: sampler seed; image ``k`` of a call uses ``seed + k`` (reproducible, batch-size independent).
    """

    def __init__(
        self, cfg: ExperimentConfig, model: torch.nn.Module, device: torch.device | str = "cpu", seed: int = 0
    ) -> None:
        self.cfg = cfg
        self.model = model.eval()
        self.device = torch.device(device)
        self.seed = seed

    @torch.no_grad()
    def __call__(
        self, images: Sequence[np.ndarray], steps: int | None = None, first_index: int = 0
    ) -> list[dict[str, Any]]:
        """Predict on uint8 [H, W, 3] RGB images.

        Returns:
            per image ``{"boxes": [M,4] abs xyxy, "scores": [M], "labels": [M], "masks": bool [M,H,W]}``
            in that image's original frame.
        """
        from diffusioninst.data.transforms import eval_image
        from diffusioninst.model import GeneratorNoise
        from diffusioninst.structures import Batch

        resized = [eval_image(im, self.cfg.data.augmentation) for im in images]
        batch = Batch.from_images(
            resized, size_divisibility=self.cfg.model.size_divisibility, orig_sizes=[im.shape[:2] for im in images]
        ).to(self.device)
        sampler = dataclasses.replace(self.cfg.sampler, steps=steps or self.cfg.sampler.steps)
        noise = [GeneratorNoise(self.seed + first_index + k, self.device) for k in range(len(images))]
        results = self.model.predict(batch.images, batch.image_sizes, batch.orig_sizes, sampler, noise=noise)
        return [{k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in r.items()} for r in results]
