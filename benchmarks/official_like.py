"""The official implementation's order of work, rebuilt from our modules, for same-machine speed comparisons.

The official code (detectron2-based) cannot be installed here, so its timings in
``../shared/reference/targets.md`` come from one machine on one day. To compare on whatever machine the
benchmark runs on, :func:`official_like_training` patches a model (in this process, until the context exits)
so that a training iteration does the work the way the official code does it, with the same results:

* RoI pooling as detectron2's ``ROIPooler``: a zero tensor filled level by level with ``output[inds] =
  roi_align(level, boxes)`` (torchvision's kernel, aligned), back-propagated by autograd (torchvision's CPU
  RoIAlign backward, a per-sample scatter into a dense gradient per level and stage) instead of our sparse
  product and per-level gradient sink;
* the DynamicConv parameters sliced from the Linear's output (``params[:, :P]``, ``params[:, P:]``), whose
  backward zero-fills and adds two [R, 2P] gradients, instead of our split Linear;
* the dynamic mask head of the dice loss as 1x1 grouped convolutions over F_mask repeated once per matched
  proposal (``mask_heads_forward``), instead of batched matrix products on the shared F_mask.

:func:`compare_with_ours` checks that both orders of work give the same losses and gradients on a model.

What it does NOT reproduce, so that it underestimates the official time: glibc's default malloc thresholds
(the process keeps ``host.keep_freed_memory`` for both paths; the official code does not raise them, and on
some hosts every fresh page costs a fault per iteration), the matcher's loop over GT boxes (ours is
vectorised; with 3 GT boxes the difference is small), and detectron2's own Python overheads.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

from diffusioninst.model import GeneratorNoise
from diffusioninst.model.pooler import MultiLevelRoIAlign

__all__ = ["compare_with_ours", "losses_and_grads", "official_like_training"]


class _Detectron2Pooler:
    """detectron2 ``ROIPooler`` semantics over our level assignment: features per level [B, C, H, W],
    boxes [B, N, 4] abs xyxy -> [B*N, C, S, S] (image-major), autograd through torchvision's roi_align."""

    def __init__(self, ours: MultiLevelRoIAlign):
        self.ours = ours

    def gradient_sink(self, features: list[Tensor]) -> None:
        return None  # autograd sums the stages' dense gradients, as in the official code

    def __call__(self, features: list[Tensor], boxes: Tensor, sink=None) -> Tensor:
        p = self.ours
        rois, levels = p.rois_and_levels(boxes, len(features))
        c = features[0].shape[1]
        out = features[0].new_zeros((rois.shape[0], c, p.output_size, p.output_size))
        for level, (x, scale) in enumerate(zip(features, p.scales)):
            inds = torch.nonzero(levels == level).squeeze(1)
            pooled = roi_align(x, rois[inds], p.output_size, scale, p.sampling_ratio, aligned=True)
            out = out.index_put((inds,), pooled)  # detectron2: output[inds] = pooler(x, boxes)
        return out


def _sliced_dynamic_conv(self, pro: Tensor, roi: Tensor) -> Tensor:
    """The official DynamicConv: the two parameter sets sliced out of one Linear output."""
    params = self.dynamic_layer(pro)
    param1 = params[:, : self.num_params].reshape(-1, self.hidden_dim, self.dim_dynamic)
    param2 = params[:, self.num_params :].reshape(-1, self.dim_dynamic, self.hidden_dim)
    x = F.relu(self.norm1(torch.bmm(roi, param1)))
    x = F.relu(self.norm2(torch.bmm(x, param2)))
    x = self.out_layer(x.flatten(1))
    return F.relu(self.norm3(x))


class _GroupedConvMaskHead:
    """The official ``mask_heads_forward``: F_mask [C, H, W] repeated per instance, grouped 1x1 convs."""

    def __init__(self, ours):
        self.ours = ours

    def __call__(self, features: Tensor, params: Tensor) -> Tensor:
        m = params.shape[0]
        x = features[None].repeat(1, m, 1, 1)  # [1, M*C, H, W]
        layers = self.ours.parse(params)
        for k, (w, b) in enumerate(layers):
            x = F.conv2d(x, w.reshape(-1, w.shape[-1], 1, 1), b.reshape(-1), groups=m)
            if k < len(layers) - 1:
                x = F.relu(x)
        return x.reshape(m, *features.shape[1:])


@contextlib.contextmanager
def official_like_training(model) -> Iterator[None]:
    """Within the block, ``model``'s training forward/backward does the official order of work (module docstring)."""
    head, criterion = model.head, model.criterion
    pooler, mask_head = head.pooler, criterion.mask_head
    convs = [stage.dynamic_conv for stage in head.stages]
    head.pooler = _Detectron2Pooler(pooler)
    criterion.mask_head = _GroupedConvMaskHead(mask_head)
    for conv in convs:
        conv.forward = types.MethodType(_sliced_dynamic_conv, conv)
    try:
        yield
    finally:
        head.pooler, criterion.mask_head = pooler, mask_head
        for conv in convs:
            del conv.forward


def losses_and_grads(model, images, sizes, targets, seed: int, record: dict | None = None):
    """One training forward + backward (gradients cleared first; image i draws ``GeneratorNoise(seed + i)``):
    ``({loss name: detached loss}, {parameter name: cloned gradient})``."""
    model.zero_grad(set_to_none=True)
    noise = [GeneratorNoise(seed + i) for i in range(len(targets))]
    losses = model(images, sizes, targets, noise=noise, record=record)
    sum(losses.values()).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


def compare_with_ours(model, images, sizes, targets) -> dict:
    """Losses and gradients of one training step, ours against the official order of work (same weights and
    noise; ``model`` in train mode, gradients cleared afterwards). Errors are relative to the official-order
    values: the largest over loss terms, and the L2 error of all gradients together."""
    ours_l, ours_g = losses_and_grads(model, images, sizes, targets, seed=7)
    with official_like_training(model):
        off_l, off_g = losses_and_grads(model, images, sizes, targets, seed=7)
    model.zero_grad(set_to_none=True)
    loss_err = max(float((ours_l[k] - off_l[k]).abs() / off_l[k].abs().clamp_min(1e-12)) for k in off_l)
    same_params = sorted(ours_g) == sorted(off_g)
    shared = [n for n in off_g if n in ours_g]
    flat_ours = torch.cat([ours_g[n].flatten() for n in shared])
    flat_off = torch.cat([off_g[n].flatten() for n in shared])
    grad_err = float((flat_ours - flat_off).norm() / flat_off.norm())
    return {
        "loss_terms": len(off_l),
        "max_loss_rel_error": loss_err,
        "grad_rel_l2_error": grad_err,
        "same_parameters_with_gradient": same_params,
        "identical_up_to_rounding": loss_err < 1e-5 and grad_err < 1e-4 and same_params,
    }
