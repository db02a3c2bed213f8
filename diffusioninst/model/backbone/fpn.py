"""Feature pyramid (detectron2 FPN semantics): p2..p5 (+ p6 = max_pool2d(p5, 1, stride 2)).

Lateral 1x1 convs, top-down nearest x2 upsampling + sum, 3x3 output convs, no activation. Inputs are
the backbone maps ``res2..res5`` ([B, C_k, H/s_k, W/s_k]); outputs ``p2..p6`` all have ``out_channels``
channels at strides 4, 8, 16, 32, 64 (the padded image must be a multiple of 32).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from diffusioninst.model.backbone.norm import NormConv2d, make_norm

__all__ = ["FPN"]


def _xavier_fill(conv: nn.Conv2d) -> None:
    # detectron2 c2_xavier_fill: kaiming_uniform with a=1, zero bias
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class FPN(nn.Module):
    """Top-down feature pyramid.

    Args:
        in_channels: channels of each input level, finest first (e.g. res2..res5).
        in_strides: their strides (4, 8, 16, 32 for a ResNet).
        out_channels: pyramid width.
        norm: '' (none, official) | 'gn' | 'bn'.
        top_block: 'maxpool' adds p6, 'none' stops at p5.
    """

    def __init__(
        self,
        in_channels: list[int],
        in_strides: list[int],
        out_channels: int,
        norm: str = "",
        top_block: str = "maxpool",
    ):
        super().__init__()
        self.lateral_convs = nn.ModuleList()
        self.output_convs = nn.ModuleList()
        use_bias = norm in ("", "none")
        for cin in in_channels:
            lateral = NormConv2d(cin, out_channels, 1, bias=use_bias, norm=make_norm(norm or "none", out_channels))
            output = NormConv2d(
                out_channels, out_channels, 3, padding=1, bias=use_bias, norm=make_norm(norm or "none", out_channels)
            )
            _xavier_fill(lateral)
            _xavier_fill(output)
            self.lateral_convs.append(lateral)
            self.output_convs.append(output)
        first = int(round(math.log2(in_strides[0])))
        self.names = [f"p{first + i}" for i in range(len(in_channels))]
        self.strides = dict(zip(self.names, in_strides))
        self.top_block = top_block
        if top_block == "maxpool":
            last = f"p{first + len(in_channels)}"
            self.strides[last] = in_strides[-1] * 2
        self.out_channels = out_channels

    def forward(self, feats: list[Tensor]) -> dict[str, Tensor]:
        """feats: input maps finest first -> ``{"p2": .., ..., "p6": ..}``."""
        prev = self.lateral_convs[-1](feats[-1])
        results = [self.output_convs[-1](prev)]
        for idx in range(len(feats) - 2, -1, -1):
            top_down = F.interpolate(prev, scale_factor=2.0, mode="nearest")
            prev = self.lateral_convs[idx](feats[idx]) + top_down
            results.insert(0, self.output_convs[idx](prev))
        out = dict(zip(self.names, results))
        if self.top_block == "maxpool":
            out[f"p{int(self.names[-1][1:]) + 1}"] = F.max_pool2d(results[-1], kernel_size=1, stride=2, padding=0)
        return out
