"""Synthetic instance-segmentation dataset: real COCO and LVIS v1 JSON plus JPEG images.

Each image is a textured background with 2-8 overlapping shapes painted in order (later shapes occlude
earlier ones); colours are random per instance, so only the outline gives the class away. Annotations
are exact: every shape is a polygon rasterised with pycocotools both to paint the image and (through
``COCO.annToMask``) to read the annotation back, so

* an unoccluded instance is annotated with its polygon;
* an occluded instance is annotated with the compressed RLE of its visible pixels;
* an instance whose visible area falls below ``max(min_visible_area, min_visible_fraction * shape area)``
  is removed from the scene (not painted, counted in ``stats.json``), which can only uncover the
  instances beneath it; the visibility test is repeated until every painted instance passes;
* ``bbox`` is the tight box of the visible mask and ``area`` its pixel count (``iscrowd`` 0).

``generate`` caches: the dataset lives under ``<root>/<key>``, key = hash of the config and the
generator version; calling it again returns at once. Generation writes to a temporary folder renamed
into place at the end, so concurrent callers and interrupted runs never see half a dataset.

CLI: ``python -m diffusioninst.data.synthetic --output DIR --num-train 400 --num-val 100``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from diffusioninst.config.schema import SyntheticConfig
from diffusioninst.data import masks as M
from diffusioninst.data.records import lvis_frequency
from diffusioninst.data.shapes import SHAPE_NAMES, background, fill_colour, sample_extent, shaded_patch, shape_polygon

GENERATOR_VERSION = 1
MARKER = "synthetic_config.json"
SPLITS = ("train", "val")


@dataclass(frozen=True)
class SyntheticPaths:
    """Where a generated dataset lives. ``*_images`` folders hold ``<image id:012d>.jpg`` files."""

    root: str
    train_images: str
    train_json: str
    train_lvis_json: str
    val_images: str
    val_json: str
    val_lvis_json: str

    def images(self, split: str) -> str:
        return getattr(self, f"{split}_images")

    def annotations(self, split: str, kind: str = "coco") -> str:
        return getattr(self, f"{split}_json" if kind == "coco" else f"{split}_lvis_json")

    def stats(self) -> dict[str, Any]:
        return json.loads((Path(self.root) / "stats.json").read_text())


def config_key(cfg: SyntheticConfig) -> str:
    """Cache key: hash of every generation setting (``root`` excluded) and the generator version."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "root"}
    blob = json.dumps({"version": GENERATOR_VERSION, "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def paths_in(folder: str | Path) -> SyntheticPaths:
    f = Path(folder)
    return SyntheticPaths(
        root=str(f),
        train_images=str(f / "images" / "train"),
        train_json=str(f / "annotations" / "instances_train.json"),
        train_lvis_json=str(f / "annotations" / "lvis_v1_train.json"),
        val_images=str(f / "images" / "val"),
        val_json=str(f / "annotations" / "instances_val.json"),
        val_lvis_json=str(f / "annotations" / "lvis_v1_val.json"),
    )


def _is_complete(folder: Path, cfg: SyntheticConfig) -> bool:
    marker = folder / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("key") == config_key(cfg)
    except (OSError, ValueError):
        return False


# ----------------------------------------------------------------------------------------------
# one image


def render_image(cfg: SyntheticConfig, rng: np.random.Generator) -> tuple[np.ndarray, list[dict], int]:
    """Draw one scene.

    Returns:
        image: uint8 [h, w, 3] RGB.
        objects: per kept instance ``{"label", "polygon" (flat float64), "visible" (uint8 [h, w]),
            "occluded" (bool)}`` in painting order.
        dropped: instances removed because too little of them stayed visible.
    """
    h, w = int(cfg.image_size[0]), int(cfg.image_size[1])
    probs = (np.arange(cfg.num_classes) + 1.0) ** -cfg.class_distribution_power
    probs /= probs.sum()
    n = int(rng.integers(cfg.min_instances, cfg.max_instances + 1))
    img = background(rng, h, w)
    shapes = []
    for _ in range(n):
        label = int(rng.choice(cfg.num_classes, p=probs))
        extent = sample_extent(rng, cfg.min_object_size, cfg.max_object_size, cfg.small_fraction)
        poly = shape_polygon(rng, SHAPE_NAMES[label], extent, (h, w))
        full = M.polygons_to_mask([poly], h, w).astype(bool)
        ys, xs = np.nonzero(full)
        if len(ys) == 0:
            continue
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        colour = fill_colour(rng, img[y0:y1, x0:x1].reshape(-1, 3).mean(0))
        patch = shaded_patch(rng, colour, y1 - y0, x1 - x0)
        shapes.append({"label": label, "polygon": poly, "full": full, "box": (y0, y1, x0, x1), "patch": patch})

    active = list(range(len(shapes)))
    dropped = 0
    while True:
        owner = np.full((h, w), -1, np.int32)
        for i in active:
            owner[shapes[i]["full"]] = i
        need = {i: max(cfg.min_visible_area, cfg.min_visible_fraction * shapes[i]["full"].sum()) for i in active}
        counts = np.bincount(owner.ravel() + 1, minlength=len(shapes) + 1)[1:]
        failing = [i for i in active if counts[i] < need[i]]
        if not failing:
            break
        dropped += len(failing)
        active = [i for i in active if i not in failing]

    objects = []
    for i in active:
        s = shapes[i]
        y0, y1, x0, x1 = s["box"]
        region = img[y0:y1, x0:x1]
        sel = s["full"][y0:y1, x0:x1]
        region[sel] = s["patch"][sel]
    img += 4.0 * rng.standard_normal(img.shape, dtype=np.float32)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    for i in active:
        visible = owner == i
        objects.append(
            {
                "label": shapes[i]["label"],
                "polygon": shapes[i]["polygon"],
                "visible": visible.astype(np.uint8),
                "occluded": bool(counts[i] != shapes[i]["full"].sum()),
            }
        )
    return image, objects, dropped


def _annotation(obj: dict, ann_id: int, image_id: int, h: int, w: int) -> dict:
    rle = M.mask_to_rle(obj["visible"])
    if obj["occluded"]:
        segmentation: Any = {"size": [h, w], "counts": M.rle_counts_str(rle)}
    else:
        segmentation = [[float(v) for v in obj["polygon"]]]
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": obj["label"] + 1,
        "segmentation": segmentation,
        "area": float(M.rle_area(rle)),
        "bbox": M.rle_bbox_xywh(rle),
        "iscrowd": 0,
    }


# ----------------------------------------------------------------------------------------------
# whole dataset


def _write_split(cfg: SyntheticConfig, split_index: int, folder: Path, first_image_id: int, first_ann_id: int):
    split = SPLITS[split_index]
    count = cfg.num_train if split == "train" else cfg.num_val
    img_dir = folder / "images" / split
    img_dir.mkdir(parents=True)
    h, w = int(cfg.image_size[0]), int(cfg.image_size[1])
    images, anns = [], []
    stats = {"images": count, "instances": 0, "dropped_occluded": 0, "polygon": 0, "rle": 0}
    stats.update({"small": 0, "medium": 0, "large": 0})
    ann_id = first_ann_id
    for k in range(count):
        image_id = first_image_id + k
        rng = np.random.default_rng([cfg.seed, split_index, k])
        image, objects, dropped = render_image(cfg, rng)
        name = f"{image_id:012d}.jpg"
        ok, buf = cv2.imencode(".jpg", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, cfg.jpeg_quality])
        if not ok:
            raise RuntimeError(f"cannot JPEG-encode synthetic image {name}")
        (img_dir / name).write_bytes(buf.tobytes())
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        stats["dropped_occluded"] += dropped
        for obj in objects:
            ann = _annotation(obj, ann_id, image_id, h, w)
            anns.append(ann)
            ann_id += 1
            stats["polygon" if isinstance(ann["segmentation"], list) else "rle"] += 1
            area = ann["area"]
            stats["small" if area < 32**2 else "medium" if area < 96**2 else "large"] += 1
        stats["instances"] += len(objects)
    return images, anns, stats


