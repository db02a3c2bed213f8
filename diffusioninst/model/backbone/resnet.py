"""ResNet-18/34/50/101/152 with detectron2 semantics.

Layout (and state-dict names): ``stem.conv1`` (7x7/2 conv + norm, ReLU, 3x3/2 max-pool), then stages
``res2..res5`` of blocks ``resK.i.{conv1,conv2,conv3,shortcut}``, each conv holding its norm as ``.norm``.
Bottleneck blocks put the stride on the 3x3 conv unless ``stride_in_1x1`` (MSRA/caffe2 weights). Widths
are configurable (stem, res2 output, width per group), as detectron2's STEM_OUT_CHANNELS,
RES2_OUT_CHANNELS and WIDTH_PER_GROUP. ``freeze_at`` freezes the stem (1) and res2..res{freeze_at}
(parameters stop requiring grad and their norms become FrozenBatchNorm2d).

Input: [B, 3, H, W] normalised image; output: dict ``res2..res5`` with strides 4, 8, 16, 32.
``last_stage`` < 5 builds and runs only ``res2..res{last_stage}`` (set from ``model.fpn.in_features``: a
pyramid that stops at res4 does not pay for res5).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from diffusioninst.model.backbone.norm import NormConv2d, freeze_batchnorm, make_norm
from diffusioninst.model.backbone.pooling import stem_max_pool

__all__ = ["ResNet", "BLOCKS_PER_DEPTH"]

BLOCKS_PER_DEPTH = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}


def _conv(cin: int, cout: int, k: int, stride: int = 1, norm: str = "frozen_bn", **kw) -> NormConv2d:
    conv = NormConv2d(cin, cout, k, stride=stride, padding=kw.pop("padding", (k - 1) // 2), bias=False, **kw)
    conv.norm = make_norm(norm, cout)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


class _Block(nn.Module):
    def freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        freeze_batchnorm(self)


class BasicBlock(_Block):
    """Two 3x3 convs (ResNet-18/34). [B, cin, H, W] -> [B, cout, H/stride, W/stride]."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str):
        super().__init__()
        self.shortcut = _conv(cin, cout, 1, stride, norm) if cin != cout else None
        self.conv1 = _conv(cin, cout, 3, stride, norm)
        self.conv2 = _conv(cout, cout, 3, 1, norm)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu_(self.conv1(x))
        out = self.conv2(out)
        out = out + (self.shortcut(x) if self.shortcut is not None else x)
        return F.relu_(out)


class BottleneckBlock(_Block):
    """1x1 -> 3x3 (groups, dilation) -> 1x1. [B, cin, H, W] -> [B, cout, H/stride, W/stride]."""

    def __init__(
        self,
        cin: int,
        cout: int,
        bottleneck: int,
        stride: int,
        norm: str,
        groups: int = 1,
        stride_in_1x1: bool = False,
        dilation: int = 1,
    ):
        super().__init__()
        self.shortcut = _conv(cin, cout, 1, stride, norm) if cin != cout else None
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = _conv(cin, bottleneck, 1, s1, norm)
        self.conv2 = _conv(bottleneck, bottleneck, 3, s3, norm, padding=dilation, groups=groups, dilation=dilation)
        self.conv3 = _conv(bottleneck, cout, 1, 1, norm)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu_(self.conv1(x))
        out = F.relu_(self.conv2(out))
        out = self.conv3(out)
        out = out + (self.shortcut(x) if self.shortcut is not None else x)
        return F.relu_(out)


class Stem(_Block):
    """7x7/2 conv + norm + ReLU + 3x3/2 max-pool (:func:`stem_max_pool`): [B, 3, H, W] -> [B, C, H/4, W/4]."""

    def __init__(self, cout: int, norm: str):
        super().__init__()
        self.conv1 = _conv(3, cout, 7, 2, norm, padding=3)

    def forward(self, x: Tensor) -> Tensor:
        return stem_max_pool(F.relu_(self.conv1(x)))


class ResNet(nn.Module):
    """detectron2-style ResNet returning ``{"res2": .., "res3": .., "res4": .., "res5": ..}``."""

    def __init__(
        self,
        depth: int = 50,
        norm: str = "frozen_bn",
        stem_out_channels: int = 64,
        res2_out_channels: int = 256,
        width_per_group: int = 64,
        num_groups: int = 1,
        stride_in_1x1: bool = False,
        res5_dilation: int = 1,
        freeze_at: int = 2,
        last_stage: int = 5,
    ):
        super().__init__()
        if not 2 <= last_stage <= 5:
            raise ValueError(f"ResNet last_stage must be 2..5, got {last_stage}")
        self.last_stage = last_stage
        if depth not in BLOCKS_PER_DEPTH:
            raise ValueError(f"model.backbone.name: unsupported ResNet depth {depth}; use {sorted(BLOCKS_PER_DEPTH)}")
        basic = depth in (18, 34)
        if basic and (res5_dilation != 1 or num_groups != 1):
            raise ValueError(
                "model.backbone: ResNet-18/34 need res5_dilation 1 and num_groups 1 "
                f"(got {res5_dilation}, {num_groups})"
            )  # any res2 width works (narrow ResNet-18s train fast from scratch); 64 is the ImageNet one
        self.stem = Stem(stem_out_channels, norm)
        cin, cout, bottleneck = stem_out_channels, res2_out_channels, num_groups * width_per_group
        self.out_channels: dict[str, int] = {}
        self.strides = {f"res{idx}": 2**idx for idx in range(2, last_stage + 1)}
        for idx, num_blocks in enumerate(BLOCKS_PER_DEPTH[depth][: last_stage - 1], start=2):
            dilation = res5_dilation if idx == 5 else 1
            first_stride = 1 if idx == 2 or (idx == 5 and dilation == 2) else 2
            blocks = []
            for i in range(num_blocks):
                stride = first_stride if i == 0 else 1
                if basic:
                    blocks.append(BasicBlock(cin, cout, stride, norm))
                else:
                    blocks.append(
                        BottleneckBlock(cin, cout, bottleneck, stride, norm, num_groups, stride_in_1x1, dilation)
                    )
                cin = cout
            self.add_module(f"res{idx}", nn.Sequential(*blocks))
            self.out_channels[f"res{idx}"] = cout
            if dilation == 2:
                self.strides["res5"] = 16
            cout *= 2
            bottleneck *= 2
        self.freeze(freeze_at)

    def freeze(self, freeze_at: int) -> None:
        """Freeze the stem (``freeze_at >= 1``) and stages res2..res{freeze_at}."""
        if freeze_at >= 1:
            self.stem.freeze()
        for idx in range(2, self.last_stage + 1):
            if freeze_at >= idx:
                for block in getattr(self, f"res{idx}"):
                    block.freeze()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out = {}
        x = self.stem(x)
        for idx in range(2, self.last_stage + 1):
            x = getattr(self, f"res{idx}")(x)
            out[f"res{idx}"] = x
        return out
