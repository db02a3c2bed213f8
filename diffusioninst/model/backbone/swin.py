"""Swin Transformer backbone from timm, laid out like the detection Swin the official code uses.

The timm model (``body``) runs with ``strict_img_size=False`` (attention masks built per input, windows
padded), so any input whose sides are multiples of 32 works, square or not. As in the official detection
Swin, each output stage gets its own LayerNorm (``out_norms.{i}``); timm's classifier head and final norm
are not used. Outputs ``res2..res5`` ([B, C_i, H/4..H/32, W/4..W/32], NCHW) so the FPN treats it like a
ResNet.
"""

from __future__ import annotations

import timm
from torch import Tensor, nn

__all__ = ["SwinBackbone"]


class SwinBackbone(nn.Module):
    """timm Swin -> ``{"res2": .., "res3": .., "res4": .., "res5": ..}``.

    Args:
        name: a timm swin model name (``swin_base_patch4_window7_224``, ``swin_large_patch4_window12_384``...).
        freeze_at: 1 freezes the patch embedding, k >= 2 also stages 0..k-2 (as ResNet stem/res2..).
        drop_path_rate: stochastic depth.
        timm_kwargs: architecture overrides passed to ``timm.create_model`` (e.g. a tiny Swin in tests).
    """

    def __init__(self, name: str, freeze_at: int = 0, drop_path_rate: float = 0.0, **timm_kwargs):
        super().__init__()
        if not name.startswith("swin"):
            raise ValueError(f"model.backbone.name: '{name}' is not a timm Swin model")
        try:
            self.body = timm.create_model(
                name,
                pretrained=False,
                num_classes=0,
                strict_img_size=False,
                always_partition=True,
                drop_path_rate=drop_path_rate,
                **timm_kwargs,
            )
        except RuntimeError as e:  # unknown model name
            raise ValueError(f"model.backbone.name: timm cannot build '{name}': {e}") from None
        self.body.head = nn.Identity()
        self.body.norm = nn.Identity()
        channels = [int(info["num_chs"]) for info in self.body.feature_info]
        self.out_norms = nn.ModuleList(nn.LayerNorm(c) for c in channels)
        self.out_channels = {f"res{i + 2}": c for i, c in enumerate(channels)}
        self.strides = {f"res{i + 2}": 2 ** (i + 2) for i in range(len(channels))}
        self.freeze(freeze_at)

    def freeze(self, freeze_at: int) -> None:
        frozen = []
        if freeze_at >= 1:
            frozen.append(self.body.patch_embed)
        frozen += [self.body.layers[i] for i in range(max(0, freeze_at - 1)) if i < len(self.body.layers)]
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(False)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if x.shape[-2] % 32 or x.shape[-1] % 32:
            raise ValueError(f"Swin backbone needs input sides that are multiples of 32, got {list(x.shape[-2:])}")
        out = {}
        x = self.body.patch_embed(x)  # NHWC
        for i, stage in enumerate(self.body.layers):
            x = stage(x)
            out[f"res{i + 2}"] = self.out_norms[i](x).permute(0, 3, 1, 2).contiguous()
        return out
