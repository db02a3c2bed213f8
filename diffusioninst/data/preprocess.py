"""COCO/LVIS folder -> validated Parquet shards + manifest, with the work sharded by Ray Data.

Two Ray Data passes, so that under ``on_bad_record=error`` nothing is written when anything is wrong:

1. **inspect** (one row per image): read and fully decode every image, check its upright size against
   the JSON, note whether its bytes must be re-encoded (not an upright RGB JPEG/PNG). The driver merges
   these issues with the JSON-level ones (:mod:`diffusioninst.data.validation`); ``error`` stops here with
   one message listing every problem, ``skip`` drops the bad records and counts them by reason.
2. **encode** (one task per shard): build the rows (original image bytes, or a re-encoded upright RGB
   JPEG; boxes; RLE of every mask; polygons), write ``part-NNNNN.parquet`` into ``<output>/.staging`` and a
   ``part-NNNNN.done.json`` completion marker carrying the shard's fingerprint.

Finally the driver moves the shards into ``<output>``, removes shards of older runs that are not part of
this one, writes the cleaned GT JSON (``annotations.json``, what the evaluator reads) and, last and
atomically, ``manifest.json``. Re-running with the same inputs and settings finds the manifest and stops;
an interrupted run resumes (finished shards are reused through their markers); shard names are
deterministic, so nothing is ever duplicated.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from diffusioninst.data.coco import build_meta, build_records, coco_file_name
from diffusioninst.data.image_io import decode_with_info, encode_jpeg
from diffusioninst.data.parquet import GT_JSON, MANIFEST, SCHEMA_VERSION, record_to_row, rows_to_table
from diffusioninst.data.records import ImageRecord
from diffusioninst.data.validation import (
    CheckReport,
    Issue,
    apply_skips,
    check_annotations,
    check_image_file,
    format_issues,
    image_where,
    load_json,
)

STAGING = ".staging"
REENCODE_QUALITY = 95


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def local_runtime_env() -> dict[str, Any]:
    """Runtime env for a Ray started by this process: workers import this same diffusioninst checkout."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": {"PYTHONPATH": path}}


def _items_dataset(items: list[dict], num_blocks: int):
    """``ray.data.from_items`` for a single-operator pass. Ray Data's per-operator resource reservation
    (``op_resource_reservation_enabled``) keeps a lone map operator to about half the CPUs of a small
    node (measured 1.4x instead of 2x on 2 CPUs); these passes have one operator, so it is turned off for
    this dataset's context only (derived datasets copy it; the global DataContext is untouched)."""
    import ray

    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), num_blocks)))
    ds.context.op_resource_reservation_enabled = False
    return ds


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def shard_fingerprint(run_fingerprint: str, image_ids: list[int]) -> str:
    """Identity of one shard: the run's fingerprint (inputs + settings, ``manifest["fingerprint"]``) and the
    ids of its images. A staged shard whose marker carries it is reused by a resumed run."""
    return _fingerprint(run_fingerprint, list(image_ids))


# ----------------------------------------------------------------------------------------------
# Ray Data task bodies (module-level so they pickle by reference)


