"""Mask branch: FPN levels -> mask features F_mask (``mask_channels`` channels at stride 4 of the padded image).

Official layout (``head.mask_refine`` / ``head.mask_head``): each of p2, p3, p4 goes through a 3x3 conv
(no bias) + BatchNorm2d + ReLU to ``branch_channels``; p3/p4 are upsampled with :func:`aligned_bilinear`
to the p2 grid and summed; a tower of ``num_convs`` [3x3 conv + BN + ReLU] and a 1x1 conv (with bias)
give F_mask. (The official variable says p3-p5; the code uses p2-p4, as do we.) The norm is regular
BatchNorm2d: batch statistics in training, running statistics in eval.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MaskBranch", "aligned_bilinear"]


def aligned_bilinear(x: Tensor, factor: int) -> Tensor:
    """CondInst-style upsampling that keeps pixel centres aligned: [B, C, h, w] -> [B, C, f*h, f*w].

    Replicate-pad right/bottom by 1, bilinear resize (align_corners=True) to (f*h+1, f*w+1), replicate-pad
    left/top by f//2, crop to (f*h, f*w). Output pixel j reads input position max(j - f//2, 0) / f.
    """
    if x.dim() != 4:
        raise ValueError(f"aligned_bilinear expects [B, C, H, W], got {list(x.shape)}")
    if factor == 1:
        return x
    h, w = x.shape[-2:]
    x = F.pad(x, (0, 1, 0, 1), mode="replicate")
    x = F.interpolate(x, size=(factor * h + 1, factor * w + 1), mode="bilinear", align_corners=True)
    x = F.pad(x, (factor // 2, 0, factor // 2, 0), mode="replicate")
    return x[:, :, : factor * h, : factor * w]


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "sync_bn":
        return nn.SyncBatchNorm(channels)
    if kind == "gn":
        return nn.GroupNorm(32 if channels % 32 == 0 else 1, channels)
    return nn.Identity()


class ConvNormReLU(nn.Sequential):
    """3x3 conv (no bias) -> norm -> ReLU, named ``conv``/``norm`` (official index 0/1)."""

    def __init__(self, cin: int, cout: int, norm: str):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=norm == "none")
        self.norm = _norm(norm, cout)
        self.relu = nn.ReLU(inplace=True)


class MaskBranch(nn.Module):
    """FPN maps -> F_mask.

    Args:
        in_channels: FPN width.
        num_levels: how many FPN levels are fused, finest first (official 3: p2, p3, p4).
        branch_channels, num_convs, mask_channels, norm: see :class:`~diffusioninst.config.schema.MaskConfig`.
    """

    def __init__(
        self,
        in_channels: int,
        num_levels: int = 3,
        branch_channels: int = 128,
        num_convs: int = 4,
        mask_channels: int = 8,
        norm: str = "bn",
    ):
        super().__init__()
        self.refine = nn.ModuleList(ConvNormReLU(in_channels, branch_channels, norm) for _ in range(num_levels))
        self.tower = nn.ModuleList(ConvNormReLU(branch_channels, branch_channels, norm) for _ in range(num_convs))
        self.out_conv = nn.Conv2d(branch_channels, mask_channels, 1)

    def forward(self, feats: list[Tensor]) -> Tensor:
        """feats: FPN maps finest first ([B, C, H/4, W/4], [B, C, H/8, W/8], ...) -> F_mask [B, C_mask, H/4, W/4]."""
        x = self.refine[0](feats[0])
        for level, refine in enumerate(self.refine[1:], start=1):
            y = refine(feats[level])
            factor = x.shape[-2] // y.shape[-2]
            if x.shape[-2] != factor * y.shape[-2] or x.shape[-1] != factor * y.shape[-1]:
                raise ValueError(f"mask branch: level {level} {list(y.shape)} does not divide {list(x.shape)}")
            x = x + aligned_bilinear(y, factor)
        for block in self.tower:
            x = block(x)
        return self.out_conv(x)
