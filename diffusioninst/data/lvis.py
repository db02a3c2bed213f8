"""LVIS v1 reader (the ``lvis`` package) and the class-frequency helpers of the federated loss.

LVIS v1 images carry no ``file_name``: the file is found from ``coco_url``
(``http://images.cocodataset.org/train2017/000000391895.jpg``) as ``<images_dir>/train2017/<name>`` or,
when that does not exist, ``<images_dir>/<name>`` (so ``images_dir`` may be the COCO root or the split
folder). Federated fields (``neg_category_ids``, ``not_exhaustive_category_ids``, categories'
``image_count``/``frequency``) are kept in the records and :class:`DatasetMeta`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffusioninst.data.coco import CheckFiles, LoadedDataset, build_meta, build_records, take_first, validated
from diffusioninst.data.lvis_compat import lvis_api
from diffusioninst.data.records import DatasetMeta


def lvis_file_name(img: dict, images_dir: Path) -> Path:
    """Image path of an LVIS ``images[]`` entry (``file_name`` if present, else derived from ``coco_url``)."""
    if img.get("file_name"):
        return images_dir / img["file_name"]
    parts = str(img["coco_url"]).rstrip("/").split("/")
    nested = images_dir / parts[-2] / parts[-1]
    return nested if nested.is_file() or not (images_dir / parts[-1]).is_file() else images_dir / parts[-1]


def read_lvis(
    annotations: str | Path,
    images_dir: str | Path,
    on_bad_record: str = "error",
    check_files: CheckFiles = "exists",
    max_images: int | None = None,
) -> LoadedDataset:
    """Read an LVIS v1 JSON (same arguments and checks as :func:`diffusioninst.data.coco.read_coco`)."""
    images_dir = Path(images_dir)
    data, report = validated(annotations, images_dir, lvis_file_name, on_bad_record, check_files)
    data = take_first(data, max_images)
    api = lvis_api(data)
    records = build_records(api, data, images_dir, lvis_file_name, api.ann_to_rle)
    return LoadedDataset(records, build_meta(data, "lvis", str(annotations), records), report, data)


def fed_loss_class_weights(meta: DatasetMeta, power: float = 0.5) -> torch.Tensor:
    """Per contiguous class ``image_count ** power``, float32 [C]: the sampling weights of the federated
    loss (detectron2 ``get_fed_loss_cls_weights``; ``model.loss.fed_loss_freq_weight_power``)."""
    return torch.tensor(meta.image_count, dtype=torch.float32) ** power
