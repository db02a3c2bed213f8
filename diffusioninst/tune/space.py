"""Search spaces: plain-YAML domains -> Ray Tune objects, and the expansion of a sampler sweep's settings.

``{grid_search: [...]}`` is already what ``tune.grid_search`` returns; ``choice``/``uniform``/``loguniform``/
``randint`` become Tune ``Domain`` objects (``randint`` upper bound exclusive, as in Tune).

Sampler settings are canonicalised before de-duplication: with one sampling step there is no next step, so
``eta``, ``box_renewal``, ``ensemble`` and ``ensemble_last_step`` change nothing; without ``ensemble``,
``ensemble_last_step`` changes nothing. Those combinations are evaluated once.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from diffusioninst.config import SamplerConfig
from diffusioninst.config.sweep import Domain, parse_domain

# sampler keys that only act between sampling steps (see diffusioninst/model/sampler.py)
MULTI_STEP_ONLY = ("eta", "box_renewal", "renewal_threshold", "ensemble", "ensemble_last_step")


def to_tune_domain(domain: Domain) -> Any:
    """One parsed domain as the object ``Tuner(param_space=...)`` expects."""
    from ray import tune

    if domain.kind == "grid_search":
        return tune.grid_search(list(domain.values))
    if domain.kind == "choice":
        return tune.choice(list(domain.values))
    lo, hi = domain.bounds
    if domain.kind == "uniform":
        return tune.uniform(float(lo), float(hi))
    if domain.kind == "loguniform":
        return tune.loguniform(float(lo), float(hi))
    if domain.kind == "randint":
        return tune.randint(int(lo), int(hi))
    raise ValueError(f"unknown domain kind {domain.kind!r}")


def to_tune_space(search_space: dict[str, Any]) -> dict[str, Any]:
    """``{dotted key: YAML domain}`` -> Tune ``param_space`` (flat: keys stay dotted)."""
    return {key: to_tune_domain(parse_domain(raw)) for key, raw in search_space.items()}


def expand(search_space: dict[str, Any], num_samples: int = 1, seed: int | None = None) -> list[dict[str, Any]]:
    """Every variant Tune would run (grid expanded once per sample, random domains drawn from ``seed``)."""
    import numpy as np
    from ray.tune.search.variant_generator import generate_variants

    space = to_tune_space(search_space)
    rng = np.random.RandomState(seed) if seed is not None else None
    out = []
    for _ in range(num_samples):
        for _, resolved in generate_variants(space, random_state=rng):
            out.append({k: _plain(resolved[k]) for k in search_space})
    return out


def _plain(value: Any) -> Any:
    item = getattr(value, "item", None)
    return item() if callable(item) and not isinstance(value, (list, dict, str)) else value


def canonical_sampler(sampler: SamplerConfig) -> SamplerConfig:
    """The setting with every knob that cannot change the result reset to ``SamplerConfig()``'s default."""
    default = SamplerConfig()
    values = dict(vars(sampler))
    if sampler.steps == 1:
        values.update({k: getattr(default, k) for k in MULTI_STEP_ONLY})
    elif not sampler.ensemble:
        values["ensemble_last_step"] = default.ensemble_last_step
    if not values["box_renewal"]:
        values["renewal_threshold"] = default.renewal_threshold
    return SamplerConfig(**values)


def setting_id(sampler: SamplerConfig) -> str:
    """Stable short id of a (canonical) sampler setting; names its stored results and MLflow run key."""
    text = json.dumps(vars(sampler), sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def sampler_settings(
    base: SamplerConfig, variants: list[dict[str, Any]]
) -> tuple[list[tuple[dict[str, Any], SamplerConfig]], int]:
    """Distinct canonical settings of ``variants`` (dotted ``sampler.*`` params) applied to ``base``.

    Returns:
        ([(params as shown, canonical SamplerConfig)], number of variants dropped as duplicates); the shown
        params of a canonicalised knob read ``None`` ("has no effect here").
    """
    seen: set[str] = set()
    out = []
    for params in variants:
        values = dict(vars(base))
        values.update({k.removeprefix("sampler."): v for k, v in params.items()})
        canon = canonical_sampler(SamplerConfig(**values))
        sid = setting_id(canon)
        if sid in seen:
            continue
        seen.add(sid)
        shown = {}
        for key, value in params.items():
            name = key.removeprefix("sampler.")
            shown[key] = value if name not in MULTI_STEP_ONLY or _matters(canon, name) else None
        out.append((shown, canon))
    return out, len(variants) - len(out)


def _matters(canon: SamplerConfig, name: str) -> bool:
    if canon.steps == 1:
        return False
    if name == "ensemble_last_step":
        return canon.ensemble
    if name == "renewal_threshold":
        return canon.box_renewal
    return True