def inspect_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Pass 1: decode-check each image. In: image_id, path, height, width, where. Out: image_id, issues (JSON),
    reencode, sha256 of the file."""
    ids, issues, reencode, digests = [], [], [], []
    for iid, path, h, w, where in zip(
        batch["image_id"], batch["path"], batch["height"], batch["width"], batch["where"]
    ):
        found, info, data = check_image_file(str(path), int(iid), int(h), int(w), str(where))
        ids.append(int(iid))
        issues.append(json.dumps([[i.reason, i.where, i.message] for i in found]))
        reencode.append(bool(info is not None and info.needs_reencode))
        digests.append(hashlib.sha256(data).hexdigest() if data is not None else "")
    return {
        "image_id": np.array(ids, np.int64),
        "issues": np.array(issues, object),
        "reencode": np.array(reencode),
        "sha256": np.array(digests, object),
    }


def encode_records(records: list[ImageRecord], reencode: set[int], quality: int = REENCODE_QUALITY):
    """Rows (as a pyarrow Table with the explicit schema) of ``records``, reading each image file once."""
    rows = []
    for rec in records:
        data = Path(rec.file_name).read_bytes()
        if rec.image_id in reencode:
            image, _ = decode_with_info(data, rec.file_name)
            rows.append(record_to_row(rec, encode_jpeg(image, quality), "JPEG", True))
        else:
            fmt = "PNG" if data[:8] == b"\x89PNG\r\n\x1a\n" else "JPEG"
            rows.append(record_to_row(rec, data, fmt, False))
    return rows_to_table(rows)


def write_shard_batch(batch: dict[str, np.ndarray], staging: str) -> dict[str, np.ndarray]:
    """Pass 2: one row per shard; writes ``part-NNNNN.parquet`` and its ``.done.json`` marker into ``staging``."""
    out_rows, out_inst = [], []
    for shard, payload, fp in zip(batch["shard"], batch["payload"], batch["fingerprint"]):
        records, reencode = pickle.loads(payload)
        table = encode_records(records, set(reencode))
        name = f"part-{int(shard):05d}.parquet"
        tmp = Path(staging) / (name + ".tmp")
        pq.write_table(table, tmp, row_group_size=64)
        os.replace(tmp, Path(staging) / name)
        n_inst = sum(len(r.instances) for r in records)
        marker = {"file": name, "rows": table.num_rows, "instances": n_inst, "fingerprint": str(fp)}
        (Path(staging) / f"part-{int(shard):05d}.done.json").write_text(json.dumps(marker))
        out_rows.append(table.num_rows)
        out_inst.append(n_inst)
    return {"shard": np.asarray(batch["shard"]), "rows": np.array(out_rows), "instances": np.array(out_inst)}


# ----------------------------------------------------------------------------------------------
# driver


def _file_name_fn(fmt: str) -> Callable[[dict, Path], Path]:
    if fmt == "lvis":
        from diffusioninst.data.lvis import lvis_file_name

        return lvis_file_name
    return coco_file_name


def _api(fmt: str, data: dict):
    if fmt == "lvis":
        from diffusioninst.data.lvis_compat import lvis_api

        api = lvis_api(data)
        return api, api.ann_to_rle
    from diffusioninst.data.coco import coco_api

    api = coco_api(data)
    return api, api.annToRLE


def _inspect(data: dict, images: Path, fmt: str, report: CheckReport, num_blocks: int) -> tuple[set[int], dict]:
    """Pass 1 over the images the JSON checks kept; adds issues to ``report``; returns the ids to re-encode
    and each image's sha256."""

    file_name = _file_name_fn(fmt)
    bad = report.bad_images
    items = [
        {
            "image_id": img["id"],
            "path": str(file_name(img, images)),
            "height": img["height"],
            "width": img["width"],
            "where": image_where(img),
        }
        for img in data["images"]
        if isinstance(img, dict) and img.get("id") not in bad and "height" in img and "width" in img
    ]
    if not items:
        return set(), {}
    rows = _items_dataset(items, num_blocks).map_batches(inspect_batch, batch_size=None).take_all()
    reencode, digests = set(), {}
    for row in rows:
        digests[int(row["image_id"])] = str(row["sha256"])
        for reason, where, message in json.loads(row["issues"]):
            report.issues.append(Issue(reason, where, message, int(row["image_id"])))
        if row["reencode"]:
            reencode.add(int(row["image_id"]))
    return reencode, digests


