"""Normalisation layers for the convolutional backbone.

``FrozenBatchNorm2d`` reproduces detectron2's: a per-channel affine with fixed statistics. Like detectron2 it
computes ``x * scale + bias`` when the input needs a gradient and ``F.batch_norm(training=False)`` otherwise
(the two differ in the last float bit, so parity needs the same choice).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FrozenBatchNorm2d", "NormConv2d", "freeze_batchnorm", "make_norm"]

NORMS = ("frozen_bn", "bn", "sync_bn", "gn", "none")


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed affine parameters and statistics (buffers, never trained). x: [B, C, H, W]."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def forward(self, x: Tensor) -> Tensor:
        if x.requires_grad:
            scale = self.weight * (self.running_var + self.eps).rsqrt()
            bias = self.bias - self.running_mean * scale
            return x * scale.reshape(1, -1, 1, 1).to(x.dtype) + bias.reshape(1, -1, 1, 1).to(x.dtype)
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, training=False, eps=self.eps
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        # torchvision/detectron2 BN checkpoints carry num_batches_tracked; a frozen BN has no use for it.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    @classmethod
    def from_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm) -> FrozenBatchNorm2d:
        frozen = cls(bn.num_features, bn.eps)
        if bn.affine:
            frozen.weight.copy_(bn.weight.detach())
            frozen.bias.copy_(bn.bias.detach())
        if bn.track_running_stats:
            frozen.running_mean.copy_(bn.running_mean)
            frozen.running_var.copy_(bn.running_var)
        return frozen


def make_norm(kind: str, channels: int) -> nn.Module:
    """Build a normalisation layer: ``frozen_bn | bn | sync_bn | gn | none`` (gn = 32 groups, as detectron2)."""
    if kind == "frozen_bn":
        return FrozenBatchNorm2d(channels)
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "sync_bn":
        return nn.SyncBatchNorm(channels)
    if kind == "gn":
        return nn.GroupNorm(32 if channels % 32 == 0 else 1, channels)
    if kind in ("none", ""):
        return nn.Identity()
    raise ValueError(f"unknown norm '{kind}'; expected one of {NORMS}")


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d/SyncBatchNorm inside ``module`` by a FrozenBatchNorm2d (in place); returns it."""
    if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        return FrozenBatchNorm2d.from_batchnorm(module)
    for name, child in module.named_children():
        new = freeze_batchnorm(child)
        if new is not child:
            setattr(module, name, new)
    return module


class NormConv2d(nn.Conv2d):
    """Conv2d followed by an optional norm held as ``.norm`` (detectron2 layout: ``conv.weight``, ``conv.norm.*``).

    x: [B, C_in, H, W] -> [B, C_out, H', W']. Activation is applied by the caller.
    """

    def __init__(self, *args, norm: nn.Module | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm if norm is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(super().forward(x))
