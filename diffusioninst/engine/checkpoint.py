"""Training checkpoints: one folder with the full training state and the resolved config.

Layout of a checkpoint folder::

    state.pt      model / optimizer / scheduler state dicts, iteration, RNG states, metric history
    config.yaml   the resolved ExperimentConfig the run was started with
    meta.json     iteration, time, metrics at that point (human-readable)
    status.json   only when the run stopped on a non-finite loss (see engine/train.py)

Folders are written completely before they are handed to Ray Train (which copies them to storage and
registers them only after the copy), and :func:`write_atomic_dir` renames into place for local use, so a
checkpoint is never half-written. Loading uses ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffusioninst.convert import CheckpointError  # one error type for every checkpoint problem

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"
STATUS_FILE = "status.json"


def rng_state() -> dict[str, Any]:
    """Process-wide RNG states (torch CPU/CUDA, numpy legacy, python) for exact resumption."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state_to_tensors(np.random.get_state()),
        "python": _python_state_to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(_numpy_state_from_tensors(state["numpy"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state_to_tensors(st: tuple) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = st
    return {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def _numpy_state_from_tensors(d: dict[str, Any]) -> tuple:
    return (d["name"], d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["cached"])


def _python_state_to_lists(st: tuple) -> list:
    version, internal, gauss = st
    return [version, list(internal), gauss]


def write_checkpoint(
    directory: str | Path,
    state: dict[str, Any],
    config_yaml: str,
    meta: dict[str, Any] | None = None,
    status: dict[str, Any] | None = None,
) -> Path:
    """Write a complete checkpoint folder (``state`` must be ``torch.load(weights_only=True)``-loadable)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (STATE_FILE + ".partial")
    torch.save(state, tmp)
    os.replace(tmp, directory / STATE_FILE)
    (directory / CONFIG_FILE).write_text(config_yaml)
    (directory / META_FILE).write_text(json.dumps({"time": time.time(), **(meta or {})}, indent=2, default=str))
    if status is not None:
        (directory / STATUS_FILE).write_text(json.dumps(status, indent=2, default=str))
    return directory


def read_state(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load ``state.pt`` of a checkpoint folder with a clear error when it is missing or corrupt."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {directory}: no {STATE_FILE} in it (not a diffusioninst checkpoint?)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, wrong types
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: {type(e).__name__}: {e}") from None
    for key in ("model", "iteration"):
        if key not in state:
            raise CheckpointError(f"checkpoint {path} has no '{key}' entry (keys: {sorted(state)})")
    return state


def read_status(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / STATUS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


@contextmanager
def write_atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``final`` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
