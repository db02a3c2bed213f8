"""DiffusionDet dynamic head with DiffusionInst's mask-filter controller.

``DynamicHead(features, boxes, t)``: time embedding (sinusoidal -> Linear(d, 4d) -> GELU -> Linear(4d, 4d)),
then ``num_stages`` cascaded :class:`~diffusioninst.model.head_stage.HeadStage`. Stage k pools RoI features
of its input boxes from p2..p5, and its predicted boxes (detached) are the next stage's input; the next
stage's proposal features are this stage's obj features.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from diffusioninst.config.schema import ModelConfig
from diffusioninst.model.head_stage import HeadStage
from diffusioninst.model.pooler import GradientSink, MultiLevelRoIAlign

__all__ = ["DynamicHead", "SinusoidalEmbedding", "official_head_init"]


class SinusoidalEmbedding(nn.Module):
    """t [B] (integer timesteps) -> [B, dim] = cat(sin(t * f_j), cos(t * f_j)), f_j = exp(-j log(1e4) / (dim/2 - 1))."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: Tensor) -> Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device) * -(math.log(10000) / (half - 1)))
        args = t[:, None] * freqs[None, :]
        return torch.cat((args.sin(), args.cos()), dim=-1)


class DynamicHead(nn.Module):
    """Cascade of dynamic-head stages.

    Args:
        cfg: model config (``cfg.head`` sizes, ``cfg.mask`` for the controller width).
        strides: strides of the pooled FPN levels (``cfg.head.in_features``), finest first.
        num_mask_params: controller output width (153 for the official dynamic mask head).
    """

    def __init__(self, cfg: ModelConfig, strides: list[int], num_mask_params: int):
        super().__init__()
        h = cfg.head
        d = h.hidden_dim
        self.hidden_dim = d
        self.num_classes = h.num_classes
        self.time_mlp = nn.Sequential(SinusoidalEmbedding(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, 4 * d))
        stage = HeadStage(
            hidden_dim=d,
            num_classes=h.num_classes,
            num_mask_params=num_mask_params,
            dim_feedforward=h.dim_feedforward,
            nheads=h.nheads,
            dropout=h.dropout,
            activation=h.activation,
            num_cls=h.num_cls,
            num_reg=h.num_reg,
            dim_dynamic=h.dim_dynamic,
            num_dynamic=h.num_dynamic,
            pooler_resolution=h.pooler_resolution,
            bbox_weights=tuple(h.bbox_weights),
            scale_clamp=h.scale_clamp,
        )
        # deep copies of one stage: 1-D parameters start identical across stages, as official
        self.stages = nn.ModuleList(copy.deepcopy(stage) for _ in range(h.num_stages))
        self.pooler = MultiLevelRoIAlign(
            strides,
            output_size=h.pooler_resolution,
            sampling_ratio=h.pooler_sampling_ratio,
            canonical_box_size=h.canonical_box_size,
            canonical_level=h.canonical_level,
        )

    def forward(
        self,
        features: list[Tensor],
        boxes: Tensor,
        t: Tensor,
        trace: dict | None = None,
        sink: GradientSink | None = None,
    ) -> dict[str, Tensor]:
        """
        Args:
            features: pooled FPN levels (p2..p5), each [B, d, H_l, W_l].
            boxes: [B, N, 4] abs xyxy (input frame), float32 or float64.
            t: [B] int64 timesteps.
            trace: if a dict, intermediate tensors are stored in it (tests / debugging).
            sink: a :class:`GradientSink` that ``features`` were already wrapped in (the detector's training
                forward does this); None = the head makes and applies its own when it trains on CPU.
        Returns:
            ``logits`` [S, B, N, K], ``boxes`` [S, B, N, 4] abs xyxy, ``kernels`` [S, B, N, P] for the S stages.
        """
        # one time step shared by the batch (sampling): embed it once, so every image gets exactly the numbers
        # a single-image run computes (a matrix product over B rows may round differently from one row)
        shared = bool((t == t[0]).all())
        time_emb = self.time_mlp(t[:1]).expand(t.shape[0], -1) if shared else self.time_mlp(t)
        logits, pred_boxes, kernels = [], [], []
        pro = None
        if trace is not None:
            trace.update(time_emb=time_emb, stages=[])
        if sink is None:
            sink = self.pooler.gradient_sink(features)  # the stages' RoIAlign gradients summed once per level
            if sink is not None:
                features = sink.wrap(features)
        for stage in self.stages:
            roi = self.pooler(features, boxes, sink=sink)
            cls, box, obj, ker = stage(roi, boxes, pro, time_emb, shared_time=shared)
            if trace is not None:
                trace["stages"].append(
                    {"in_boxes": boxes, "roi": roi, "obj": obj, "logits": cls, "boxes": box, "kernels": ker}
                )
            logits.append(cls)
            pred_boxes.append(box)
            kernels.append(ker)
            boxes = box.detach()
            pro = obj
        return {"logits": torch.stack(logits), "boxes": torch.stack(pred_boxes), "kernels": torch.stack(kernels)}


@torch.no_grad()
def official_head_init(modules: list[nn.Module], num_classes: int, prior_prob: float, by_shape: bool = True) -> None:
    """The official ``DynamicHead._reset_parameters`` over ``modules`` (head and mask branch).

    Every parameter with more than one dimension gets ``xavier_uniform_``; the focal prior bias
    ``-log((1 - p) / p)`` goes into every parameter whose last dim equals ``num_classes`` or ``num_classes + 1``
    (``by_shape``, the official quirk) or only into the stages' ``class_logits.bias``.
    """
    bias = -math.log((1 - prior_prob) / prior_prob)
    for module in modules:
        for name, p in module.named_parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
            if by_shape:
                if p.shape[-1] in (num_classes, num_classes + 1):
                    nn.init.constant_(p, bias)
            elif name.endswith("class_logits.bias"):
                nn.init.constant_(p, bias)
