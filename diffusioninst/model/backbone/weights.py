"""Load backbone weights from a LOCAL file (nothing is downloaded).

ResNet files may use torchvision/timm names (``conv1``, ``bn1``, ``layer1.0.downsample.0``), detectron2
names (``stem.conv1.norm``, ``res2.0.shortcut``, optionally prefixed ``backbone.bottom_up.``) or caffe2/MSRA
``.pkl`` names (``res2_0_branch2a_w``, ``res_conv1_bn_s``). Swin files may use timm names or the original
Microsoft names (converted with timm's ``checkpoint_filter_fn``); the detection Swin's per-stage output
norms ``norm0..norm3`` map to ``out_norms.{i}``. Classifier heads are ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor, nn

from diffusioninst.model.backbone.norm import FrozenBatchNorm2d
from diffusioninst.model.backbone.resnet import ResNet
from diffusioninst.model.backbone.swin import SwinBackbone
from diffusioninst.model.state_io import read_state_dict

__all__ = ["BackboneLoadReport", "load_backbone_weights", "resnet_key_to_ours"]

_IGNORED = re.compile(r"^(fc|head|classifier|norm)\.|^fc1000_|^pred_|num_batches_tracked$")
_TV_BN = {"weight": "weight", "bias": "bias", "running_mean": "running_mean", "running_var": "running_var"}
_C2_BN = {"s": "weight", "b": "bias", "rm": "running_mean", "riv": "running_var"}
_C2_BRANCH = {"branch2a": "conv1", "branch2b": "conv2", "branch2c": "conv3", "branch1": "shortcut"}


@dataclass
class BackboneLoadReport:
    """What happened when loading: ``loaded`` names (ours), ``ignored`` (file names not used) and
    ``missing_optional`` (FrozenBN statistics absent from caffe2 files; identity is kept)."""

    path: str
    naming: str
    loaded: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    missing_optional: list[str] = field(default_factory=list)


def resnet_key_to_ours(key: str) -> tuple[str | None, str]:
    """Map one ResNet weight name to our layout; returns ``(our_name or None, naming)``."""
    key = key.removeprefix("module.").removeprefix("backbone.bottom_up.").removeprefix("backbone.body.")
    key = key.removeprefix("backbone.")
    if re.match(r"^(stem\.conv1|res[2-5]\.\d+\.(conv[1-3]|shortcut))\.", key):
        return key, "detectron2"
    m = re.match(r"^conv1\.weight$", key)
    if m:
        return "stem.conv1.weight", "torchvision"
    m = re.match(r"^bn1\.(\w+)$", key)
    if m and m.group(1) in _TV_BN:
        return f"stem.conv1.norm.{_TV_BN[m.group(1)]}", "torchvision"
    m = re.match(r"^layer([1-4])\.(\d+)\.(conv[1-3]|bn[1-3]|downsample\.[01])\.(\w+)$", key)
    if m:
        stage, block, part, leaf = int(m.group(1)) + 1, m.group(2), m.group(3), m.group(4)
        prefix = f"res{stage}.{block}"
        if part.startswith("conv") and leaf == "weight":
            return f"{prefix}.{part}.weight", "torchvision"
        if part.startswith("bn") and leaf in _TV_BN:
            return f"{prefix}.conv{part[2]}.norm.{_TV_BN[leaf]}", "torchvision"
        if part == "downsample.0" and leaf == "weight":
            return f"{prefix}.shortcut.weight", "torchvision"
        if part == "downsample.1" and leaf in _TV_BN:
            return f"{prefix}.shortcut.norm.{_TV_BN[leaf]}", "torchvision"
    if key == "conv1_w":
        return "stem.conv1.weight", "caffe2"
    m = re.match(r"^res_conv1_bn_(s|b|rm|riv)$", key)
    if m:
        return f"stem.conv1.norm.{_C2_BN[m.group(1)]}", "caffe2"
    m = re.match(r"^res([2-5])_(\d+)_(branch2[abc]|branch1)_(w|bn_s|bn_b|bn_rm|bn_riv)$", key)
    if m:
        prefix = f"res{m.group(1)}.{m.group(2)}.{_C2_BRANCH[m.group(3)]}"
        leaf = m.group(4)
        return (f"{prefix}.weight" if leaf == "w" else f"{prefix}.norm.{_C2_BN[leaf[3:]]}"), "caffe2"
    return None, "unknown"


def _swin_state(raw: dict[str, Tensor], backbone: SwinBackbone) -> tuple[dict[str, Tensor], list[str], str]:
    from timm.models.swin_transformer import checkpoint_filter_fn

    prefixes = ("module.", "backbone.bottom_up.", "backbone.body.", "backbone.")
    stripped = {}
    for k, v in raw.items():
        for p in prefixes:
            k = k.removeprefix(p)
        stripped[k] = v
    naming = "microsoft" if "layers.0.downsample.reduction.weight" in stripped else "timm"
    ours: dict[str, Tensor] = {}
    body: dict[str, Tensor] = {}
    for k, v in stripped.items():
        m = re.match(r"^(?:norm|out_norms\.)([0-3])\.(weight|bias)$", k)
        if m:
            ours[f"out_norms.{m.group(1)}.{m.group(2)}"] = v
        else:
            body[k.removeprefix("body.")] = v
    ignored = []
    for k, v in checkpoint_filter_fn(body, backbone.body).items():
        if _IGNORED.match(k) or "attn_mask" in k or "relative_position_index" in k:
            ignored.append(k)
        else:
            ours[f"body.{k}"] = v
    return ours, ignored, naming


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> BackboneLoadReport:
    """Load ``path`` (see module doc) into ``backbone`` (a :class:`ResNet` or :class:`SwinBackbone`).

    Raises:
        FileNotFoundError: the file does not exist (message names ``model.backbone.weights``).
        ValueError: a parameter of the backbone is missing from the file, or a shape differs.
    """
    raw = read_state_dict(path, config_key="model.backbone.weights")
    expected = backbone.state_dict()
    if isinstance(backbone, SwinBackbone):
        ours, ignored, naming = _swin_state(raw, backbone)
    elif isinstance(backbone, ResNet):
        ours, ignored, namings = {}, [], set()
        for k, v in raw.items():
            new, naming = resnet_key_to_ours(k)
            beyond = new is not None and new.startswith("res") and int(new[3]) > backbone.last_stage
            if new is None or _IGNORED.search(k) or beyond:  # beyond: a stage this (truncated) ResNet does not build
                ignored.append(k)
                continue
            ours[new] = v
            namings.add(naming)
        naming = "+".join(sorted(namings)) or "unknown"
    else:
        raise TypeError(f"cannot load backbone weights into {type(backbone).__name__}")
    report = BackboneLoadReport(path=str(path), naming=naming, ignored=sorted(ignored))
    unexpected = sorted(k for k in ours if k not in expected)
    missing, optional = [], []
    for k in expected:
        if k in ours:
            continue
        owner = backbone.get_submodule(k.rsplit(".", 1)[0]) if "." in k else backbone
        is_stat = k.endswith(("running_mean", "running_var", "num_batches_tracked"))
        if k.endswith("num_batches_tracked") or (is_stat and isinstance(owner, FrozenBatchNorm2d)):
            optional.append(k)
        elif "attn_mask" in k or "relative_position_index" in k or k.startswith("out_norms."):
            optional.append(k)  # buffers / the detection Swin's output norms (absent from ImageNet files)
        else:
            missing.append(k)
    bad_shape = [
        f"{k}: file {list(ours[k].shape)} vs model {list(expected[k].shape)}"
        for k in ours
        if k in expected and ours[k].shape != expected[k].shape
    ]
    if missing or unexpected or bad_shape:
        lines = [f"model.backbone.weights: '{path}' ({naming} naming) does not fit the backbone"]
        if missing:
            lines.append(f"  missing {len(missing)}: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        if unexpected:
            lines.append(f"  unexpected {len(unexpected)}: {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
        if bad_shape:
            lines.append(f"  shape mismatch {len(bad_shape)}: {bad_shape[:5]}")
        raise ValueError("\n".join(lines))
    state = {k: v.to(expected[k].dtype) for k, v in ours.items()}
    backbone.load_state_dict(state, strict=False)
    report.loaded = sorted(state)
    report.missing_optional = sorted(optional)
    return report
