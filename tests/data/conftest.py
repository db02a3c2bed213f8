"""Shared fixtures of the data tests: one small synthetic dataset generated per session."""

from __future__ import annotations

import pytest

from diffusioninst.config.schema import SyntheticConfig
from diffusioninst.data.synthetic import generate


def small_synthetic_config(**overrides) -> SyntheticConfig:
    base: dict = {"num_train": 24, "num_val": 8, "image_size": [96, 128], "min_object_size": 10, "seed": 3}
    base["max_object_size"] = 80
    base.update(overrides)
    return SyntheticConfig(**base)


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """A 24 + 8 image synthetic dataset (96 x 128 px), generated once per test session."""
    return generate(small_synthetic_config(), tmp_path_factory.mktemp("synthetic"))


PYCOCOTOOLS_NUMPY2_WARNING = "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"


def pytest_collection_modifyitems(items):
    # pycocotools 2.0.11's decode() trips numpy 2's __array__(copy=...) deprecation on every call
    for item in items:
        if "tests/data/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.filterwarnings(PYCOCOTOOLS_NUMPY2_WARNING))
