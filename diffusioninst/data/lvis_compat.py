"""Scoped compatibility helpers for the ``lvis`` package (0.5.3, the last PyPI release).

* ``import lvis`` pulls in matplotlib (about 0.5 s), so it is imported lazily here.
* lvis 0.5.3's ``LVISEval.accumulate`` uses ``np.float``, removed in numpy 1.24 (fixed upstream in
  lvis-api 7d7f07d, never released). :func:`numpy_float_alias` provides the alias only inside a ``with``
  block, so nothing is patched at import time; evaluation code wraps ``LVISEval.run()`` in it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

_ALIAS_LOCK = threading.Lock()


@contextlib.contextmanager
def numpy_float_alias() -> Iterator[None]:
    """Make ``np.float`` (= builtin ``float``) exist for the duration of the block, then remove it again.

    Process-wide while active (a module attribute); a lock serialises concurrent users in one process.
    A no-op on numpy < 1.24, where the alias still exists.
    """
    with _ALIAS_LOCK:
        added = "float" not in np.__dict__
        if added:
            np.float = float  # type: ignore[attr-defined]
        try:
            yield
        finally:
            if added:
                del np.float  # type: ignore[attr-defined]


def lvis_api(data: dict[str, Any]):
    """An ``lvis.LVIS`` index over an already loaded (and validated) LVIS dict (no second JSON read)."""
    from lvis import LVIS

    class _LVISFromDict(LVIS):
        def __init__(self, dataset: dict[str, Any]):
            self._preloaded = dataset
            super().__init__("<in-memory>")

        def _load_json(self, path: str) -> dict[str, Any]:
            return self._preloaded

    return _LVISFromDict(data)
