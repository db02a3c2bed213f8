"""Evaluation driver: sharded inference over the validation split for several step counts, COCO/LVIS AP.

Each rank takes images ``rank, rank + world, ...``; per batch the image encoder runs ONCE and the DDIM
sampler runs once per requested step count on the shared encoding. Sampler noise is seeded per
``(eval.seed, image_id, steps)``, so results do not depend on the number of workers or the batch size.
Predictions are converted to COCO results (RLE masks) on the worker, gathered on rank 0, and scored there.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffusioninst.config import ExperimentConfig, SamplerConfig
from diffusioninst.engine import dist


@dataclass
class EvalOutcome:
    """What rank 0 gets back from :func:`evaluate_model`."""

    results: dict[int, Any]  # steps -> EvalResult
    flat_metrics: dict[str, float]
    table: str
    num_images: int
    kind: str
    files: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0


def noise_seed(base: int, image_id: int, steps: int) -> int:
    """Deterministic per-(image, step count) seed, independent of sharding and batching."""
    return (base * 1_000_003 + int(image_id) * 9_973 + steps * 101) % (2**63 - 1)


@torch.no_grad()
def predict_split(
    model: nn.Module,
    cfg: ExperimentConfig,
    dataset: Any,
    indices: list[int],
    samplers: dict[Hashable, SamplerConfig],
    device: torch.device,
    category_ids: list[int],
    progress_every: int = 0,
) -> dict[Hashable, list[dict]]:
    """COCO-format results for ``dataset[indices]`` under each sampler setting (RLE masks, original frame).

    The encoder runs once per batch; every setting samples from that shared encoding. Settings with the same
    step count get the same noise per image (paired comparisons).
    """
    from diffusioninst.data import collate
    from diffusioninst.evaluation import instances_to_coco_results
    from diffusioninst.model import GeneratorNoise, postprocess

    model.eval()
    out: dict[Hashable, list[dict]] = {key: [] for key in samplers}
    bs = cfg.eval.batch_size
    t0 = time.perf_counter()
    for start in range(0, len(indices), bs):
        batch = collate([dataset[i] for i in indices[start : start + bs]], cfg.model.size_divisibility).to(device)
        encoded = model.encode(batch.images, batch.image_sizes)
        for key, sampler in samplers.items():
            noise = [GeneratorNoise(noise_seed(cfg.eval.seed, iid, sampler.steps), device) for iid in batch.image_ids]
            dets = model.sample(encoded, sampler, noise=noise)
            for i, det in enumerate(dets):
                result = postprocess(
                    det,
                    input_size=tuple(batch.image_sizes[i].tolist()),
                    output_size=tuple(batch.orig_sizes[i].tolist()),
                    mask_threshold=sampler.mask_threshold,
                )
                out[key].extend(
                    instances_to_coco_results(
                        batch.image_ids[i], result, category_ids, image_size=tuple(batch.orig_sizes[i].tolist())
                    )
                )
        done = min(start + bs, len(indices))
        if progress_every and (done // bs) % progress_every == 0:
            rate = done / (time.perf_counter() - t0)
            print(f"[eval] {done}/{len(indices)} images ({rate:.2f} img/s)", flush=True)
    return out


def score_all(
    gt: Any, cfg: ExperimentConfig, category_ids: list[int], image_ids: list[int], results: dict[Hashable, list[dict]]
) -> dict[Hashable, Any]:
    """One COCO/LVIS evaluation per setting over the same images (the GT is parsed once and shared)."""
    from diffusioninst.evaluation import build_evaluator

    scored: dict[Hashable, Any] = {}
    for key, dets in results.items():
        evaluator = build_evaluator(gt, cfg.eval, category_ids)
        gt = evaluator.gt
        evaluator.add_coco_results(dets, image_ids=image_ids)
        scored[key] = evaluator.compute()
    return scored


def evaluate_model(
    model: nn.Module,
    cfg: ExperimentConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
    steps: list[int] | None = None,
    max_images: int | None = None,
    out_dir: Path | None = None,
) -> EvalOutcome | None:
    """Evaluate ``model`` on the validation split (a collective over all ranks when distributed).

    Returns:
        the :class:`EvalOutcome` on rank 0 (``None`` on other ranks); tables are written to ``out_dir``.
    """
    from diffusioninst.data import build_eval_dataset
    from diffusioninst.evaluation import flat_metrics, format_ap_table, write_ap_tables

    device = device or next(model.parameters()).device
    steps = sorted(set(steps or cfg.eval.steps))
    t0 = time.perf_counter()
    if max_images is not None:
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, max_images=max_images))
    data = build_eval_dataset(cfg, split="val")
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, evaluator=data.kind))
    n = len(data.dataset)
    indices = list(range(rank, n, world_size))
    samplers = {s: dataclasses.replace(cfg.sampler, steps=s) for s in steps}
    local = predict_split(
        model,
        cfg,
        data.dataset,
        indices,
        samplers,
        device,
        data.category_ids,
        progress_every=max(1, 20 // cfg.eval.batch_size) if rank == 0 else 0,
    )
    gathered = dist.gather_to_rank0(local)
    if rank != 0:
        return None
    merged = {s: [r for part in gathered or [] for r in part[s]] for s in steps}
    results = score_all(data.gt_json, cfg, data.category_ids, data.image_ids, merged)
    files = write_ap_tables(results, out_dir, data.kind) if out_dir is not None else {}
    if out_dir is not None and cfg.eval.save_predictions:
        for s, dets in merged.items():
            files[f"predictions_steps_{s}"] = Path(out_dir) / f"predictions_steps_{s}.json"
            files[f"predictions_steps_{s}"].write_text(json.dumps(dets))
    return EvalOutcome(
        results=results,
        flat_metrics=flat_metrics(results, data.kind),
        table=format_ap_table(results, data.kind),
        num_images=n,
        kind=data.kind,
        files=files,
        seconds=time.perf_counter() - t0,
    )
