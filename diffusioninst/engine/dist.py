"""Small helpers over ``torch.distributed`` that degrade to no-ops in a single process."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def max_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Element-wise maximum of ``values`` over ranks (a collective: all ranks must call it)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def average_buffers(module: torch.nn.Module) -> None:
    """Replace every floating-point buffer (BatchNorm running statistics) by its mean over ranks, in place.

    Training's DDP does not sync buffers before every forward (as detectron2's ``broadcast_buffers=False``),
    so each rank's BatchNorm statistics follow its own data; this makes all ranks hold the same model before
    it is evaluated or saved. Integer buffers (``num_batches_tracked``) are equal on every rank and left
    alone. A collective.
    """
    if not is_distributed():
        return
    world = dist.get_world_size()
    for buf in module.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(world)


def mean_over_ranks(values: Mapping[str, float], device: torch.device) -> dict[str, float]:
    """Average scalar values across ranks (same keys, same order on every rank)."""
    keys = sorted(values)
    if not keys:
        return {}
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def sum_over_ranks(value: float, device: torch.device) -> float:
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def gather_to_rank0(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` as a list on rank 0 (``None`` elsewhere); ``[obj]`` without distribution."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size() if dist.get_rank() == 0 else []
    dist.gather_object(obj, out if dist.get_rank() == 0 else None, dst=0)
    return out if dist.get_rank() == 0 else None


def barrier() -> None:
    if is_distributed():
        dist.barrier()
