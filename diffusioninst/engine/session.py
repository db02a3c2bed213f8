"""Where a training loop runs: inside Ray Train workers, or in-process (``ray.num_workers: 0``).

The training loop only talks to a :class:`Session`: rank/world size/device, the checkpoint to resume from,
``report`` (metrics + optional checkpoint folder) and the Ray Data shard. :class:`RaySession` maps these to
``ray.train``; :class:`LocalSession` keeps checkpoints under ``<storage_path>/<name>/checkpoint_<iter>``
(written atomically) so in-process runs resume too.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from diffusioninst.engine.checkpoint import write_atomic_dir

_CKPT_RE = re.compile(r"^checkpoint_(\d+)$")


class Session:
    """Interface of the environment a training loop runs in."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        yield None

    @contextmanager
    def last_reported_checkpoint(self) -> Iterator[Path | None]:
        """The newest checkpoint reported so far in this run (or the one resumed from)."""
        with self.latest_checkpoint() as d:
            yield d

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None, name: str | None = None) -> None:
        raise NotImplementedError

    def dataset_shard(self, name: str) -> Any | None:
        return None


class RaySession(Session):
    """Session of a Ray Train (V2) worker."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.local_rank = ctx.get_local_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self._reported = False

    @contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield Path(d)

    @contextmanager
    def last_reported_checkpoint(self) -> Iterator[Path | None]:
        import ray.train

        reported = ray.train.get_all_reported_checkpoints() if self._reported else []
        if not reported:
            with self.latest_checkpoint() as d:
                yield d
            return
        with reported[-1].checkpoint.as_directory() as d:
            yield Path(d)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None, name: str | None = None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name if checkpoint else None)
        self._reported = self._reported or checkpoint is not None

    def dataset_shard(self, name: str) -> Any | None:
        import ray.train

        try:
            return ray.train.get_dataset_shard(name)
        except (KeyError, ValueError, RuntimeError):
            return None


class LocalSession(Session):
    """Single-process session; checkpoints live in ``<storage_path>/<name>/checkpoint_<iteration>``."""

    def __init__(self, storage_path: str | Path, name: str, num_to_keep: int = 2, use_gpu: bool = False) -> None:
        self.run_dir = Path(storage_path).resolve() / name
        self.num_to_keep = num_to_keep
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.reports: list[dict[str, Any]] = []
        self.latest_reported: Path | None = None

    def checkpoints(self) -> list[Path]:
        if not self.run_dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.run_dir.iterdir() if (m := _CKPT_RE.match(p.name))]
        return [p for _, p in sorted(found)]

    @contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        found = self.checkpoints()
        yield found[-1] if found else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None, name: str | None = None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is None:
            return
        name = name or f"checkpoint_{int(metrics.get('iteration', len(self.reports))):07d}"
        with write_atomic_dir(self.run_dir / name) as tmp:
            shutil.copytree(checkpoint_dir, tmp, dirs_exist_ok=True)
        self.latest_reported = self.run_dir / name
        for old in self.checkpoints()[: -self.num_to_keep]:
            shutil.rmtree(old, ignore_errors=True)
