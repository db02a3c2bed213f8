"""Plain per-image records shared by the readers, the transforms, the Parquet shards and the loaders.

Coordinates are absolute pixels of the ORIGINAL image (as annotated; for EXIF-rotated files that is the
upright, displayed image). Segmentations keep their source form: polygons stay polygons (so transforms
can move them geometrically and rasterise at the output size, as detectron2 does) and RLE stays a
compressed pycocotools RLE (decoded to a bitmask only when a sample is built).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Instance:
    """One annotated object.

    Attributes:
        ann_id: annotation id in the source JSON.
        category_id: dataset category id.
        label: contiguous 0-based class index.
        box_xyxy: float64 [4], absolute xyxy in the original image frame (from the JSON ``bbox`` xywh).
        polygons: list of float64 [2k] flat ``x0, y0, x1, y1, ...`` rings (k >= 3), or None for RLE.
        rle: compressed pycocotools RLE ``{"size": [h, w], "counts": bytes}``, or None for polygons.
        iscrowd: crowd region (excluded from training targets, kept for evaluation).
        area: the JSON ``area``.
    """

    ann_id: int
    category_id: int
    label: int
    box_xyxy: np.ndarray
    polygons: list[np.ndarray] | None = None
    rle: dict | None = None
    iscrowd: bool = False
    area: float = 0.0


@dataclass
class ImageRecord:
    """One image and its annotations.

    Attributes:
        image_id: dataset image id.
        file_name: path of the image file (absolute, or relative to the working directory).
        height, width: original (upright) size from the JSON.
        instances: every valid annotation of the image, crowd included.
        neg_category_ids, not_exhaustive_category_ids: LVIS federated fields (dataset category ids).
    """

    image_id: int
    file_name: str
    height: int
    width: int
    instances: list[Instance] = field(default_factory=list)
    neg_category_ids: list[int] = field(default_factory=list)
    not_exhaustive_category_ids: list[int] = field(default_factory=list)

    def training_instances(self) -> list[Instance]:
        """Instances that become training targets (crowd regions removed, as detectron2 does)."""
        return [inst for inst in self.instances if not inst.iscrowd]


@dataclass
class DatasetMeta:
    """What the loaders, the evaluator and the federated loss need to know about a dataset.

    Attributes:
        kind: ``"coco"`` or ``"lvis"`` (which evaluator reads ``gt_json``).
        category_ids: dataset category id of each contiguous label (``category_ids[label]``).
        class_names: name of each contiguous label.
        gt_json: path of the ground-truth JSON the evaluator reads (None when not on disk).
        image_count: per contiguous label, the number of images annotated with it (LVIS ``image_count``;
            computed from the annotations for COCO).
        frequency: per contiguous label, LVIS ``r``/``c``/``f`` (derived from ``image_count`` when absent).
    """

    kind: str
    category_ids: list[int]
    class_names: list[str]
    gt_json: str | None = None
    image_count: list[int] = field(default_factory=list)
    frequency: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    @property
    def label_of(self) -> dict[int, int]:
        """Map dataset category id -> contiguous label."""
        return {cid: i for i, cid in enumerate(self.category_ids)}


def lvis_frequency(image_count: int) -> str:
    """LVIS frequency group of a category annotated in ``image_count`` training images (r: 1-10, c: 11-100, f: >100)."""
    if image_count <= 10:
        return "r"
    if image_count <= 100:
        return "c"
    return "f"
