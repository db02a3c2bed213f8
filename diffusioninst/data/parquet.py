"""The portable Parquet layout of preprocessed datasets: one row per image, explicit Arrow types.

Written by ``pipelines/preprocess.py`` (:mod:`diffusioninst.data.preprocess`), read by the Ray Data
ingest (:mod:`diffusioninst.data.ray_ingest`) and by the local loaders. Plain pyarrow/pandas can read the
shards: no Ray tensor extension types are used.

Per-instance columns are parallel lists (instance k of an image is element k of each). Coordinates are
absolute pixels of the original upright image. See docs/data.md for the full description.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from diffusioninst.data.masks import rle_counts_str, segmentation_to_rle
from diffusioninst.data.records import DatasetMeta, ImageRecord, Instance

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
GT_JSON = "annotations.json"

SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("file_name", pa.string(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("image_format", pa.string(), nullable=False),
        pa.field("reencoded", pa.bool_(), nullable=False),
        pa.field("ann_ids", pa.list_(pa.int64()), nullable=False),
        pa.field("category_ids", pa.list_(pa.int64()), nullable=False),
        pa.field("labels", pa.list_(pa.int64()), nullable=False),
        pa.field("boxes", pa.list_(pa.float32()), nullable=False),
        pa.field("areas", pa.list_(pa.float32()), nullable=False),
        pa.field("iscrowd", pa.list_(pa.bool_()), nullable=False),
        pa.field("masks_rle", pa.list_(pa.string()), nullable=False),
        pa.field("polygons", pa.list_(pa.list_(pa.list_(pa.float64()))), nullable=False),
        pa.field("neg_category_ids", pa.list_(pa.int64()), nullable=False),
        pa.field("not_exhaustive_category_ids", pa.list_(pa.int64()), nullable=False),
    ],
    metadata={"diffusioninst.schema_version": str(SCHEMA_VERSION)},
)


def record_to_row(rec: ImageRecord, image: bytes, image_format: str, reencoded: bool) -> dict[str, Any]:
    """One Parquet row of a record. ``masks_rle`` holds every instance (polygons rasterised at the original
    size); ``polygons`` keeps the rings of polygon instances (empty list for RLE instances) so training can
    transform them geometrically."""
    insts = rec.instances
    return {
        "image_id": rec.image_id,
        "file_name": Path(rec.file_name).name,
        "height": rec.height,
        "width": rec.width,
        "image": image,
        "image_format": image_format,
        "reencoded": reencoded,
        "ann_ids": [i.ann_id for i in insts],
        "category_ids": [i.category_id for i in insts],
        "labels": [i.label for i in insts],
        "boxes": [float(v) for i in insts for v in i.box_xyxy],
        "areas": [float(i.area) for i in insts],
        "iscrowd": [bool(i.iscrowd) for i in insts],
        "masks_rle": [rle_counts_str(_rle_of(i, rec.height, rec.width)) for i in insts],
        "polygons": [[p.tolist() for p in i.polygons] if i.polygons is not None else [] for i in insts],
        "neg_category_ids": list(rec.neg_category_ids),
        "not_exhaustive_category_ids": list(rec.not_exhaustive_category_ids),
    }


def _rle_of(inst: Instance, h: int, w: int) -> dict:
    return inst.rle if inst.polygons is None else segmentation_to_rle([p.tolist() for p in inst.polygons], h, w)


def rows_to_table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=SCHEMA)


def _seq(v: Any) -> list:
    return v.tolist() if isinstance(v, np.ndarray) else list(v)


def row_to_record(row: dict[str, Any]) -> ImageRecord:
    """Inverse of :func:`record_to_row` (without the image bytes). Works on pyarrow ``to_pylist`` rows and
    on rows of a Ray numpy batch (object arrays)."""
    h, w = int(row["height"]), int(row["width"])
    boxes = np.asarray(row["boxes"], np.float64).reshape(-1, 4)
    polys, rles = _seq(row["polygons"]), _seq(row["masks_rle"])
    instances = []
    for k, (aid, cid, lab) in enumerate(zip(_seq(row["ann_ids"]), _seq(row["category_ids"]), _seq(row["labels"]))):
        rings = [np.asarray(r, np.float64) for r in _seq(polys[k])]
        instances.append(
            Instance(
                ann_id=int(aid),
                category_id=int(cid),
                label=int(lab),
                box_xyxy=boxes[k].copy(),
                polygons=rings or None,
                rle=None if rings else {"size": [h, w], "counts": str(rles[k])},
                iscrowd=bool(_seq(row["iscrowd"])[k]),
                area=float(_seq(row["areas"])[k]),
            )
        )
    return ImageRecord(
        image_id=int(row["image_id"]),
        file_name=str(row["file_name"]),
        height=h,
        width=w,
        instances=instances,
        neg_category_ids=[int(v) for v in _seq(row["neg_category_ids"])],
        not_exhaustive_category_ids=[int(v) for v in _seq(row["not_exhaustive_category_ids"])],
    )


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; is {folder} a folder written by pipelines/preprocess.py?")
    manifest = json.loads(path.read_text())
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {manifest.get('schema_version')} != supported {SCHEMA_VERSION}")
    return manifest


def shard_paths(folder: str | Path) -> list[str]:
    """The shard files the manifest lists (never stray files of an interrupted run)."""
    manifest = read_manifest(folder)
    return [str(Path(folder) / s["file"]) for s in manifest["shards"]]


def meta_from_manifest(folder: str | Path) -> DatasetMeta:
    manifest = read_manifest(folder)
    cats = manifest["categories"]
    return DatasetMeta(
        kind=manifest["kind"],
        category_ids=[c["id"] for c in cats],
        class_names=[c["name"] for c in cats],
        gt_json=str(Path(folder) / GT_JSON),
        image_count=[int(c["image_count"]) for c in cats],
        frequency=[c["frequency"] for c in cats],
    )


def read_records(folder: str | Path, max_images: int | None = None) -> tuple[list[ImageRecord], list[bytes]]:
    """All records of a shard folder (sorted by image id) and their encoded image bytes, with plain pyarrow."""
    tables = [pq.read_table(p, schema=SCHEMA) for p in shard_paths(folder)]
    table = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
    table = table.sort_by("image_id")
    if max_images is not None:
        table = table.slice(0, max_images)
    blobs = table.column("image").to_pylist()
    rows = table.drop_columns(["image"]).to_pylist()
    return [row_to_record(r) for r in rows], blobs
