"""Field helpers for the typed configuration dataclasses.

Every config field is declared with :func:`option`, which records a help text and the allowed range or
choices in the dataclass field metadata. The validator (:mod:`diffusioninst.config.loader`) reads that
metadata, so the allowed values live next to the field they constrain.
"""

from __future__ import annotations

import dataclasses
from typing import Any

_MISSING = dataclasses.MISSING


def option(
    default: Any = _MISSING,
    *,
    help: str,
    min: float | None = None,
    max: float | None = None,
    min_exclusive: bool = False,
    choices: tuple[Any, ...] | None = None,
    min_len: int | None = None,
    source: str | None = None,
) -> Any:
    """Declare a config field.

    Args:
        default: default value; lists and dicts are copied per instance.
        help: one line saying what the field controls (shown by ``--list-keys``).
        min, max: inclusive numeric bounds, applied to the value or to every element of a list.
        min_exclusive: make ``min`` an exclusive bound (``value > min``).
        choices: allowed values (for strings, applied to the value or each element of a list).
        min_len: minimum length for list values.
        source: where the default comes from (e.g. the official code location), for documentation.
    """
    meta = {
        "help": help,
        "min": min,
        "max": max,
        "min_exclusive": min_exclusive,
        "choices": choices,
        "min_len": min_len,
        "source": source,
    }
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: _copy(value), metadata=meta)
    if dataclasses.is_dataclass(default) and isinstance(default, type):
        return dataclasses.field(default_factory=default, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(cls: type, *, help: str) -> Any:
    """Declare a nested config section (a dataclass with its own defaults)."""
    return dataclasses.field(default_factory=cls, metadata={"help": help})


def _copy(value: Any) -> Any:
    import copy

    return copy.deepcopy(value)
