"""Evaluate one checkpoint under several sampler settings, sharing the encoder pass.

Images are sharded over ``ray.num_workers`` Ray tasks (each with a worker's CPUs/GPU) or, with
``ray.num_workers: 0``, predicted in-process. Every shard runs :func:`predict_split` with the whole dict of
settings, so each image is encoded once per pass and sampled once per setting; noise is seeded per
(image, step count), so settings with the same step count are compared on the same noise. The driver gathers
the COCO results and scores each setting (:func:`score_all`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from diffusioninst.config import ExperimentConfig, SamplerConfig


@contextmanager
def local_checkpoint(path: str) -> Iterator[Path]:
    """A local path for ``path``: itself, or a download of a checkpoint folder on ``s3://``/``gs://`` storage."""
    if "://" not in path:
        yield Path(path)
        return
    import ray.train

    with ray.train.Checkpoint(path).as_directory() as d:
        yield Path(d)


def _device(cfg: ExperimentConfig) -> Any:
    import torch

    return torch.device("cuda" if cfg.ray.use_gpu and torch.cuda.is_available() else "cpu")


def predict_shard(
    cfg: ExperimentConfig, checkpoint: str, samplers: dict[str, SamplerConfig], rank: int, world: int, threads: int = 0
) -> dict[str, list[dict]]:
    """COCO results of images ``rank, rank + world, ...`` of the validation split, per setting."""
    import torch

    from diffusioninst.data import build_eval_dataset
    from diffusioninst.engine.evaluate import predict_split
    from diffusioninst.engine.host import keep_freed_memory
    from diffusioninst.engine.predictor import load_model

    keep_freed_memory(cfg.host.keep_freed_memory)
    if threads:
        torch.set_num_threads(threads)
    device = _device(cfg)
    data = build_eval_dataset(cfg, split="val")
    with local_checkpoint(checkpoint) as local:
        model = load_model(cfg, local, device)
    indices = list(range(rank, len(data.dataset), world))
    every = max(1, 20 // cfg.eval.batch_size) if rank == 0 else 0
    return predict_split(model, cfg, data.dataset, indices, samplers, device, data.category_ids, progress_every=every)


def evaluate_settings(cfg: ExperimentConfig, checkpoint: str, samplers: dict[str, SamplerConfig]) -> dict[str, Any]:
    """``{setting id: EvalResult}`` of ``checkpoint`` on the validation split (``eval.max_images`` applies)."""
    from diffusioninst.data import build_eval_dataset
    from diffusioninst.engine.evaluate import score_all

    data = build_eval_dataset(cfg, split="val")
    world = cfg.ray.num_workers
    if world == 0:
        parts = [predict_shard(cfg, checkpoint, samplers, 0, 1)]
    else:
        import ray

        from diffusioninst.engine.launch import init_ray

        init_ray(cfg)  # no-op when Ray is already up
        options: dict[str, Any] = {"num_cpus": cfg.ray.cpus_per_worker}
        if cfg.ray.use_gpu:
            options["num_gpus"] = cfg.ray.gpus_per_worker
        task = ray.remote(predict_shard).options(**options)
        threads = max(1, int(cfg.ray.cpus_per_worker))
        parts = ray.get([task.remote(cfg, checkpoint, samplers, r, world, threads) for r in range(world)])
    merged = {sid: [det for part in parts for det in part[sid]] for sid in samplers}
    scored_cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, evaluator=data.kind))
    return score_all(data.gt_json, scored_cfg, data.category_ids, data.image_ids, merged)
