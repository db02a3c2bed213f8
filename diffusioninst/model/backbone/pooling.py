"""The ResNet stem's 3x3 / stride 2 / padding 1 max-pool, faster on CPU for NCHW tensors, same results.

PyTorch's CPU kernel for NCHW ``max_pool2d`` scans each window with scalar compares and also writes the
argmax indices. On the AVX-512 Xeon of docs/model.md, one thread, it took 21 ms for the demo's
[4, 32, 160, 160] stem output (3-4% of a demo training step) and 100 ms for R50's [1, 64, 400, 608] at
800x1216 (about 4% of R50's backbone + FPN forward). :func:`stem_max_pool` computes the same thing in two
ways:

* no gradient needed (inference, or a frozen stem as in the COCO recipes): the 3x3 maximum is taken over three
  rows, then over three columns, each a few vectorised ``torch.maximum`` over strided views (2.8 / 20 ms);
* gradient needed (a trainable stem, as in the demo): PyTorch's own channels-last kernel, which is
  vectorised over channels, gives the same values and the same argmax indices as the NCHW kernel (the
  first maximum in row-major window order). The backward is then PyTorch's NCHW max-pool backward with
  those indices, so the gradient is bit-identical too (7.7 + 1.5 ms against 19-21 + 1.5 ms for the
  demo's shape; for R50's shape the layout change costs as much as it saves, but R50's stem is frozen).

Other inputs (CUDA, channels-last, integer dtypes, empty tensors) go to ``F.max_pool2d``.
``tests/test_backbone.py`` checks values and gradients against ``F.max_pool2d`` bit for bit, ties included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["stem_max_pool"]

_KERNEL, _STRIDE, _PADDING, _DILATION = [3, 3], [2, 2], [1, 1], [1, 1]


def _max3_stride2(x: Tensor, dim: int) -> Tensor:
    """Max over input positions {2i-1, 2i, 2i+1} that lie in [0, L) along ``dim``: size L -> ceil(L / 2).

    Equals a 1-D max-pool with kernel 3, stride 2, padding 1 along ``dim`` (the padding never wins).
    """
    length = x.shape[dim]
    n_out, n_pairs = (length + 1) // 2, length // 2
    index = (slice(None),) * dim
    even = x[index + (slice(0, None, 2),)]  # positions 2i, i < n_out
    odd = x[index + (slice(1, None, 2),)]  # positions 2i + 1, i < n_pairs
    out = torch.empty_like(even)
    torch.maximum(even.narrow(dim, 0, n_pairs), odd, out=out.narrow(dim, 0, n_pairs))
    if n_pairs < n_out:  # odd length: the last window has no 2i + 1
        out.narrow(dim, n_pairs, n_out - n_pairs).copy_(even.narrow(dim, n_pairs, n_out - n_pairs))
    tail = out.narrow(dim, 1, n_out - 1)  # windows i >= 1 also see 2i - 1 (= odd position i - 1)
    torch.maximum(tail, odd.narrow(dim, 0, n_out - 1), out=tail)
    return out


def _separable_max_pool(x: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, C, ceil(H/2), ceil(W/2)]: rows first (contiguous reads), then columns."""
    return _max3_stride2(_max3_stride2(x, 2), 3)


class _ChannelsLastMaxPool(torch.autograd.Function):
    """Forward through the channels-last kernel, backward through the NCHW one with the same indices."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        out, indices = torch.ops.aten.max_pool2d_with_indices(
            x.contiguous(memory_format=torch.channels_last), _KERNEL, _STRIDE, _PADDING, _DILATION, False
        )
        indices = indices.contiguous()  # flat h * W + w per plane, as the NCHW kernel writes them
        ctx.save_for_backward(x, indices)
        return out.contiguous()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:
        x, indices = ctx.saved_tensors
        return torch.ops.aten.max_pool2d_with_indices_backward(
            grad.contiguous(), x, _KERNEL, _STRIDE, _PADDING, _DILATION, False, indices
        )


def stem_max_pool(x: Tensor) -> Tensor:
    """``F.max_pool2d(x, kernel_size=3, stride=2, padding=1)`` for x [B, C, H, W]; the same values and
    gradient, faster on CPU for contiguous NCHW floating-point tensors (see the module docstring)."""
    fast = x.device.type == "cpu" and x.dim() == 4 and x.is_floating_point() and x.is_contiguous() and x.numel() > 0
    if not fast:
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    if x.requires_grad and torch.is_grad_enabled():
        return _ChannelsLastMaxPool.apply(x)
    return _separable_max_pool(x)
