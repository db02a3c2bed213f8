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


def small_experiment(root, *overrides: str):
    """An ExperimentConfig on a small synthetic dataset cached under ``root`` (small images, small resizes)."""
    from diffusioninst.config import ExperimentConfig, load_config

    base = [
        "data.format=synthetic",
        f"data.synthetic.root={root}",
        "data.synthetic.num_train=24",
        "data.synthetic.num_val=8",
        "data.synthetic.image_size=[96,128]",
        "data.synthetic.min_object_size=10",
        "data.synthetic.max_object_size=80",
        "data.synthetic.seed=3",
        "data.augmentation.min_size_train=[96,112,128]",
        "data.augmentation.max_size_train=220",
        "data.augmentation.crop_resize=[100,120]",
        "data.augmentation.crop_size=[60,90]",
        "data.augmentation.min_size_test=112",
        "data.augmentation.max_size_test=200",
        "data.decode_workers=0",
        "solver.ims_per_batch=4",
        "model.head.num_classes=4",
        f"output_dir={root}/outputs",
    ]
    return load_config(ExperimentConfig, None, base + list(overrides))
