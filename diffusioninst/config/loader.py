"""Load, merge, override and validate configs.

A config file is YAML. ``_base_`` (a path or a list of paths, relative to the file) names files merged
first; mappings merge key by key, everything else (lists included) is replaced. Command-line overrides
are ``dotted.key=value`` strings whose value is parsed as YAML (``--set model.head.num_proposals=300``,
``--set eval.steps=[1,4]``).

Validation happens before any work starts and reports every problem at once: unknown keys (with the
nearest valid key), wrong types, out-of-range values and cross-field rules, each with the file (or
``--set``) that provided the value.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

BASE_KEY = "_base_"
CLI_SOURCE = "--set"
_FLOAT_RE = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
DEFAULT_SOURCE = "defaults"


class ConfigError(ValueError):
    """A config could not be loaded or is invalid; the message lists every problem found."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:" + "".join(f"\n  - {p}" for p in problems))


# ----------------------------------------------------------------------------------------------
# YAML loading with _base_ inheritance


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError([f"{path}: config file not found"]) from None
    except OSError as e:
        raise ConfigError([f"{path}: cannot read config file ({e})"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError([f"{path}:{where}: malformed YAML: {problem}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: top level must be a mapping of keys, got {type(data).__name__}"])
    return data


def _merge(dst: dict, src: dict, sources: dict[str, str], src_sources: dict[str, str], prefix: str = "") -> None:
    """Deep-merge ``src`` into ``dst`` in place; ``src_sources`` says which file set each key of ``src``."""
    for key, value in src.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], value, sources, src_sources, path + ".")
            continue
        dst[key] = _plain(value)
        for k in [k for k in sources if k == path or k.startswith(path + ".")]:
            del sources[k]
        sources.update({k: v for k, v in src_sources.items() if k == path or k.startswith(path + ".")})


def _record(sources: dict[str, str], value: Any, path: str, origin: str) -> None:
    """Mark ``path`` and every key below it as set by ``origin``."""
    if path:
        sources[path] = origin
    if isinstance(value, dict):
        for k, v in value.items():
            _record(sources, v, f"{path}.{k}" if path else str(k), origin)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _check_keys(data: dict, origin: Path, prefix: str = "") -> None:
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError([f"{origin}: key {key!r} under '{prefix or '<root>'}' must be a string"])
        if isinstance(value, dict):
            _check_keys(value, origin, f"{prefix}{key}.")


def _load(path: Path, stack: tuple[Path, ...]) -> tuple[dict[str, Any], dict[str, str]]:
    if path in stack:
        chain = " -> ".join(str(p) for p in (*stack, path))
        raise ConfigError([f"{stack[-1]}: _base_ cycle: {chain}"])
    data = _read_yaml(path)
    _check_keys(data, path)
    bases = data.pop(BASE_KEY, None)
    if bases is None:
        bases = []
    elif isinstance(bases, str):
        bases = [bases]
    elif not (isinstance(bases, list) and all(isinstance(b, str) for b in bases)):
        raise ConfigError([f"{path}: _base_ must be a path or a list of paths, got {bases!r}"])
    tree: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for base in bases:
        base_path = (path.parent / base).resolve()
        if not base_path.is_file():
            raise ConfigError([f"{path}: _base_ '{base}' not found (looked for {base_path})"])
        base_tree, base_sources = _load(base_path, (*stack, path))
        _merge(tree, base_tree, sources, base_sources)
    own: dict[str, str] = {}
    _record(own, data, "", str(path))
    _merge(tree, data, sources, own)
    return tree, sources


def load_tree(path: str | Path, sources: dict[str, str] | None = None) -> dict[str, Any]:
    """Read a YAML config and its ``_base_`` chain into one plain dict.

    Args:
        path: the config file.
        sources: filled with ``dotted.key -> file`` for every key, for error messages.
    Returns:
        the merged mapping (``_base_`` removed).
    """
    tree, found = _load(Path(path).resolve(), ())
    if sources is not None:
        sources.update(found)
    return tree


def apply_overrides(tree: dict[str, Any], overrides: list[str], sources: dict[str, str] | None = None) -> None:
    """Apply ``dotted.key=value`` overrides in place; values are parsed as YAML scalars/lists/maps."""
    sources = {} if sources is None else sources
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"{CLI_SOURCE} '{item}': expected KEY=VALUE, e.g. model.head.num_proposals=300")
            continue
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not p for p in key.split(".")):
            problems.append(f"{CLI_SOURCE} '{item}': empty key segment in '{key}'")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            problems.append(f"{CLI_SOURCE} '{item}': value is not valid YAML ({str(e).splitlines()[0]})")
            continue
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
        _record(sources, value, key, CLI_SOURCE)
    if problems:
        raise ConfigError(problems)


