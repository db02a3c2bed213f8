"""Read weight files safely: ``.pth/.pt`` (``torch.load(weights_only=True)``), ``.pkl`` (detectron2 pickles,
through a restricted unpickler that only rebuilds numpy arrays and plain containers) and ``.safetensors``.

Nothing is ever unpickled with arbitrary globals: a pickle that names any other callable is refused.
"""

from __future__ import annotations

import collections
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["UnsafePickleError", "read_state_dict", "restricted_pickle_load"]

# (module, name) pairs a detectron2/caffe2 .pkl may reference; everything else is refused.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
    ("collections", "OrderedDict"),
}


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle referenced a global outside the allow-list (numpy arrays and plain containers)."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise UnsafePickleError(
                f"refusing to unpickle global '{module}.{name}': only numpy arrays and plain containers are "
                "allowed in .pkl weight files"
            )
        if module == "collections":
            return collections.OrderedDict
        if module == "_codecs":
            import codecs

            return codecs.encode
        if name == "ndarray":
            return np.ndarray
        if name == "dtype":
            return np.dtype
        core = getattr(np, "_core", None) or np.core
        return getattr(core.multiarray, name)


def restricted_pickle_load(data: bytes) -> Any:
    """Unpickle ``data`` allowing only numpy arrays and plain containers (latin1 for Python-2 pickles)."""
    return _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()


def _to_tensor(value: Any) -> Tensor | None:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.array(value, copy=True))
    if isinstance(value, np.generic):
        return torch.as_tensor(np.asarray(value))
    return None


def _unwrap(obj: Any, path: Path) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    for key in ("model_ema", "model", "state_dict", "model_state", "module"):  # our EMA weights first
        inner = obj.get(key)
        if isinstance(inner, dict) and inner and all(isinstance(k, str) for k in inner):
            return inner
    return obj


def read_state_dict(path: str | Path, config_key: str = "weights") -> dict[str, Tensor]:
    """Read a weight file into ``{name: Tensor}``.

    Accepts a plain state dict or a dict holding one under ``"model"``/``"state_dict"`` (our training
    checkpoints with ``solver.ema_decay`` also hold ``"model_ema"``, which is preferred); numpy arrays are
    converted, non-tensor entries (``__author__``, ``matching_heuristics``, ...) are dropped.

    Raises:
        FileNotFoundError: naming the path and ``config_key`` when the file does not exist.
        UnsafePickleError: a .pkl references anything but numpy arrays / containers.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{config_key}: weight file '{path}' does not exist (nothing is downloaded)")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: Any = load_file(str(path))
    elif suffix == ".pkl":
        obj = restricted_pickle_load(path.read_bytes())
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafePickleError(
                f"{config_key}: '{path}' is not loadable with torch.load(weights_only=True): {str(e).splitlines()[0]}"
            ) from None
    raw = _unwrap(obj, path)
    out: dict[str, Tensor] = {}
    for key, value in raw.items():
        tensor = _to_tensor(value)
        if tensor is not None and isinstance(key, str):
            out[key] = tensor
    if not out:
        raise ValueError(f"{config_key}: '{path}' contains no tensors")
    return out
