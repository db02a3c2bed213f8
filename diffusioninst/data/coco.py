"""COCO instances reader (pycocotools), also the shared core of the LVIS reader.

``read_coco`` validates the JSON (and, as asked, the image files) with :mod:`diffusioninst.data.validation`,
applies the bad-record policy, indexes what is left with ``pycocotools.coco.COCO`` and returns one
:class:`~diffusioninst.data.records.ImageRecord` per image (sorted by image id) with contiguous labels.

Crowd annotations are kept in the records (``Instance.iscrowd``) and excluded from training targets by
``ImageRecord.training_instances``; the evaluator reads the GT JSON itself, crowd regions included.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from diffusioninst.data.records import DatasetMeta, ImageRecord, Instance, lvis_frequency
from diffusioninst.data.validation import (
    CheckReport,
    Issue,
    _is_int,
    apply_skips,
    check_annotations,
    check_image_file,
    check_image_header,
    image_where,
    load_json,
)

CheckFiles = Literal["none", "exists", "header", "decode"]


@dataclass
class LoadedDataset:
    """Records of one split plus what the evaluator/federated loss need, and what was skipped."""

    records: list[ImageRecord]
    meta: DatasetMeta
    report: CheckReport
    data: dict[str, Any]  # the validated (and, under skip, cleaned) JSON dict


def coco_file_name(img: dict, images_dir: Path) -> Path:
    return images_dir / img["file_name"]


def check_files_of(
    data: dict, images_dir: Path, file_name_of: Callable[[dict, Path], Path], mode: CheckFiles, report: CheckReport
) -> None:
    """Run the file-level checks of ``mode`` on every image the JSON checks kept."""
    if mode == "none":
        return
    bad = report.bad_images
    for img in data["images"]:
        if not isinstance(img, dict) or not _is_int(img.get("id")) or img["id"] in bad or "height" not in img:
            continue  # reported by the JSON checks
        try:
            path = file_name_of(img, images_dir)
        except (KeyError, TypeError):
            continue  # reported as bad_image_entry already
        iid, where = img["id"], image_where(img)
        if mode == "exists":
            if not path.is_file():
                report.issues.append(Issue("missing_image_file", where, f"file {path} not found", iid))
        elif mode == "header":
            report.extend(check_image_header(path, iid, img["height"], img["width"], where))
        else:
            report.extend(check_image_file(path, iid, img["height"], img["width"], where)[0])


def coco_api(data: dict):
    """A ``pycocotools.coco.COCO`` index over an already loaded (and validated) dict, without the progress prints."""
    from pycocotools.coco import COCO

    api = COCO()
    api.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
        api.createIndex()
    return api


def build_meta(
    data: dict,
    kind: str,
    gt_json: str | None,
    records: list[ImageRecord],
    label_images: np.ndarray | None = None,
) -> DatasetMeta:
    """Contiguous labels = categories sorted by id; ``image_count``/``frequency`` from the JSON when it has
    them (LVIS), else the images per label (every annotation, crowd included, as detectron2 does): counted
    over ``records``, or given as ``label_images`` [C] when the records are elsewhere (the preprocessor's
    shard tasks)."""
    cats = sorted(data["categories"], key=lambda c: c["id"])
    ids = [c["id"] for c in cats]
    counted = np.zeros(len(ids), np.int64)
    if label_images is not None:
        counted += np.asarray(label_images, np.int64)
    for r in records:
        for lab in {inst.label for inst in r.instances}:
            counted[lab] += 1
    image_count = [int(c["image_count"]) if "image_count" in c else int(counted[i]) for i, c in enumerate(cats)]
    frequency = [c.get("frequency") or lvis_frequency(n) for c, n in zip(cats, image_count)]
    return DatasetMeta(
        kind=kind,
        category_ids=ids,
        class_names=[str(c.get("name", c["id"])) for c in cats],
        gt_json=gt_json,
        image_count=image_count,
        frequency=frequency,
    )


def annotations_by_image(annotations: list[dict]) -> dict[int, list[dict]]:
    """``image_id`` -> that image's annotations, in JSON order."""
    anns_of: dict[int, list[dict]] = {}
    for ann in annotations:
        anns_of.setdefault(ann["image_id"], []).append(ann)
    return anns_of


