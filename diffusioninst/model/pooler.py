"""Multi-level RoIAlign (detectron2 ``ROIPooler`` with ``ROIAlignV2`` semantics) over FPN levels.

Each box is assigned to level ``floor(canonical_level + log2(sqrt(area) / canonical_box_size + 1e-8))``
clamped to the available levels, then pooled with torchvision ``roi_align(aligned=True)`` on that level.
Boxes are cast to float32 first (detectron2 ``Boxes`` does), so float64 diffusion boxes pool identically.

torchvision's CPU RoIAlign kernels are single-threaded; with ``torch.get_num_threads() > 1`` the boxes are
split into that many parts pooled concurrently (the kernels release the GIL). The forward result is
identical; in the backward the per-part feature gradients are summed, which may round differently in
the last bit (with one thread nothing is split and results are bit-identical to the official code).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor
from torchvision.ops import roi_align

__all__ = ["MultiLevelRoIAlign", "assign_levels"]

_roi_align_backward = torch.ops.torchvision._roi_align_backward


def assign_levels(
    boxes: Tensor, min_level: int, max_level: int, canonical_box_size: float, canonical_level: int
) -> Tensor:
    """boxes [R, 4] abs xyxy (float32) -> int64 [R] level index relative to ``min_level``."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    level = torch.floor(canonical_level + torch.log2(torch.sqrt(area) / canonical_box_size + 1e-8))
    return torch.clamp(level, min=min_level, max=max_level).to(torch.int64) - min_level


class _Runner:
    """Runs independent kernel calls on a small thread pool (created lazily, never pickled or copied)."""

    def __init__(self):
        self._pool: ThreadPoolExecutor | None = None

    def map(self, fn, jobs: list[tuple]) -> list:
        parts = torch.get_num_threads()
        if parts <= 1 or len(jobs) <= 1:
            return [fn(*job) for job in jobs]
        if self._pool is None or self._pool._max_workers != parts:
            self._pool = ThreadPoolExecutor(max_workers=parts, thread_name_prefix="roi_align")
        return list(self._pool.map(lambda job: fn(*job), jobs))

    def __getstate__(self):
        return {"_pool": None}

    def __deepcopy__(self, memo):
        return _Runner()


def _split(index: Tensor, parts: int) -> list[Tensor]:
    if parts <= 1 or index.numel() < 2 * parts:
        return [index]
    return [p for p in torch.tensor_split(index, parts) if p.numel()]


class _PoolLevels(torch.autograd.Function):
    """RoIAlign of every box on its level; features get gradients through torchvision's backward kernel."""

    @staticmethod
    def forward(ctx, spec: dict, rois: Tensor, *features: Tensor) -> Tensor:
        out = features[0].new_zeros((rois.shape[0], features[0].shape[1], spec["size"], spec["size"]))
        parts = torch.get_num_threads() if rois.device.type == "cpu" else 1
        jobs = [(level, part) for level, idx in enumerate(spec["index"]) for part in _split(idx, parts)]

        def pool(level: int, part: Tensor) -> tuple[Tensor, Tensor]:
            feat = features[level]
            boxes = rois[part].to(feat.dtype)
            return part, roi_align(feat, boxes, spec["size"], spec["scales"][level], spec["ratio"], True)

        for part, pooled in spec["runner"].map(pool, jobs):
            out[part] = pooled
        ctx.spec = spec
        ctx.shapes = [f.shape for f in features]
        ctx.save_for_backward(rois)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        (rois,) = ctx.saved_tensors
        spec = ctx.spec
        size = spec["size"]

        def back(level: int, part: Tensor) -> tuple[int, Tensor]:
            b, c, h, w = ctx.shapes[level]
            shape_args = (spec["scales"][level], size, size, b, c, h, w, spec["ratio"], True)
            return level, _roi_align_backward(grad[part].contiguous(), rois[part].to(grad.dtype), *shape_args)

        parts = torch.get_num_threads() if rois.device.type == "cpu" else 1
        jobs = [(level, part) for level, idx in enumerate(spec["index"]) for part in _split(idx, parts)]
        grads: list[Tensor | None] = [None] * len(ctx.shapes)
        for level, g in spec["runner"].map(back, jobs):
            grads[level] = g if grads[level] is None else grads[level] + g
        return (None, None, *grads)


class MultiLevelRoIAlign:
    """Pool ``output_size`` x ``output_size`` features for boxes from a list of FPN maps.

    Args:
        strides: stride of each feature map, finest first (4, 8, 16, 32 for p2..p5).
        output_size: pooled resolution (official 7).
        sampling_ratio: RoIAlign samples per bin side (official 2).
    """

    def __init__(
        self,
        strides: list[int],
        output_size: int = 7,
        sampling_ratio: int = 2,
        canonical_box_size: float = 224.0,
        canonical_level: int = 4,
    ):
        levels = [math.log2(s) for s in strides]
        if any(abs(level - round(level)) > 1e-6 for level in levels) or any(
            round(b) - round(a) != 1 for a, b in zip(levels, levels[1:])
        ):
            raise ValueError(f"RoI pooler needs consecutive power-of-two strides, got {strides}")
        self.scales = [1.0 / s for s in strides]
        self.min_level = int(round(levels[0]))
        self.max_level = int(round(levels[-1]))
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio
        self.canonical_box_size = canonical_box_size
        self.canonical_level = canonical_level
        self.runner = _Runner()

    def __call__(self, features: list[Tensor], boxes: Tensor) -> Tensor:
        """features: per level [B, C, H_l, W_l]; boxes: [B, N, 4] abs xyxy -> [B*N, C, S, S] (image-major)."""
        b, n = boxes.shape[:2]
        flat = boxes.reshape(b * n, 4).to(torch.float32)
        index = torch.arange(b, device=flat.device, dtype=flat.dtype).repeat_interleave(n)
        rois = torch.cat([index[:, None], flat], dim=1)
        if len(features) == 1:
            levels = torch.zeros(b * n, dtype=torch.int64, device=flat.device)
        else:
            levels = assign_levels(flat, self.min_level, self.max_level, self.canonical_box_size, self.canonical_level)
        spec = {
            # every level is pooled, even without boxes: it stays in the graph (zero gradient), as official
            "index": [torch.nonzero(levels == level).squeeze(1) for level in range(len(features))],
            "scales": self.scales,
            "size": self.output_size,
            "ratio": self.sampling_ratio,
            "runner": self.runner,
        }
        return _PoolLevels.apply(spec, rois, *features)
