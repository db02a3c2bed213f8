"""COCO/LVIS folder -> validated Parquet shards + manifest, with the work sharded by Ray Data.

The driver parses the JSON and runs the checks that need the whole file (entries, duplicate ids,
annotations of unknown images; :mod:`diffusioninst.data.validation`), splits the images it kept, sorted by
id, into shards of ``shard_size`` and runs **one** Ray Data pass with one row per shard. Each shard's task
checks each of its annotations (category, bbox, segmentation), reads every image of its shard once, decodes
all of it (a JPEG at 1/8 scale: :func:`~diffusioninst.data.image_io.inspect_image`), checks its upright size
against the JSON and hashes it; then builds the rows of the images that passed (original bytes, or a
re-encoded upright RGB JPEG when the file is not an upright RGB JPEG/PNG; boxes; RLE of every mask; polygons)
and writes ``part-NNNNN.parquet`` into ``<output>/.staging`` with a ``part-NNNNN.done.json`` marker carrying
the shard's fingerprint and what the driver needs from it (per-image and per-annotation issues, sha256,
counts). The driver's own part is what cannot be split by image; it bounds how far the pass scales
(``docs/data.md``, "Scaling across nodes").

Under ``on_bad_record=error`` nothing reaches ``<output>`` when anything is wrong: a task writes nothing
for a shard with a bad image or annotation (no task writes anything when the whole-file checks already
failed), the driver lists every problem in one :class:`DatasetError` and removes what this run staged.
Under ``skip`` a shard holds the images and annotations of its part that passed, and every skip is counted
by reason.

Finally the driver moves the shards into ``<output>``, removes shards of older runs that are not part of
this one, writes the cleaned GT JSON (``annotations.json``, what the evaluator reads) and, last and
atomically, ``manifest.json``. Re-running with the same inputs and settings finds the manifest and stops;
an interrupted run resumes (finished shards are reused through their markers); shard names are
deterministic, so nothing is ever duplicated.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pyarrow.parquet as pq

from diffusioninst.data.coco import annotations_by_image, build_meta, build_records, coco_file_name
from diffusioninst.data.image_io import decode_with_info, encode_jpeg
from diffusioninst.data.parquet import GT_JSON, MANIFEST, SCHEMA_VERSION, record_to_row, rows_to_table
from diffusioninst.data.records import DatasetMeta, ImageRecord
from diffusioninst.data.validation import (
    CheckReport,
    DatasetError,
    Issue,
    annotation_issue,
    annotation_where,
    annotations_text,
    apply_skips,
    check_annotations,
    check_image_file,
    collector_skips_alive_objects,
    cyclic_gc_paused,
    decode_annotations,
    encode_json,
    format_issues,
    holds_refs,
    image_where,
    read_json,
)
from diffusioninst.engine.host import keep_freed_memory

STAGING = ".staging"
REENCODE_QUALITY = 95
# what a shard task checks and reports (2: the per-annotation checks moved from the driver into the tasks);
# part of the run's fingerprint, so shards staged by another version are redone, not reused
PASS_VERSION = 2


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
# the Ray Data task body (module-level so it pickles by reference)


def encode_records(
    records: list[ImageRecord],
    reencode: set[int],
    quality: int = REENCODE_QUALITY,
    blobs: Mapping[int, bytes] | None = None,
):
    """Rows (as a pyarrow Table with the explicit schema) of ``records``. Each image's bytes come from
    ``blobs[image_id]`` when given, else from its file."""
    rows = []
    for rec in records:
        data = blobs[rec.image_id] if blobs and rec.image_id in blobs else Path(rec.file_name).read_bytes()
        if rec.image_id in reencode:
            image, _ = decode_with_info(data, rec.file_name)
            rows.append(record_to_row(rec, encode_jpeg(image, quality), "JPEG", True))
        else:
            fmt = "PNG" if data[:8] == b"\x89PNG\r\n\x1a\n" else "JPEG"
            rows.append(record_to_row(rec, data, fmt, False))
    return rows_to_table(rows)


def _api(fmt: str, data: dict):
    if fmt == "lvis":
        from diffusioninst.data.lvis_compat import lvis_api

        api = lvis_api(data)
        return api, api.ann_to_rle
    from diffusioninst.data.coco import coco_api

    api = coco_api(data)
    return api, api.annToRLE


def process_shard(
    shard: int, fingerprint: str, part: dict, fmt: str, images: str, staging: str | None, write_if_bad: bool
) -> dict[str, Any]:
    """Check, encode and write one shard: every image file (decoded whole) and every annotation
    (:func:`~diffusioninst.data.validation.annotation_issue`; the driver did the whole-file checks).

    Args:
        part: ``images`` (``images[]`` entries, sorted by id), ``annotations`` (theirs that passed the
            whole-file checks, JSON order; or ``annotations_json``, the same as a JSON list in the source
            file's text, which this task decodes) and ``category_ids`` (all of them: labels are contiguous over
            the whole dataset).
        images: the images folder; each image's file is found here as the format says (an LVIS image from
            its ``coco_url``, looking at the folder), in the task rather than one by one on the driver.
        staging: folder to write ``part-NNNNN.parquet`` and its ``.done.json`` marker into; None checks only.
        write_if_bad: write the images and annotations that passed even when some did not (``skip``); else a
            shard with a bad image or annotation is not written.

    Returns:
        the marker: ``file``, ``fingerprint``, ``written``, ``images`` (per image ``[id, sha256, issues]``, an
        issue being ``[reason, where, message]``), ``annotations`` (per bad annotation ``[reason, where,
        message, image_id, ann_id]``), and when written ``rows``, ``instances``, ``crowd``, ``reencoded`` and
        ``label_images`` (images per contiguous label, keys as strings).
    """
    name = _shard_name(shard)
    file_name, folder = _file_name_fn(fmt), Path(images)
    per_image, good, blobs, reencode = [], [], {}, set()
    for img in part["images"]:
        path = file_name(img, folder)
        found, info, data = check_image_file(path, img["id"], img["height"], img["width"], image_where(img))
        per_image.append([img["id"], hashlib.sha256(data).hexdigest() if data is not None else "",
                          [[i.reason, i.where, i.message] for i in found]])  # fmt: skip
        if not found:
            good.append(img)
            blobs[img["id"]] = data
            if info.needs_reencode:
                reencode.add(img["id"])
    sizes = {img["id"]: (img["height"], img["width"]) for img in part["images"]}
    categories, annotations, per_annotation = set(part["category_ids"]), [], []
    given = part["annotations"] if "annotations" in part else decode_annotations(part["annotations_json"])
    for ann in given:
        bad = annotation_issue(ann, *sizes[ann["image_id"]], categories)
        if bad is None:
            annotations.append(ann)
        else:
            per_annotation.append([bad[0], annotation_where(ann), bad[1], ann["image_id"], ann["id"]])
    marker: dict[str, Any] = {
        "file": name,
        "fingerprint": fingerprint,
        "images": per_image,
        "annotations": per_annotation,
        "written": False,
    }
    bad_part = len(good) < len(part["images"]) or per_annotation
    if staging is None or (bad_part and not write_if_bad):
        return marker
    kept = {img["id"] for img in good}
    data = {
        "images": good,
        "annotations": [a for a in annotations if a["image_id"] in kept],
        "categories": [{"id": c} for c in part["category_ids"]],
    }
    api, ann_to_rle = _api(fmt, data)
    records = build_records(api, data, folder, file_name, ann_to_rle)
    table = encode_records(records, reencode, blobs=blobs)
    tmp = Path(staging) / (name + ".tmp")
    pq.write_table(table, tmp, row_group_size=64)
    os.replace(tmp, Path(staging) / name)
    labels = Counter(lab for r in records for lab in {i.label for i in r.instances})
    marker.update(
        written=True,
        rows=table.num_rows,
        instances=sum(len(r.instances) for r in records),
        crowd=sum(i.iscrowd for r in records for i in r.instances),
        reencoded=len(reencode),
        label_images={str(k): n for k, n in sorted(labels.items())},
    )
    tmp = Path(staging) / (_marker_name(shard) + ".tmp")
    tmp.write_text(json.dumps(marker))
    os.replace(tmp, Path(staging) / _marker_name(shard))  # the marker is whole or absent, even if killed meanwhile
    return marker


def pack_part(part: dict) -> bytes:
    """A shard's input (JSON data) as bytes for its task: msgpack, which encodes it twice as fast as pickle (0.33
    against 0.64 s for COCO train's 118 shards) and gives back equal objects, or pickle for a part holding an
    integer msgpack cannot hold (beyond 64 bits). The first byte says which."""
    try:
        return b"M" + msgspec.msgpack.encode(part)
    except OverflowError:
        return b"P" + pickle.dumps(part)


def unpack_part(blob: bytes) -> dict:
    """Inverse of :func:`pack_part`."""
    body = memoryview(blob)[1:]
    return msgspec.msgpack.decode(body) if blob[:1] == b"M" else pickle.loads(body)


def process_shard_batch(batch: dict[str, np.ndarray], keep_freed: bool, **kwargs: Any) -> dict[str, np.ndarray]:
    """The pass: one row per shard (``shard``, ``fingerprint``, ``part`` = :func:`pack_part` of the ``part`` of
    :func:`process_shard`) -> ``shard``, ``marker`` (JSON). ``keep_freed``: the worker process keeps freed
    memory for reuse (:func:`diffusioninst.engine.host.keep_freed_memory`)."""
    if keep_freed:
        keep_freed_memory()
    markers = [
        json.dumps(process_shard(int(k), str(fp), unpack_part(p), **kwargs))
        for k, fp, p in zip(batch["shard"], batch["fingerprint"], batch["part"])
    ]
    return {"shard": np.asarray(batch["shard"]), "marker": np.array(markers, object)}


# ----------------------------------------------------------------------------------------------
# driver


def _file_name_fn(fmt: str) -> Callable[[dict, Path], Path]:
    if fmt == "lvis":
        from diffusioninst.data.lvis import lvis_file_name

        return lvis_file_name
    return coco_file_name


def _parts(data: dict, shard_size: int) -> list[dict]:
    """The shards' inputs: ``data``'s images sorted by id, ``shard_size`` per shard, with their annotations
    (as ``annotations_json``, their source text, when ``data`` holds them as
    :class:`~diffusioninst.data.validation.AnnotationRef` s)."""
    imgs = sorted(data["images"], key=lambda i: i["id"])
    anns_of = annotations_by_image(data["annotations"])
    as_text = holds_refs(data["annotations"])
    category_ids = sorted(c["id"] for c in data["categories"])
    parts = []
    for k in range(0, max(len(imgs), 1), shard_size):
        chunk = imgs[k : k + shard_size]
        anns = [a for img in chunk for a in anns_of.get(img["id"], [])]
        key, value = ("annotations_json", annotations_text(anns)) if as_text else ("annotations", anns)
        parts.append({"images": chunk, key: value, "category_ids": category_ids})
    return parts


def _shard_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


def _marker_name(shard: int) -> str:
    return f"part-{shard:05d}.done.json"


def _read_marker(path: Path) -> dict:
    """A staged marker, or ``{}`` (not reusable) when it cannot be read as a JSON object: markers are written
    whole (``os.replace``), but one from an older version or a damaged disk may not be."""
    try:
        done = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return done if isinstance(done, dict) else {}


def _staged(parts: list[dict], run_fp: str, staging: Path | None) -> tuple[dict[int, dict], list[dict]]:
    """Split the shards into those an interrupted earlier run of the same inputs and settings already wrote to
    ``staging`` (their markers, by shard) and the tasks still to do. ``staging`` None: nothing is reused. A
    marker that is not reused (other inputs or settings, or its shard file is gone) is removed: every marker of a
    task's shard found during the pass is then this run's (:class:`_MarkerProgress`)."""
    markers, tasks = {}, []
    for k, part in enumerate(parts):
        fp = shard_fingerprint(run_fp, [img["id"] for img in part["images"]])
        path = None if staging is None else staging / _marker_name(k)
        done = _read_marker(path) if path is not None and path.is_file() else None
        if done and done.get("fingerprint") == fp and done.get("written") and (staging / done["file"]).is_file():
            markers[k] = done
        else:
            if done is not None:
                path.unlink()
            tasks.append({"shard": k, "fingerprint": fp, "part": part})
    return markers, tasks


class _MarkerProgress:
    """Progress of a Ray pass, on the driver: every ``period`` seconds, counts the markers its shards' tasks have
    written to ``staging`` (a shard's marker is its last file) and logs ``"n/N shard(s) done"`` each time another
    tenth of them is done, as the local engine does; :meth:`finish` logs the last line. The tasks write to the
    output's own folder, so this works wherever they run. Used as a context manager (a daemon thread)."""

    def __init__(self, staging: Path, shards: list[int], log: Callable[[str], None], period: float = 2.0):
        self.staging, self.names, self.log, self.period = staging, {_marker_name(k) for k in shards}, log, period
        self.step, self.logged = max(1, len(shards) // 10), 0
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.thread = threading.Thread(target=self._watch, name="preprocess-progress", daemon=True)

    def _report(self, done: int) -> None:
        with self.lock:
            if done // self.step > self.logged // self.step or (done == len(self.names) > self.logged):
                self.logged = done
                self.log(f"{done}/{len(self.names)} shard(s) done")

    def _watch(self) -> None:
        while not self.stop.wait(self.period):
            try:
                done = sum(1 for e in os.scandir(self.staging) if e.name in self.names)
            except OSError:  # the folder is briefly unreadable (a network file system): try again later
                continue
            self._report(done)

    def finish(self) -> None:
        """All shards are done: log the last line, if the watcher has not."""
        self._report(len(self.names))

    def __enter__(self) -> _MarkerProgress:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def _unstage(staging: Path, shards: list[int]) -> None:
    """Remove these shards (and their markers, and what a killed run left half-written of either) from
    ``staging``, and ``staging`` once it is empty."""
    for k in shards:
        for name in (_shard_name(k), _marker_name(k)):
            (staging / name).unlink(missing_ok=True)
            (staging / (name + ".tmp")).unlink(missing_ok=True)
    if staging.is_dir() and not any(staging.iterdir()):
        staging.rmdir()


def _run_ray(
    tasks: list[dict], kwargs: dict, keep_freed: bool, num_workers: int | None, log: Callable[[str], None] = print
) -> dict[int, dict]:
    """The shards' Ray Data pass: one row per shard, at most 2 tasks per CPU, each doing its shards in turn and
    returning all their markers as one block. Ray's cost per task is about 10 ms here, and per block a task
    yields another 1-12 ms (600 images in 25-image shards, 2 CPUs: 0.78 s with 2 or 4 tasks, 0.83 s with 8;
    1 CPU: 1.25-1.29 s with one block per task, 1.50-1.57 s with one per shard). Progress per shard is logged
    from the markers the tasks write (:class:`_MarkerProgress`; a pass that only checks writes none, and logs
    its end)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=num_workers, include_dashboard=False, logging_level="WARNING", runtime_env=local_runtime_env()
        )
    workers = max(1, int(num_workers or ray.cluster_resources().get("CPU", 1)))
    items = [{**task, "part": pack_part(task["part"])} for task in tasks]
    ds = _items_dataset(items, 2 * workers).map_batches(
        process_shard_batch, batch_size=None, fn_kwargs={**kwargs, "keep_freed": keep_freed}
    )
    staging = kwargs["staging"]
    shards = [task["shard"] for task in tasks]
    progress = _MarkerProgress(Path(staging), shards, log) if staging else None
    with progress or contextlib.nullcontext():
        markers = {int(row["shard"]): json.loads(row["marker"]) for row in ds.take_all()}
    if progress is not None:
        progress.finish()
    else:
        log(f"{len(shards)}/{len(shards)} shard(s) done")
    return markers


def _run_local(tasks: list[dict], kwargs: dict, keep_freed: bool, log: Callable[[str], None]) -> dict[int, dict]:
    """The shards one after the other in this process; progress at every tenth of them."""
    if keep_freed:
        keep_freed_memory()
    markers, step = {}, max(1, len(tasks) // 10)
    for n, task in enumerate(tasks, 1):
        markers[task["shard"]] = process_shard(task["shard"], task["fingerprint"], task["part"], **kwargs)
        if n % step == 0 or n == len(tasks):
            log(f"{n}/{len(tasks)} shard(s) done")
    return markers


def _publish(
    output: Path,
    markers: dict[int, dict],
    clean: dict,
    gt_source: Path | None,
    meta: DatasetMeta,
    skipped: dict[str, int],
    header: dict,
    standard: bool,
) -> dict[str, Any]:
    """Move the staged shards into ``output``, delete older shards not in this run, write the GT JSON (a copy of
    ``gt_source`` when given: the source file, when nothing was skipped; else ``clean``, encoded as
    :func:`~diffusioninst.data.validation.encode_json` does for ``standard``) and, last (the commit point), the
    manifest: ``header`` plus the images' checksum, counts, categories and shards."""
    staging, manifest_path = output / STAGING, output / MANIFEST
    manifest_path.unlink(missing_ok=True)  # from here until the new manifest exists the folder is "not ready"
    shard_info = []
    for m in markers.values():
        (output / m["file"]).unlink(missing_ok=True)  # renaming onto an existing file costs ext4 ~1 ms
        os.replace(staging / m["file"], output / m["file"])
        shard_info.append({"file": m["file"], "rows": m["rows"], "instances": m["instances"]})
    keep = {s["file"] for s in shard_info}
    for stale in output.glob("part-*.parquet"):
        if stale.name not in keep:
            stale.unlink()
    gt_tmp = output / (GT_JSON + ".tmp")
    if gt_source is not None:
        shutil.copyfile(gt_source, gt_tmp)
    else:
        gt_tmp.write_bytes(encode_json(clean, standard))
    os.replace(gt_tmp, output / GT_JSON)
    digests = sorted((iid, sha) for m in markers.values() for iid, sha, found in m["images"] if not found)
    manifest = {
        **header,
        "source": {
            **header["source"],
            "images_sha256": hashlib.sha256("".join(f"{i}:{sha};" for i, sha in digests).encode()).hexdigest(),
        },
        "counts": {
            "images": sum(m["rows"] for m in markers.values()),
            "instances": sum(m["instances"] for m in markers.values()),
            "crowd_instances": sum(m["crowd"] for m in markers.values()),
            "classes": meta.num_classes,
            "reencoded_images": sum(m["reencoded"] for m in markers.values()),
        },
        "skipped": skipped,
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
    return manifest


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
    engine: str = "ray",
    keep_freed: bool = True,
) -> dict[str, Any]:
    """Validate and convert a COCO/LVIS split into Parquet shards. Returns the manifest.

    Args:
        engine: ``ray``: the shards are processed by a Ray Data pass (Ray must be initialised, or is started
            locally with ``num_workers`` CPUs). ``local``: one after the other in this process, no Ray; same
            output, byte for byte.
        keep_freed: the processes doing the work (Ray workers; this one under ``local``) keep freed memory for
            reuse instead of returning it to the OS (:mod:`diffusioninst.engine.host`): each image's decode
            buffer is otherwise fresh, page-faulted memory (5-10% of the Ray workers' CPU here).

    Raises:
        DatasetError: under ``on_bad_record="error"``, listing every problem; nothing is written.
    """
    if fmt not in ("coco", "lvis"):
        raise ValueError(f"format must be coco or lvis, got {fmt!r}")
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record must be error or skip, got {on_bad_record!r}")
    if engine not in ("ray", "local"):
        raise ValueError(f"engine must be ray or local, got {engine!r}")
    images, annotations, output = Path(images).resolve(), Path(annotations).resolve(), Path(output).resolve()
    source_sha = sha256_file(annotations)
    settings = {"format": fmt, "images": str(images), "on_bad_record": on_bad_record, "shard_size": shard_size}
    run_fp = _fingerprint(SCHEMA_VERSION, source_sha, settings, REENCODE_QUALITY, PASS_VERSION)
    manifest_path = output / MANIFEST
    if not force and manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if old.get("fingerprint") == run_fp and all((output / s["file"]).is_file() for s in old["shards"]):
            log(f"{output}: already up to date ({old['counts']['images']} images); nothing to do")
            return old

    staging = output / STAGING
    with contextlib.ExitStack() as frozen:
        # under "error", once the whole-file checks found a problem the run fails: the pass only checks
        with cyclic_gc_paused():  # the driver's bulk work creates many objects and no cycles
            # the annotations' ids only: each one's text goes to its shard's task, which decodes it
            data, standard = read_json(annotations, lazy_annotations=True)
            # the whole-file checks; each annotation's own checks run in its shard's task
            report = check_annotations(data, str(annotations), per_annotation=False)
            write = on_bad_record == "skip" or not report.issues
            # the images and annotations these checks keep (a throwaway report: the skips are counted below)
            parts = _parts(apply_skips(data, CheckReport(report.source, list(report.issues))), shard_size)
            markers, tasks = _staged(parts, run_fp, staging if write else None)
            # the parsed file lives until the manifest is written: the collections the rest triggers skip it
            frozen.enter_context(collector_skips_alive_objects())
        if markers:
            log(f"resuming: {len(markers)} of {len(parts)} shard(s) already written")
        if tasks:
            if write:
                staging.mkdir(parents=True, exist_ok=True)
            kwargs = {
                "fmt": fmt,
                "images": str(images),
                "staging": str(staging) if write else None,
                "write_if_bad": on_bad_record == "skip",
            }
            if engine == "local":
                markers.update(_run_local(tasks, kwargs, keep_freed, log))
            else:
                markers.update(_run_ray(tasks, kwargs, keep_freed, num_workers, log))

        with cyclic_gc_paused():
            markers = dict(sorted(markers.items()))
            for m in markers.values():  # the annotations' issues (by image id, then file order), then the images'
                report.issues.extend(Issue(*issue) for issue in m["annotations"])
            for m in markers.values():
                for iid, _, found in m["images"]:
                    report.issues.extend(Issue(reason, where, message, iid) for reason, where, message in found)
            try:
                report.enforce(on_bad_record)  # under "error": one DatasetError listing everything
            except DatasetError:
                if write:  # remove what this run staged; shards an interrupted earlier run staged stay for a resume
                    _unstage(staging, [t["shard"] for t in tasks])
                raise
            clean = apply_skips(data, report)
            if report.issues:
                log(format_issues(f"{annotations} (skipped)", report.issues, limit=20))
            label_images = np.zeros(len(clean["categories"]), np.int64)
            for m in markers.values():
                for lab, n in m["label_images"].items():
                    label_images[int(lab)] += n
            meta = build_meta(clean, fmt, None, [], label_images=label_images)
            header = {
                "schema_version": SCHEMA_VERSION,
                "fingerprint": run_fp,
                "kind": fmt,
                "source": {"annotations": str(annotations), "annotations_sha256": source_sha, "images": str(images)},
                "settings": settings,
            }
            # nothing skipped: the cleaned GT is the source file itself, copied rather than re-serialised
            gt_source = None if report.issues else annotations
            manifest = _publish(output, markers, clean, gt_source, meta, report.counts(), header, standard)
    log(
        f"{output}: {manifest['counts']['images']} images, {manifest['counts']['instances']} instances in "
        f"{len(manifest['shards'])} shard(s); skipped: {report.counts() or 'none'}"
    )
    return manifest