def build_records(
    api: Any,
    data: dict,
    images_dir: Path,
    file_name_of: Callable[[dict, Path], Path],
    ann_to_rle: Callable[[dict], dict],
) -> list[ImageRecord]:
    """One record per image of ``data`` (sorted by id), annotations in JSON order."""
    label_of = {cid: i for i, cid in enumerate(sorted(c["id"] for c in data["categories"]))}
    anns_of = annotations_by_image(data["annotations"])
    records = []
    for img in sorted(data["images"], key=lambda i: i["id"]):
        instances = []
        for ann in anns_of.get(img["id"], []):
            x, y, w, h = (float(v) for v in ann["bbox"])
            seg = ann["segmentation"]
            polygons = [np.asarray(p, np.float64) for p in seg] if isinstance(seg, list) else None
            instances.append(
                Instance(
                    ann_id=int(ann["id"]),
                    category_id=int(ann["category_id"]),
                    label=label_of[ann["category_id"]],
                    box_xyxy=np.array([x, y, x + w, y + h], np.float64),
                    polygons=polygons,
                    rle=None if polygons is not None else ann_to_rle(ann),
                    iscrowd=bool(ann.get("iscrowd", 0)),
                    area=float(ann.get("area", w * h)),
                )
            )
        records.append(
            ImageRecord(
                image_id=int(img["id"]),
                file_name=str(file_name_of(img, images_dir)),
                height=int(img["height"]),
                width=int(img["width"]),
                instances=instances,
                neg_category_ids=list(img.get("neg_category_ids", [])),
                not_exhaustive_category_ids=list(img.get("not_exhaustive_category_ids", [])),
            )
        )
    return records


def validated(
    annotations: str | Path,
    images_dir: str | Path,
    file_name_of: Callable[[dict, Path], Path],
    on_bad_record: str,
    check_files: CheckFiles,
) -> tuple[dict, CheckReport]:
    """Load + check + enforce the policy; returns the cleaned dict and the report of what was skipped."""
    data = load_json(annotations)
    report = check_annotations(data, str(annotations))
    check_files_of(data, Path(images_dir), file_name_of, check_files, report)
    report.enforce(on_bad_record)
    return apply_skips(data, report), report


def take_first(data: dict, max_images: int | None) -> dict:
    """Keep the ``max_images`` images with the smallest ids (and their annotations)."""
    if max_images is None or len(data["images"]) <= max_images:
        return data
    keep = sorted(img["id"] for img in data["images"])[:max_images]
    keep_set = set(keep)
    return {
        **data,
        "images": [img for img in data["images"] if img["id"] in keep_set],
        "annotations": [a for a in data["annotations"] if a["image_id"] in keep_set],
    }


def read_coco(
    annotations: str | Path,
    images_dir: str | Path,
    on_bad_record: str = "error",
    check_files: CheckFiles = "exists",
    max_images: int | None = None,
) -> LoadedDataset:
    """Read a COCO instances JSON.

    Args:
        annotations: the JSON file.
        images_dir: folder that ``images[].file_name`` is relative to.
        on_bad_record: ``error`` (raise ``DatasetError`` listing every problem) or ``skip`` (drop and count).
        check_files: file checks: ``none``, ``exists``, ``header`` (size/EXIF from the header) or ``decode``.
        max_images: keep only the first N images by id (after validation).
    """
    images_dir = Path(images_dir)
    data, report = validated(annotations, images_dir, coco_file_name, on_bad_record, check_files)
    data = take_first(data, max_images)
    api = coco_api(data)
    records = build_records(api, data, images_dir, coco_file_name, api.annToRLE)
    return LoadedDataset(records, build_meta(data, "coco", str(annotations), records), report, data)
