"""One stage of the DiffusionDet dynamic head (official ``RCNNHead``), plus its DynamicConv.

Per stage, for B images x N proposals (d = hidden_dim):

1. self-attention among the N proposal features of each image (``nn.MultiheadAttention``, seq-first),
   residual + LayerNorm;
2. DynamicConv: the proposal feature generates two matrices ([d, dd] and [dd, d]) applied to its own
   7x7 RoI features, then a Linear over the flattened 49*d features; residual + LayerNorm -> obj features;
3. FFN, residual + LayerNorm;
4. time FiLM: ``x * (scale + 1) + shift`` from ``SiLU -> Linear(4d, 2d)`` of the time embedding;
5. classification branch -> class logits [K]; regression branch -> box deltas (weights (2,2,1,1)) and the
   dynamic-mask ``controller`` (the mask filter parameters come from the regression feature).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusioninst.model.box_ops import apply_deltas

__all__ = ["DynamicConv", "HeadStage"]

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "glu": F.glu}


class _SplitLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias).split(size, dim=1)`` whose backward needs no concatenation.

    x [R, d], weight [P, d], bias [P] or None -> parts [R, size] (P = parts x size). Autograd's split backward
    would first concatenate the parts' gradients into one [R, P] tensor (R50: 65 MB per stage) for the
    Linear's backward; here each part's weight gradient is written straight into its rows of the [P, d]
    gradient, and the input gradient is the sum of the parts' products. Equal to the plain backward up to
    float summation order.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, size: int) -> tuple[Tensor, ...]:
        ctx.save_for_backward(x, weight)
        ctx.size = size
        ctx.has_bias = bias is not None
        return tuple(F.linear(x, weight, bias).split(size, dim=1))

    @staticmethod
    def backward(ctx, *grads: Tensor | None):
        x, weight = ctx.saved_tensors
        size = ctx.size
        grads = [g if g is not None else x.new_zeros(x.shape[0], size) for g in grads]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(grads[0], weight[:size])
            for k, g in enumerate(grads[1:], start=1):
                grad_x.addmm_(g, weight[k * size : (k + 1) * size])
        if ctx.needs_input_grad[1]:
            grad_w = torch.empty_like(weight)
            for k, g in enumerate(grads):
                torch.mm(g.t(), x, out=grad_w[k * size : (k + 1) * size])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = torch.cat([g.sum(0) for g in grads])
        return grad_x, grad_w, grad_b, None


class DynamicConv(nn.Module):
    """Instance interaction: pro [R, d], roi [R, S*S, d] -> [R, d] (R = B*N proposals)."""

    def __init__(self, hidden_dim: int, dim_dynamic: int, num_dynamic: int, pooler_resolution: int):
        super().__init__()
        if num_dynamic != 2:
            raise ValueError(f"model.head.num_dynamic must be 2 (the dynamic conv has two layers), got {num_dynamic}")
        self.hidden_dim = hidden_dim
        self.dim_dynamic = dim_dynamic
        self.num_params = hidden_dim * dim_dynamic
        self.dynamic_layer = nn.Linear(hidden_dim, num_dynamic * self.num_params)
        self.norm1 = nn.LayerNorm(dim_dynamic)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.out_layer = nn.Linear(hidden_dim * pooler_resolution**2, hidden_dim)
        self.norm3 = nn.LayerNorm(hidden_dim)

    def forward(self, pro: Tensor, roi: Tensor) -> Tensor:
        # split, not two slices (whose backward zero-fills the [N, 2 * num_params] gradient twice and adds: R50
        # training ~5% of the iteration), and a split whose backward does not concatenate either
        # (CPU float only: on GPU the concatenation is cheap, and under autocast the plain ops keep its casts)
        layer = self.dynamic_layer
        if pro.device.type == "cpu" and not torch.is_autocast_enabled("cpu"):
            first, second = _SplitLinear.apply(pro, layer.weight, layer.bias, self.num_params)
        else:
            first, second = layer(pro).split(self.num_params, dim=1)
        param1 = first.view(-1, self.hidden_dim, self.dim_dynamic)
        param2 = second.view(-1, self.dim_dynamic, self.hidden_dim)
        x = F.relu(self.norm1(torch.bmm(roi, param1)))
        x = F.relu(self.norm2(torch.bmm(x, param2)))
        x = self.out_layer(x.flatten(1))
        return F.relu(self.norm3(x))


def _branch(d: int, blocks: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Linear(d, d, bias=False), nn.LayerNorm(d), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class HeadStage(nn.Module):
    """One refinement stage. See the module docstring for the computation."""

    def __init__(
        self,
        hidden_dim: int,
        num_classes: int,
        num_mask_params: int,
        dim_feedforward: int = 2048,
        nheads: int = 8,
        dropout: float = 0.0,
        activation: str = "relu",
        num_cls: int = 1,
        num_reg: int = 3,
        dim_dynamic: int = 64,
        num_dynamic: int = 2,
        pooler_resolution: int = 7,
        bbox_weights: tuple[float, ...] = (2.0, 2.0, 1.0, 1.0),
        scale_clamp: float = 11.512925464970229,
    ):
        super().__init__()
        d = hidden_dim
        self.hidden_dim = d
        self.self_attn = nn.MultiheadAttention(d, nheads, dropout=dropout)
        self.dynamic_conv = DynamicConv(d, dim_dynamic, num_dynamic, pooler_resolution)
        self.linear1 = nn.Linear(d, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d)
        self.norm1 = nn.LayerNorm(d)
        self.norm2 = nn.LayerNorm(d)
        self.norm3 = nn.LayerNorm(d)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = _ACTIVATIONS[activation]
        self.time_proj = nn.Sequential(nn.SiLU(), nn.Linear(d * 4, d * 2))
        self.cls_branch = _branch(d, num_cls)
        self.reg_branch = _branch(d, num_reg)
        self.class_logits = nn.Linear(d, num_classes)
        self.bbox_delta = nn.Linear(d, 4)
        self.controller = nn.Linear(d, num_mask_params)
        self.bbox_weights = tuple(bbox_weights)
        self.scale_clamp = scale_clamp

    def forward(
        self, roi: Tensor, boxes: Tensor, pro: Tensor | None, time_emb: Tensor, shared_time: bool = False
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """
        Args:
            roi: [B*N, d, S, S] pooled features of ``boxes`` (image-major).
            boxes: [B, N, 4] abs xyxy input boxes (float32 or float64).
            pro: [B, N, d] proposal features from the previous stage, or None (stage 0: mean of ``roi``).
            time_emb: [B, 4d] time embedding.
            shared_time: all rows of ``time_emb`` are equal (projected once and repeated).
        Returns:
            class logits [B, N, K], boxes [B, N, 4] abs xyxy (float32), obj features [B, N, d],
            mask params [B, N, num_mask_params].
        """
        b, n = boxes.shape[:2]
        d = self.hidden_dim
        roi = roi.view(b * n, d, -1)
        if pro is None:
            pro = roi.view(b, n, d, -1).mean(-1)
        roi = roi.permute(0, 2, 1)  # [B*N, S*S, d]

        x = pro.reshape(b, n, d).permute(1, 0, 2)  # [N, B, d]
        attn = self.self_attn(x, x, value=x)[0]  # need_weights=True: the official (explicit softmax) path
        x = self.norm1(x + self.dropout1(attn))
        x = x.permute(1, 0, 2).reshape(b * n, d)

        x = self.norm2(x + self.dropout2(self.dynamic_conv(x, roi)))
        x = self.norm3(x + self.dropout3(self.linear2(self.dropout(self.activation(self.linear1(x))))))
        obj = x

        film = self.time_proj(time_emb[:1]).expand(b, -1) if shared_time else self.time_proj(time_emb)
        scale, shift = film.repeat_interleave(n, dim=0).chunk(2, dim=1)
        fc = x * (scale + 1) + shift
        cls_feat = self.cls_branch(fc)
        reg_feat = self.reg_branch(fc)
        logits = self.class_logits(cls_feat)
        deltas = self.bbox_delta(reg_feat)
        kernels = self.controller(reg_feat)
        pred = apply_deltas(deltas, boxes.reshape(-1, 4), self.bbox_weights, self.scale_clamp)
        return logits.view(b, n, -1), pred.view(b, n, 4), obj.view(b, n, d), kernels.view(b, n, -1)
