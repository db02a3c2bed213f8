"""Map an official DiffusionInst (detectron2) config to our :class:`ModelConfig` / :class:`SamplerConfig`.

Only the keys that change the model are read (``MODEL.RESNETS``, ``MODEL.FPN``, ``MODEL.DiffusionInst``,
``MODEL.ROI_HEADS.IN_FEATURES``, ``MODEL.ROI_BOX_HEAD`` pooler keys, ``MODEL.SWIN``, pixel mean/std); the
official hard-coded constants keep our defaults, which equal them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from diffusioninst.config.schema import (
    BackboneConfig,
    DiffusionConfig,
    FPNConfig,
    HeadConfig,
    LossConfig,
    MaskConfig,
    ModelConfig,
    SamplerConfig,
)

__all__ = ["from_official_config", "SWIN_SIZES"]

SWIN_SIZES = {
    "T": "swin_tiny_patch4_window7_224",
    "S": "swin_small_patch4_window7_224",
    "B": "swin_base_patch4_window7_224",
    "B-22k": "swin_base_patch4_window7_224",
    "B-22k-384": "swin_base_patch4_window12_384",
    "L-22k": "swin_large_patch4_window7_224",
    "L-22k-384": "swin_large_patch4_window12_384",
}
_NORMS = {"FrozenBN": "frozen_bn", "BN": "bn", "SyncBN": "sync_bn", "GN": "gn", "": "none"}


def _get(tree: dict, dotted: str, default: Any = None) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _level(name: str) -> str:
    """Backbone stage name -> ours: res2..res5 stay, swin0..swin3 -> res2..res5."""
    if name.startswith("swin"):
        return f"res{int(name[4:]) + 2}"
    return name


def from_official_config(source: str | Path | dict) -> tuple[ModelConfig, SamplerConfig]:
    """Read a detectron2 ``config.yaml`` (path or parsed dict) -> (model config, sampler config)."""
    tree = yaml.safe_load(Path(source).read_text()) if not isinstance(source, dict) else source
    if "MODEL" not in tree:
        raise ValueError(f"{source}: not a detectron2 config (no MODEL section)")
    di = _get(tree, "MODEL.DiffusionInst", {}) or {}
    if not di:
        raise ValueError(f"{source}: no MODEL.DiffusionInst section")
    if not di.get("USE_FOCAL", True):
        raise ValueError(
            f"{source}: USE_FOCAL False (softmax classification) is not supported by the official code either"
        )
    pooler = _get(tree, "MODEL.ROI_BOX_HEAD.POOLER_TYPE", "ROIAlignV2")
    if pooler != "ROIAlignV2":
        raise ValueError(f"{source}: MODEL.ROI_BOX_HEAD.POOLER_TYPE {pooler} unsupported (ROIAlignV2 only)")
    if _get(tree, "INPUT.FORMAT", "RGB") != "RGB":
        raise ValueError(f"{source}: INPUT.FORMAT must be RGB (our model takes RGB images)")
    backbone_name = _get(tree, "MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone")
    if "swin" in backbone_name:
        size = _get(tree, "MODEL.SWIN.SIZE", "B")
        if size not in SWIN_SIZES:
            raise ValueError(f"{source}: MODEL.SWIN.SIZE {size} unknown ({sorted(SWIN_SIZES)})")
        name = SWIN_SIZES[size]
    else:
        name = f"resnet{_get(tree, 'MODEL.RESNETS.DEPTH', 50)}"
    res = _get(tree, "MODEL.RESNETS", {}) or {}
    backbone = BackboneConfig(
        name=name,
        freeze_at=int(_get(tree, "MODEL.BACKBONE.FREEZE_AT", 2)),
        norm=_NORMS[res.get("NORM", "FrozenBN")],
        stem_out_channels=int(res.get("STEM_OUT_CHANNELS", 64)),
        res2_out_channels=int(res.get("RES2_OUT_CHANNELS", 256)),
        width_per_group=int(res.get("WIDTH_PER_GROUP", 64)),
        num_groups=int(res.get("NUM_GROUPS", 1)),
        stride_in_1x1=bool(res.get("STRIDE_IN_1X1", False)),
        res5_dilation=int(res.get("RES5_DILATION", 1)),
    )
    fpn_tree = _get(tree, "MODEL.FPN", {}) or {}
    fpn = FPNConfig(
        out_channels=int(fpn_tree.get("OUT_CHANNELS", 256)),
        in_features=[_level(n) for n in fpn_tree.get("IN_FEATURES", ["res2", "res3", "res4", "res5"])],
        norm={"": "", "GN": "gn", "BN": "bn"}[fpn_tree.get("NORM", "")],
    )
    head = HeadConfig(
        num_classes=int(di["NUM_CLASSES"]),
        num_proposals=int(di["NUM_PROPOSALS"]),
        hidden_dim=int(di["HIDDEN_DIM"]),
        nheads=int(di["NHEADS"]),
        dim_feedforward=int(di["DIM_FEEDFORWARD"]),
        dropout=float(di.get("DROPOUT", 0.0)),
        activation=di.get("ACTIVATION", "relu"),
        num_cls=int(di.get("NUM_CLS", 1)),
        num_reg=int(di.get("NUM_REG", 3)),
        num_stages=int(di["NUM_HEADS"]),
        num_dynamic=int(di.get("NUM_DYNAMIC", 2)),
        dim_dynamic=int(di["DIM_DYNAMIC"]),
        in_features=list(_get(tree, "MODEL.ROI_HEADS.IN_FEATURES", ["p2", "p3", "p4", "p5"])),
        pooler_resolution=int(_get(tree, "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", 7)),
        pooler_sampling_ratio=int(_get(tree, "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO", 2)),
    )
    loss = LossConfig(
        class_weight=float(di.get("CLASS_WEIGHT", 2.0)),
        l1_weight=float(di.get("L1_WEIGHT", 5.0)),
        giou_weight=float(di.get("GIOU_WEIGHT", 2.0)),
        focal_alpha=float(di.get("ALPHA", 0.25)),
        focal_gamma=float(di.get("GAMMA", 2.0)),
        prior_prob=float(di.get("PRIOR_PROB", 0.01)),
        deep_supervision=bool(di.get("DEEP_SUPERVISION", True)),
        ota_k=int(di.get("OTA_K", 5)),
        use_fed_loss=bool(di.get("USE_FED_LOSS", False)),
    )
    model = ModelConfig(
        backbone=backbone,
        fpn=fpn,
        head=head,
        mask=MaskConfig(),
        diffusion=DiffusionConfig(signal_scale=float(di.get("SNR_SCALE", 2.0))),
        loss=loss,
        pixel_mean=[float(v) for v in _get(tree, "MODEL.PIXEL_MEAN", [123.675, 116.28, 103.53])],
        pixel_std=[float(v) for v in _get(tree, "MODEL.PIXEL_STD", [58.395, 57.12, 57.375])],
    )
    sampler = SamplerConfig(steps=int(di.get("SAMPLE_STEP", 1)), use_nms=bool(di.get("USE_NMS", True)))
    return model, sampler