def _categories(cfg: SyntheticConfig) -> list[dict]:
    return [{"id": k + 1, "name": SHAPE_NAMES[k], "supercategory": "shape"} for k in range(cfg.num_classes)]


def _lvis_json(coco: dict, split: str, train_anns: list[dict], num_classes: int) -> dict:
    """LVIS v1 flavour of a COCO dict: frequency/image_count from the TRAIN split, coco_url instead of
    file_name, exhaustive annotation (every absent category is a verified negative)."""
    img_sets: list[set[int]] = [set() for _ in range(num_classes)]
    inst = [0] * num_classes
    for a in train_anns:
        img_sets[a["category_id"] - 1].add(a["image_id"])
        inst[a["category_id"] - 1] += 1
    cats = [
        {
            "id": c["id"],
            "name": c["name"],
            "synonyms": [c["name"]],
            "def": f"a synthetic {c['name']} shape",
            "synset": f"{c['name']}.n.01",
            "image_count": len(img_sets[c["id"] - 1]),
            "instance_count": inst[c["id"] - 1],
            "frequency": lvis_frequency(len(img_sets[c["id"] - 1])),
        }
        for c in coco["categories"]
    ]
    present: dict[int, set[int]] = {img["id"]: set() for img in coco["images"]}
    for a in coco["annotations"]:
        present[a["image_id"]].add(a["category_id"])
    all_ids = [c["id"] for c in cats]
    images = [
        {
            "id": img["id"],
            "height": img["height"],
            "width": img["width"],
            "coco_url": f"http://images.synthetic.invalid/{split}/{img['file_name']}",
            "flickr_url": "",
            "license": 1,
            "date_captured": "2026-01-01 00:00:00",
            "neg_category_ids": [c for c in all_ids if c not in present[img["id"]]],
            "not_exhaustive_category_ids": [],
        }
        for img in coco["images"]
    ]
    anns = [
        {k: a[k] for k in ("id", "image_id", "category_id", "segmentation", "area", "bbox")}
        for a in coco["annotations"]
    ]
    return {
        "info": coco["info"],
        "licenses": coco["licenses"],
        "images": images,
        "annotations": anns,
        "categories": cats,
    }


