"""Config-driven entry points: dataset resolution, the local training loader and the evaluation dataset.

* :func:`ensure_dataset` -- for ``data.format: synthetic`` generate (cached) the data and fill in the paths.
* :func:`load_split` -- records + meta of a split for any format (synthetic/coco/lvis/parquet).
* :func:`build_train_loader` -- infinite, rank-sharded, seeded iterator of ``Batch`` (torch DataLoader with
  ``data.decode_workers`` worker processes).
* :func:`build_eval_dataset` -- test-time dataset plus what the evaluator needs.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler

from diffusioninst.config.schema import ExperimentConfig, SplitConfig
from diffusioninst.data.coco import CheckFiles, LoadedDataset, read_coco
from diffusioninst.data.dataset import EvalDataset, TrainDataset, collate, decode_all
from diffusioninst.data.records import DatasetMeta, ImageRecord
from diffusioninst.data.sampling import sample_stream
from diffusioninst.data.validation import CheckReport
from diffusioninst.structures import Batch


def ensure_dataset(cfg: ExperimentConfig) -> ExperimentConfig:
    """A copy of ``cfg`` whose data paths exist. For ``synthetic`` the dataset is generated (or found in the
    cache) under ``data.synthetic.root`` (made absolute, so Ray workers with another working directory
    find it) and ``data.train``/``data.val`` get its COCO paths; other formats are returned unchanged."""
    cfg = copy.deepcopy(cfg)
    if cfg.data.format != "synthetic":
        return cfg
    from diffusioninst.data.synthetic import generate

    cfg.data.synthetic.root = str(Path(cfg.data.synthetic.root).resolve())
    paths = generate(cfg.data.synthetic)
    for split in ("train", "val"):
        s: SplitConfig = getattr(cfg.data, split)
        s.images, s.annotations = paths.images(split), paths.annotations(split, "coco")
    return cfg


def _lvis_annotations_of(cfg: ExperimentConfig, split: str) -> str:
    from diffusioninst.data.synthetic import generate

    return generate(copy.deepcopy(cfg.data.synthetic), Path(cfg.data.synthetic.root).resolve()).annotations(
        split, "lvis"
    )


@dataclass
class SplitData:
    """Records of a split (original frame), their meta, what was skipped and, for Parquet, the image bytes."""

    records: list[ImageRecord]
    meta: DatasetMeta
    report: CheckReport
    blobs: list[bytes] | None = None
    loaded: LoadedDataset | None = None


def load_split(
    cfg: ExperimentConfig, split: str = "train", check_files: CheckFiles = "header", kind: str | None = None
) -> SplitData:
    """Read a split in any ``data.format``. ``kind="lvis"`` reads the LVIS JSON of a synthetic dataset."""
    cfg = ensure_dataset(cfg)
    s: SplitConfig = getattr(cfg.data, split)
    policy = cfg.data.on_bad_record
    if s.parquet is not None:
        from diffusioninst.data import parquet

        records, blobs = parquet.read_records(s.parquet, s.max_images)
        meta = parquet.meta_from_manifest(s.parquet)
        return SplitData(records, meta, CheckReport(s.parquet), blobs)
    if cfg.data.format == "lvis" or (cfg.data.format == "synthetic" and kind == "lvis"):
        from diffusioninst.data.lvis import read_lvis

        ann = s.annotations if cfg.data.format == "lvis" else _lvis_annotations_of(cfg, split)
        loaded = read_lvis(ann, s.images, policy, check_files, s.max_images)
    else:
        loaded = read_coco(s.annotations, s.images, policy, check_files, s.max_images)
    return SplitData(loaded.records, loaded.meta, loaded.report, None, loaded)


class _StreamSampler(Sampler):
    """Adapts :func:`sample_stream` (infinite ``(index, augmentation seed)`` pairs) to a DataLoader sampler."""

    def __init__(self, records, seed: int, rank: int, world_size: int, repeat_threshold: float):
        self.args = (records, seed, rank, world_size, repeat_threshold)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return sample_stream(*self.args)


def _worker_init(_: int) -> None:
    import cv2

    torch.set_num_threads(1)
    cv2.setNumThreads(1)


class TrainLoader:
    """Infinite iterable of :class:`Batch` for one rank (see :func:`build_train_loader`)."""

    def __init__(self, loader: DataLoader, dataset: TrainDataset, meta: DatasetMeta, report: CheckReport):
        self.loader, self.dataset, self.meta, self.report = loader, dataset, meta, report
        self.batch_size = loader.batch_size

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.loader)


def per_rank_batch_size(cfg: ExperimentConfig, world_size: int) -> int:
    """Images per forward on one rank: ``ims_per_batch / (world_size * grad_accum_steps)``."""
    return max(1, cfg.solver.ims_per_batch // (max(world_size, 1) * cfg.solver.grad_accum_steps))


def build_train_loader(
    cfg: ExperimentConfig, rank: int = 0, world_size: int = 1, seed: int | None = None
) -> TrainLoader:
    """Infinite training batches for ``rank`` of ``world_size``.

    Every rank draws the same seeded epoch permutations (or repeat-factor epochs when
    ``data.repeat_factor_threshold > 0``) and takes every ``world_size``-th sample; each sample's
    augmentation is seeded by ``(seed, epoch, image_id, occurrence)`` so batches do not depend on
    ``data.decode_workers``. Crowd instances are excluded from targets; empty images are kept unless
    ``data.filter_empty``. Decoded images are cached in memory when the split fits ``data.cache_images_mb``.
    """
    seed = cfg.solver.seed if seed is None else seed
    cache_mb = cfg.data.cache_images_mb
    data = load_split(cfg, "train", check_files="header")
    records, blobs = data.records, data.blobs
    if cfg.data.filter_empty:
        keep = [i for i, r in enumerate(records) if r.training_instances()]
        records = [records[i] for i in keep]
        blobs = [blobs[i] for i in keep] if blobs is not None else None
    cache = None
    if 0 < sum(r.height * r.width * 3 for r in records) <= cache_mb * 2**20:  # decoded once, validated on the way
        records, blobs, cache = decode_all(records, blobs, data.report, cfg.data.on_bad_record)
    dataset = TrainDataset(records, cfg.data.augmentation, seed, blobs, cache)
    workers = cfg.data.decode_workers
    loader = DataLoader(
        dataset,
        batch_size=per_rank_batch_size(cfg, world_size),
        sampler=_StreamSampler(records, seed, rank, world_size, cfg.data.repeat_factor_threshold),
        collate_fn=functools.partial(collate, size_divisibility=cfg.model.size_divisibility),
        num_workers=workers,
        prefetch_factor=max(1, cfg.data.prefetch_batches) if workers > 0 else None,
        persistent_workers=workers > 0,
        worker_init_fn=_worker_init if workers > 0 else None,
    )
    return TrainLoader(loader, dataset, data.meta, data.report)


def write_subset_gt(gt: dict, image_ids: list[int], path: Path) -> Path:
    """Write the GT restricted to ``image_ids`` (so skipped or unevaluated images do not count as misses)."""
    keep = set(image_ids)
    subset = dict(gt)
    subset["images"] = [img for img in gt["images"] if img["id"] in keep]
    subset["annotations"] = [a for a in gt["annotations"] if a["image_id"] in keep]
    path.parent.mkdir(parents=True, exist_ok=True)
    # every rank may write the same file at once: each through its own temporary file, renamed atomically
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:  # owns fd from here: closed even if what follows fails
            os.fchmod(f.fileno(), 0o644)  # mkstemp creates 0600; the GT file is as readable as any other output
            f.write(json.dumps(subset))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@dataclass
class EvalData:
    """What inference + evaluation need for one split.

    Attributes:
        dataset: items ``(image uint8 [3, h, w] test-resized, {"image_id", "orig_size"})``; batch them
            with :func:`diffusioninst.data.dataset.collate` (``targets`` is None).
        gt_json: GT file the evaluator reads (a cleaned copy when records were skipped or limited).
        kind: ``coco`` or ``lvis``.
        category_ids: contiguous label -> dataset category id.
        class_names: per contiguous label.
        image_ids: the evaluated image ids (restrict the evaluator to these).
        meta: the full :class:`DatasetMeta` (image counts, frequencies).
    """

    dataset: EvalDataset
    gt_json: str
    kind: str
    category_ids: list[int]
    class_names: list[str]
    image_ids: list[int]
    meta: DatasetMeta


def build_eval_dataset(cfg: ExperimentConfig, split: str = "val") -> EvalData:
    """Test-time dataset of ``split`` (``eval.max_images`` applies on top of ``data.<split>.max_images``)."""
    cfg = ensure_dataset(cfg)
    kind = cfg.eval.evaluator
    if kind == "auto":
        kind = "lvis" if cfg.data.format == "lvis" else "coco"
    s: SplitConfig = getattr(cfg.data, split)
    if cfg.eval.max_images is not None:
        s.max_images = min(cfg.eval.max_images, s.max_images or cfg.eval.max_images)
    data = load_split(cfg, split, check_files="header", kind=kind)
    if data.blobs is not None and cfg.eval.evaluator == "auto":
        kind = data.meta.kind  # Parquet shards remember their source format
    gt_json = str(data.meta.gt_json)
    if data.report.issues or s.max_images is not None:
        out = Path(cfg.output_dir).resolve() / "gt" / f"{split}_{kind}.json"
        gt = data.loaded.data if data.loaded is not None else json.loads(Path(gt_json).read_text())
        gt_json = str(write_subset_gt(gt, [r.image_id for r in data.records], out))
    return EvalData(
        dataset=EvalDataset(data.records, cfg.data.augmentation, data.blobs),
        gt_json=str(gt_json),
        kind=kind,
        category_ids=list(data.meta.category_ids),
        class_names=list(data.meta.class_names),
        image_ids=[r.image_id for r in data.records],
        meta=data.meta,
    )
