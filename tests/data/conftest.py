"""Shared fixtures of the data tests: one small synthetic dataset generated per session."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

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


H, W = 24, 32
GOOD_POLY = [[2, 2, 20, 2, 20, 18, 2, 18]]


def _ann(aid, iid, cat=1, bbox=(2, 2, 18, 16), seg=None):
    return {"id": aid, "image_id": iid, "category_id": cat, "bbox": list(bbox), "area": 288.0, "iscrowd": 0,
            "segmentation": GOOD_POLY if seg is None else seg}  # fmt: skip


def _upright(seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (H, W, 3), dtype=np.uint8))


def make_dataset(tmp_path):
    """Images 1-6 valid (RGB, grayscale, CMYK, RGBA PNG, EXIF-rotated JPEG, RGB), one annotation each."""
    d = tmp_path / "images"
    d.mkdir()
    _upright(1).save(d / "rgb.jpg")
    _upright(2).convert("L").save(d / "gray.jpg")
    _upright(3).convert("CMYK").save(d / "cmyk.jpg")
    _upright(4).convert("RGBA").save(d / "rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: displayed = stored turned 90 degrees clockwise
    _upright(5).transpose(Image.Transpose.ROTATE_90).save(d / "exif.jpg", exif=exif)
    _upright(6).save(d / "rgb2.jpg")
    names = ["rgb.jpg", "gray.jpg", "cmyk.jpg", "rgba.png", "exif.jpg", "rgb2.jpg"]
    data = {
        "images": [{"id": i + 1, "file_name": n, "height": H, "width": W} for i, n in enumerate(names)],
        "annotations": [_ann(100 + i, i + 1) for i in range(6)],
        "categories": [{"id": 1, "name": "thing"}],
    }
    return data, d