# ----------------------------------------------------------------------------------------------
# Building typed dataclasses with validation


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        return f"list of {_type_name(arg)}"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any) -> tuple[bool, Any]:
    """Return (ok, converted) for ``value`` against type hint ``tp`` (no range checks)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin is typing.Literal:
        return (value in typing.get_args(tp)), value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            return (type(None) in args), None
        for a in args:
            if a is type(None):
                continue
            ok, conv = _convert(a, value)
            if ok:
                return True, conv
        return False, value
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            return False, value
        out = []
        for v in value:
            ok, conv = _convert(arg, v)
            if not ok:
                return False, value
            out.append(conv)
        return True, out
    if origin is dict:
        return isinstance(value, dict), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return (isinstance(value, int) and not isinstance(value, bool)), value
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            return True, float(value)  # YAML 1.1 reads "1e-3" (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False, value
        return True, float(value)
    if tp is str:
        return isinstance(value, str), value
    return isinstance(value, tp), value


def _range_problem(value: Any, meta: dict) -> str | None:
    items = value if isinstance(value, list) else [value]
    lo, hi, choices = meta.get("min"), meta.get("max"), meta.get("choices")
    if meta.get("min_len") is not None and isinstance(value, list) and len(value) < meta["min_len"]:
        return f"needs at least {meta['min_len']} element(s), got {len(value)}"
    for v in items:
        if v is None:
            continue
        if choices is not None and v not in choices:
            return f"{v!r} is not allowed; allowed: {', '.join(repr(c) for c in choices)}"
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if lo is not None and (v <= lo if meta.get("min_exclusive") else v < lo):
                op = ">" if meta.get("min_exclusive") else ">="
                bound = f"{op} {lo}" + (f" and <= {hi}" if hi is not None else "")
                return f"{v!r} is out of range; allowed: {bound}"
            if hi is not None and v > hi:
                bound = (f">= {lo} and " if lo is not None else "") + f"<= {hi}"
                return f"{v!r} is out of range; allowed: {bound}"
    return None


def _where(sources: dict[str, str], key: str) -> str:
    probe = key
    while probe:
        if probe in sources:
            return sources[probe]
        probe = probe.rpartition(".")[0]
    return DEFAULT_SOURCE


def _build(cls: type[T], tree: Any, sources: dict[str, str], prefix: str, problems: list[str]) -> T:
    if not isinstance(tree, dict):
        problems.append(f"{_where(sources, prefix)}: {prefix}: expected a mapping, got {tree!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean '{(prefix + '.') if prefix else ''}{near[0]}'?" if near else ""
            allowed = ", ".join(sorted(fields))
            problems.append(
                f"{_where(sources, dotted)}: unknown key '{dotted}'{hint} "
                f"(valid keys of '{prefix or '<root>'}': {allowed})"
            )
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, sources, dotted, problems)
            continue
        ok, conv = _convert(tp, value)
        if not ok:
            problems.append(
                f"{_where(sources, dotted)}: {dotted}: expected {_type_name(tp)}, got {value!r} "
                f"({type(value).__name__})"
            )
            continue
        bad = _range_problem(conv, dict(fields[key].metadata))
        if bad:
            problems.append(f"{_where(sources, dotted)}: {dotted}: {bad}")
            continue
        kwargs[key] = conv
    return cls(**kwargs)


def _checks(obj: Any, sources: dict[str, str], prefix: str, problems: list[str]) -> None:
    for f in dataclasses.fields(obj):
        child = getattr(obj, f.name)
        if dataclasses.is_dataclass(child):
            _checks(child, sources, f"{prefix}{f.name}.", problems)
    check = getattr(obj, "check", None)
    if callable(check):
        for key, message in check():
            problems.append(f"{_where(sources, key)}: {key}: {message}")


def build_config(cls: type[T], tree: dict[str, Any], sources: dict[str, str] | None = None) -> T:
    """Turn a plain mapping into the dataclass ``cls``, validating everything.

    Raises:
        ConfigError: listing every unknown key, type error, range error and failed cross-field rule.
    """
    sources = sources or {}
    problems: list[str] = []
    cfg = _build(cls, tree, sources, "", problems)
    if not problems:
        _checks(cfg, sources, "", problems)
    if problems:
        raise ConfigError(problems)
    return cfg


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Load ``path`` (with its ``_base_`` chain), apply overrides and validate into ``cls``."""
    sources: dict[str, str] = {}
    tree = load_tree(path, sources) if path is not None else {}
    apply_overrides(tree, list(overrides or []), sources)
    return build_config(cls, tree, sources)


# ----------------------------------------------------------------------------------------------
# Serialisation


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (YAML/JSON serialisable)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None, width=110)


def save_config(cfg: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(cfg))
    return path


def flatten(cfg: Any) -> dict[str, Any]:
    """``{"model.head.num_proposals": 500, ...}`` for logging as MLflow params."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg, "")
    return out


def describe_keys(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, help) for every leaf field, for ``--list-keys``."""
    rows = []
    hints = typing.get_type_hints(cls)
    default_obj = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            rows.extend(describe_keys(tp, key + "."))
        else:
            meta = dict(f.metadata)
            extra = []
            if meta.get("min") is not None:
                extra.append((">" if meta.get("min_exclusive") else ">=") + f" {meta['min']}")
            if meta.get("max") is not None:
                extra.append(f"<= {meta['max']}")
            if meta.get("choices"):
                extra.append("in " + "/".join(map(str, meta["choices"])))
            help_text = meta.get("help", "") + (f" [{', '.join(extra)}]" if extra else "")
            rows.append((key, _type_name(tp), getattr(default_obj, f.name), help_text))
    return rows