def write_dataset(cfg: SyntheticConfig, folder: str | Path) -> dict[str, Any]:
    """Generate the dataset into ``folder`` (which must not exist yet). Returns the generation stats."""
    folder = Path(folder)
    (folder / "annotations").mkdir(parents=True)
    info = {"description": "diffusioninst synthetic shapes", "version": str(GENERATOR_VERSION), "year": 2026}
    licenses = [{"id": 1, "name": "CC0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}]
    paths = paths_in(folder)
    all_stats: dict[str, Any] = {}
    train_anns: list[dict] = []
    coco_splits = {}
    next_image, next_ann = 1, 1
    for index, split in enumerate(SPLITS):
        images, anns, stats = _write_split(cfg, index, folder, next_image, next_ann)
        next_image += len(images)
        next_ann += len(anns)
        coco = {"info": info, "licenses": licenses, "images": images, "annotations": anns}
        coco["categories"] = _categories(cfg)
        coco_splits[split] = coco
        all_stats[split] = stats
        if split == "train":
            train_anns = anns
    for split, coco in coco_splits.items():
        Path(paths.annotations(split, "coco")).write_text(json.dumps(coco))
        lvis = _lvis_json(coco, split, train_anns, cfg.num_classes)
        Path(paths.annotations(split, "lvis")).write_text(json.dumps(lvis))
    (folder / "stats.json").write_text(json.dumps(all_stats, indent=2))
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "root"}
    (folder / MARKER).write_text(json.dumps({"key": config_key(cfg), "settings": settings}, indent=2))
    return all_stats


def generate(cfg: SyntheticConfig, root: str | Path | None = None, subdir: bool = True) -> SyntheticPaths:
    """Generate (or find cached) the dataset described by ``cfg``.

    Args:
        cfg: generation settings.
        root: cache folder (default ``cfg.root``).
        subdir: put the dataset in ``<root>/<config key>`` (True) or in ``root`` itself (False; an
            existing dataset there with another config is replaced).
    """
    root = Path(root if root is not None else cfg.root)
    target = root / config_key(cfg) if subdir else root
    if _is_complete(target, cfg):
        return paths_in(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write_dataset(cfg, tmp / "data")
        if target.exists():
            if _is_complete(target, cfg):  # another process finished first
                return paths_in(target)
            if not subdir and not (target / MARKER).is_file() and any(target.iterdir()):
                raise FileExistsError(f"{target} exists and is not a synthetic dataset; refusing to replace it")
            shutil.rmtree(target)
        try:
            os.replace(tmp / "data", target)
        except OSError:
            if not _is_complete(target, cfg):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths_in(target)


# ----------------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m diffusioninst.data.synthetic",
        description="Generate the synthetic shapes dataset (COCO + LVIS v1 JSON, JPEG images). Re-running with "
        "the same settings returns at once.",
    )
    parser.add_argument("--output", required=True, help="dataset folder (created; replaced if it holds another config)")
    for f in dataclasses.fields(SyntheticConfig):
        if f.name == "root":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        kwargs: dict[str, Any] = {"default": default, "help": f"{f.metadata['help']} (default: {default})"}
        if isinstance(default, list):
            kwargs.update(nargs=len(default), type=type(default[0]))
        else:
            kwargs["type"] = type(default)
        parser.add_argument(flag, **kwargs)
    return parser


def main(argv: list[str] | None = None) -> int:
    from diffusioninst.config.loader import ConfigError, build_config

    args = vars(_parser().parse_args(argv))
    output = args.pop("output")
    try:
        cfg = build_config(SyntheticConfig, {**args, "root": output})
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    if cfg.min_instances > cfg.max_instances or cfg.min_object_size > cfg.max_object_size:
        raise SystemExit("error: min_instances/min_object_size must not exceed their max_ counterparts")
    paths = generate(cfg, output, subdir=False)
    print(json.dumps({"paths": dataclasses.asdict(paths), "stats": paths.stats()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
