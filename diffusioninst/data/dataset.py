"""Map-style datasets (train/eval) over :class:`ImageRecord` lists, and the collate that builds a ``Batch``.

Training items are ``(image uint8 [3, h, w], target)`` with ``target = {"boxes": float32 [G, 4] abs xyxy
(input frame), "labels": int64 [G], "masks": uint8 [G, h, w], "image_id": int, "orig_size": (H, W)}``;
eval items are ``(image uint8 [3, h, w] resized for testing, {"image_id", "orig_size"})``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from diffusioninst.config.schema import AugmentationConfig
from diffusioninst.data.image_io import ImageDecodeError, decode_image, read_image
from diffusioninst.data.records import ImageRecord
from diffusioninst.data.sampling import augmentation_seed
from diffusioninst.data.transforms import eval_image, train_sample
from diffusioninst.data.validation import CheckReport, Issue, image_where
from diffusioninst.structures import Batch, pad_images

TARGET_KEYS = ("boxes", "labels", "masks")


class ImageStore:
    """Loads the original RGB image of a record: from an in-memory list of decoded images (``cache``, see
    :func:`decode_all`), from in-memory encoded bytes (``blobs``), or from the file."""

    def __init__(
        self,
        records: Sequence[ImageRecord],
        blobs: Sequence[bytes] | None = None,
        cache: Sequence[np.ndarray] | None = None,
    ):
        self.records, self.blobs, self.cache = records, blobs, cache

    def _decode(self, index: int) -> np.ndarray:
        rec = self.records[index]
        if self.blobs is not None:
            return decode_image(self.blobs[index], rec.file_name)
        return read_image(rec.file_name)

    def __call__(self, index: int) -> np.ndarray:
        return self.cache[index] if self.cache is not None else self._decode(index)


def decode_all(
    records: list[ImageRecord], blobs: list[bytes] | None, report: CheckReport, policy: str
) -> tuple[list[ImageRecord], list[bytes] | None, list[np.ndarray]]:
    """Decode every image once (to fill the in-memory cache), validating it on the way: corrupt or missing
    files raise under ``error`` and are dropped and counted in ``report`` under ``skip``.

    Returns the kept records, their blobs (or None) and their decoded uint8 [h, w, 3] images."""
    keep, images, issues = [], [], []
    for i, rec in enumerate(records):
        try:
            images.append(decode_image(blobs[i], rec.file_name) if blobs is not None else read_image(rec.file_name))
            keep.append(i)
        except (ImageDecodeError, FileNotFoundError) as e:
            reason = "missing_image_file" if isinstance(e, FileNotFoundError) else "corrupt_image"
            where = image_where({"id": rec.image_id, "file_name": rec.file_name})
            issues.append(Issue(reason, where, str(e), rec.image_id))
    report.extend(issues)
    report.enforce(policy)
    return [records[i] for i in keep], ([blobs[i] for i in keep] if blobs is not None else None), images


class TrainDataset(Dataset):
    """Augmented training samples. Index with ``(record index, augmentation seed)`` (what the samplers
    yield) or a plain int (seed derived from ``seed`` and the image id, epoch 0)."""

    def __init__(
        self,
        records: Sequence[ImageRecord],
        aug: AugmentationConfig,
        seed: int = 0,
        blobs: Sequence[bytes] | None = None,
        cache: Sequence[np.ndarray] | None = None,
    ):
        self.records = list(records)
        self.aug = aug
        self.seed = seed
        self.images = ImageStore(self.records, blobs, cache)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, dict]:
        if isinstance(key, tuple):
            index, sample_seed = key
        else:
            index = int(key)
            sample_seed = augmentation_seed(self.seed, 0, self.records[index].image_id)
        rng = np.random.default_rng(sample_seed)
        return train_sample(self.images(index), self.records[index], self.aug, rng)


class EvalDataset(Dataset):
    """Test-time resized images with their id and original size (evaluation happens at the original size)."""

    def __init__(self, records: Sequence[ImageRecord], aug: AugmentationConfig, blobs: Sequence[bytes] | None = None):
        self.records = list(records)
        self.aug = aug
        self.images = ImageStore(self.records, blobs)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        rec = self.records[index]
        image = self.images(index)
        if image.shape[:2] != (rec.height, rec.width):
            raise ValueError(f"{rec.file_name}: decoded size {image.shape[:2]} != annotated {(rec.height, rec.width)}")
        return eval_image(image, self.aug), {"image_id": rec.image_id, "orig_size": (rec.height, rec.width)}


def collate(samples: Sequence[tuple[torch.Tensor, dict]], size_divisibility: int = 32) -> Batch:
    """Stack samples into a :class:`~diffusioninst.structures.Batch`.

    Images are zero-padded bottom/right to the batch max size rounded up to ``size_divisibility``
    (detectron2 ``ImageList.from_tensors``). ``targets`` holds only tensors (boxes/labels/masks) and is
    None when the samples have no boxes (inference).
    """
    if not samples:
        raise ValueError("collate() needs at least one sample")
    sizes = [tuple(img.shape[1:]) for img, _ in samples]
    images = pad_images([img for img, _ in samples], size_divisibility)
    metas = [t for _, t in samples]
    targets = [{k: t[k] for k in TARGET_KEYS} for t in metas] if "boxes" in metas[0] else None
    return Batch(
        images=images,
        image_sizes=torch.tensor(sizes, dtype=torch.int64).reshape(-1, 2),
        orig_sizes=torch.tensor([t["orig_size"] for t in metas], dtype=torch.int64).reshape(-1, 2),
        image_ids=[int(t["image_id"]) for t in metas],
        targets=targets,
    )