def preprocess(
    fmt: str,
    images: str | Path,
    annotations: str | Path,
    output: str | Path,
    on_bad_record: str = "error",
    num_workers: int | None = None,
    shard_size: int = 1000,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Validate and convert a COCO/LVIS split into Parquet shards. Ray must be initialised (or is started
    locally with ``num_workers`` CPUs). Returns the manifest.

    Raises:
        DatasetError: under ``on_bad_record="error"``, listing every problem; nothing is written.
    """
    import ray

    if fmt not in ("coco", "lvis"):
        raise ValueError(f"format must be coco or lvis, got {fmt!r}")
    images, annotations, output = Path(images).resolve(), Path(annotations).resolve(), Path(output).resolve()
    source_sha = sha256_file(annotations)
    settings = {"format": fmt, "images": str(images), "on_bad_record": on_bad_record, "shard_size": shard_size}
    run_fp = _fingerprint(SCHEMA_VERSION, source_sha, settings, REENCODE_QUALITY)
    manifest_path = output / MANIFEST
    if not force and manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if old.get("fingerprint") == run_fp and all((output / s["file"]).is_file() for s in old["shards"]):
            log(f"{output}: already up to date ({old['counts']['images']} images); nothing to do")
            return old
    if not ray.is_initialized():
        ray.init(
            num_cpus=num_workers, include_dashboard=False, logging_level="WARNING", runtime_env=local_runtime_env()
        )
    workers = max(1, int(num_workers or ray.cluster_resources().get("CPU", 1)))

    data = load_json(annotations)
    report = CheckReport(str(annotations))
    report.extend(check_annotations(data, str(annotations)).issues)
    reencode, digests = _inspect(data, images, fmt, report, 4 * workers)
    report.enforce(on_bad_record)  # under "error": one DatasetError listing everything, before any write
    clean = apply_skips(data, report)
    if report.issues:
        log(format_issues(f"{annotations} (skipped)", report.issues, limit=20))
    api, ann_to_rle = _api(fmt, clean)
    records = build_records(api, clean, images, _file_name_fn(fmt), ann_to_rle)
    meta = build_meta(clean, fmt, None, records)

    staging = output / STAGING
    staging.mkdir(parents=True, exist_ok=True)
    chunks = [records[i : i + shard_size] for i in range(0, len(records), shard_size)] or [[]]
    tasks, shards = [], []
    for k, chunk in enumerate(chunks):
        fp = shard_fingerprint(run_fp, [r.image_id for r in chunk])
        marker = staging / f"part-{k:05d}.done.json"
        done = json.loads(marker.read_text()) if marker.is_file() else None
        if done is None or done.get("fingerprint") != fp or not (staging / done["file"]).is_file():
            payload = pickle.dumps((chunk, sorted(r.image_id for r in chunk if r.image_id in reencode)))
            tasks.append({"shard": k, "payload": payload, "fingerprint": fp})
        shards.append(k)
    if len(tasks) < len(chunks):
        log(f"resuming: {len(chunks) - len(tasks)} of {len(chunks)} shard(s) already written")
    if tasks:
        # at most 4 tasks per CPU, each writing its shards in turn: with one task per small shard Ray's per-task
        # cost outweighed the work (25-image shards, 2 CPUs: write pass 0.31 -> 0.20 s; docs/data.md)
        ds = _items_dataset(tasks, 4 * workers)
        ds.map_batches(write_shard_batch, batch_size=1, fn_kwargs={"staging": str(staging)}).materialize()

    manifest_path.unlink(missing_ok=True)  # from here until the new manifest exists the folder is "not ready"
    shard_info = []
    for k in shards:
        marker = json.loads((staging / f"part-{k:05d}.done.json").read_text())
        os.replace(staging / marker["file"], output / marker["file"])
        shard_info.append({"file": marker["file"], "rows": marker["rows"], "instances": marker["instances"]})
    keep = {s["file"] for s in shard_info}
    for stale in output.glob("part-*.parquet"):
        if stale.name not in keep:
            stale.unlink()
    gt_tmp = output / (GT_JSON + ".tmp")
    gt_tmp.write_text(json.dumps(clean))
    os.replace(gt_tmp, output / GT_JSON)
    counts = report.counts()
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "fingerprint": run_fp,
        "kind": fmt,
        "source": {
            "annotations": str(annotations),
            "annotations_sha256": source_sha,
            "images": str(images),
            "images_sha256": hashlib.sha256(
                "".join(f"{r.image_id}:{digests.get(r.image_id, '')};" for r in records).encode()
            ).hexdigest(),
        },
        "settings": settings,
        "counts": {
            "images": len(records),
            "instances": sum(len(r.instances) for r in records),
            "crowd_instances": sum(i.iscrowd for r in records for i in r.instances),
            "classes": meta.num_classes,
            "reencoded_images": len(reencode & {r.image_id for r in records}),
        },
        "skipped": counts,
        "categories": [
            {"id": cid, "name": name, "label": k, "image_count": n, "frequency": f}
            for k, (cid, name, n, f) in enumerate(
                zip(meta.category_ids, meta.class_names, meta.image_count, meta.frequency)
            )
        ],
        "shards": shard_info,
    }
    tmp = output / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, manifest_path)
    shutil.rmtree(staging, ignore_errors=True)
    log(
        f"{output}: {manifest['counts']['images']} images, {manifest['counts']['instances']} instances in "
        f"{len(shard_info)} shard(s); skipped: {counts or 'none'}"
    )
    return manifest
