"""Image encoders: detectron2-style ResNet or timm Swin, plus the FPN."""

from __future__ import annotations

from torch import nn

from diffusioninst.config.schema import ModelConfig
from diffusioninst.model.backbone.fpn import FPN
from diffusioninst.model.backbone.norm import FrozenBatchNorm2d, make_norm
from diffusioninst.model.backbone.resnet import ResNet
from diffusioninst.model.backbone.swin import SwinBackbone
from diffusioninst.model.backbone.weights import BackboneLoadReport, load_backbone_weights

__all__ = [
    "FPN",
    "BackboneLoadReport",
    "FrozenBatchNorm2d",
    "ResNet",
    "SwinBackbone",
    "build_backbone",
    "build_fpn",
    "load_backbone_weights",
    "make_norm",
]


def build_backbone(cfg: ModelConfig) -> nn.Module:
    """ResNet (``resnetNN``) or timm Swin (``swin_*``) from ``cfg.backbone``; loads ``cfg.backbone.weights`` if set.

    The module returns ``{"res2": .., "res5": ..}`` and exposes ``out_channels``/``strides`` dicts.
    """
    b = cfg.backbone
    if b.name.startswith("resnet"):
        depth = int(b.name[len("resnet") :])
        res2 = b.res2_out_channels if b.res2_out_channels is not None else (64 if depth in (18, 34) else 256)
        backbone: nn.Module = ResNet(
            depth=depth,
            norm=b.norm,
            stem_out_channels=b.stem_out_channels,
            res2_out_channels=res2,
            width_per_group=b.width_per_group,
            num_groups=b.num_groups,
            stride_in_1x1=b.stride_in_1x1,
            res5_dilation=b.res5_dilation,
            freeze_at=0,
            last_stage=_last_stage(cfg.fpn.in_features),
        )
    elif b.name.startswith("swin"):
        backbone = SwinBackbone(b.name, freeze_at=0, drop_path_rate=b.drop_path_rate)
    else:
        raise ValueError(f"model.backbone.name: unknown backbone '{b.name}' (resnetNN or a timm swin_* name)")
    if b.weights:
        load_backbone_weights(backbone, b.weights)
    backbone.freeze(b.freeze_at)  # after loading: frozen BNs take the loaded statistics
    return backbone


def _last_stage(names: list[str]) -> int:
    """Deepest ResNet stage the FPN reads (``res4`` -> 4); stages past it are not built. 5 if none is named."""
    stages = [int(n[3:]) for n in names if n.startswith("res") and n[3:].isdigit() and 2 <= int(n[3:]) <= 5]
    return max(stages) if stages else 5


def build_fpn(cfg: ModelConfig, backbone: nn.Module) -> FPN:
    names = cfg.fpn.in_features
    missing = [n for n in names if n not in backbone.out_channels]
    if missing:
        raise ValueError(
            f"model.fpn.in_features: {missing} not produced by the backbone ({list(backbone.out_channels)})"
        )
    return FPN(
        in_channels=[backbone.out_channels[n] for n in names],
        in_strides=[backbone.strides[n] for n in names],
        out_channels=cfg.fpn.out_channels,
        norm=cfg.fpn.norm,
        top_block=cfg.fpn.top_block,
    )
