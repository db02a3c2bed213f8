"""Set criterion of DiffusionInst (DETR style: one method per loss term, dispatched by name).

Per supervised stage (the last one, then every auxiliary stage i with suffix ``_i``), each with its own
dynamic-k matching:

* ``loss_ce``: sigmoid focal loss over all B x N x K logits (one-hot targets for matched predictions),
  divided by M = number of MATCHED predictions in the batch (1 if none) -- not by the number of GT;
* ``loss_bbox``: L1 between matched predicted boxes / (w, h, w, h) and normalized GT xyxy, / M;
* ``loss_giou``: sum of (1 - GIoU) over matched pairs, / M;
* ``loss_masks``: dice loss of the dynamic mask head's stride-4 logits against the GT mask sampled at
  ``[2::4, 2::4]`` of the padded image, ``mask_weight * sum / M``.

Weighted terms: ce x class_weight, bbox x l1_weight, giou x giou_weight; the mask weight is inside
``loss_masks`` (official). If nothing is matched in the batch, the box and mask terms are ``0 * sum(...)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from diffusioninst.config.schema import LossConfig
from diffusioninst.model.box_ops import cxcywh_to_xyxy, paired_generalized_box_iou
from diffusioninst.model.dynamic_mask_head import DynamicMaskHead
from diffusioninst.model.matcher import DynamicKMatcher, Match
from diffusioninst.model.noise import NoiseSource

__all__ = ["SetCriterion", "dice_loss", "federated_classes"]


def dice_loss(probs: Tensor, target: Tensor, eps: float = 1e-5) -> Tensor:
    """Per-instance dice loss ``1 - 2 sum(p t) / (sum(p^2) + sum(t^2) + eps)``: [M, ...] x [M, ...] -> [M]."""
    p = probs.reshape(probs.shape[0], -1)
    t = target.reshape(target.shape[0], -1)
    inter = (p * t).sum(dim=1)
    union = (p**2.0).sum(dim=1) + (t**2.0).sum(dim=1) + eps
    return 1.0 - (2 * inter / union)


def federated_classes(
    gt_classes: Tensor, num_classes: int, num_sampled: int, weight: Tensor, noise: NoiseSource
) -> Tensor:
    """Classes used by the federated loss (detectron2 ``get_fed_loss_classes``).

    ``gt_classes`` holds a label per prediction, ``num_classes`` meaning background. Keeps the unique
    classes present and, while fewer than ``num_sampled``, adds negatives drawn without replacement with
    probability proportional to ``weight`` (class frequency ^ power). The draw is a Gumbel top-k on
    ``log(weight)`` (same distribution as ``torch.multinomial``), its uniforms taken from ``noise`` as
    ``Phi(randn)`` so every random number goes through the noise source.
    """
    unique = torch.unique(gt_classes)
    if len(unique) >= num_sampled:
        return unique
    prob = weight.float().clone().to(gt_classes.device)
    fg = unique[unique < num_classes]
    prob[fg] = 0
    u = 0.5 * (1 + torch.erf(noise.randn((num_classes,)).double().to(prob.device) / 2**0.5))
    gumbel = -torch.log(-torch.log(u.clamp(1e-12, 1 - 1e-12)))
    keys = torch.where(prob > 0, torch.log(prob.double().clamp_min(1e-300)) + gumbel, torch.tensor(-float("inf")))
    count = min(num_sampled - len(unique), int((prob > 0).sum()))
    sampled = torch.topk(keys, count).indices
    return torch.cat([unique, sampled])


class SetCriterion(nn.Module):
    """Losses of all supervised stages.

    Args:
        cfg: ``model.loss``.
        num_classes: K.
        mask_head: the dynamic mask head (shared with inference).
    """

    def __init__(self, cfg: LossConfig, num_classes: int, mask_head: DynamicMaskHead):
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.mask_head = mask_head
        self.matcher = DynamicKMatcher(cfg)
        self.weights = {"loss_ce": cfg.class_weight, "loss_bbox": cfg.l1_weight, "loss_giou": cfg.giou_weight}

    # --- one method per term -------------------------------------------------------------------
    def loss_labels(self, out: dict, targets: list[dict], matches: list[Match], ctx: dict) -> dict[str, Tensor]:
        logits = out["logits"]  # [B, N, K]
        b, n, k = logits.shape
        onehot = torch.zeros((b, n, k + 1), dtype=logits.dtype, device=logits.device)
        onehot[..., k] = 1
        num = 0
        for i, (t, m) in enumerate(zip(targets, matches)):
            if len(m.gt_indices) == 0:
                continue
            onehot[i, m.selected] = 0
            onehot[i, m.selected, t["labels"][m.gt_indices]] = 1
            num += len(m.gt_indices)
        num = num if num > 0 else 1
        gt_classes = onehot.argmax(-1)
        loss = sigmoid_focal_loss(
            logits.flatten(0, 1), onehot[..., :k].flatten(0, 1), self.cfg.focal_alpha, self.cfg.focal_gamma, "none"
        )
        if self.cfg.use_fed_loss:
            freq = ctx.get("class_weight")
            if freq is None:
                raise ValueError("model.loss.use_fed_loss needs the class-frequency vector (set_fed_loss_frequencies)")
            classes = federated_classes(gt_classes, k, self.cfg.fed_loss_num_classes, freq, ctx["noise"])
            keep = torch.zeros(k + 1, device=logits.device)
            keep[classes] = 1
            loss = loss * keep[:k].view(1, k)
        return {"loss_ce": loss.sum() / num}

    def loss_boxes(self, out: dict, targets: list[dict], matches: list[Match], ctx: dict) -> dict[str, Tensor]:
        boxes = out["boxes"]  # [B, N, 4]
        src, src_norm, tgt_cxcywh, tgt_xyxy = [], [], [], []
        for i, (t, m) in enumerate(zip(targets, matches)):
            if len(m.gt_indices) == 0:
                continue
            src.append(boxes[i][m.selected])
            src_norm.append(boxes[i][m.selected] / t["whwh"])
            tgt_cxcywh.append(t["boxes_cxcywh_norm"][m.gt_indices])
            tgt_xyxy.append(t["boxes"][m.gt_indices])
        if not src:
            zero = self._zero(out)
            return {"loss_bbox": zero, "loss_giou": zero}
        src_t, num = torch.cat(src), sum(len(s) for s in src)
        l1 = F.l1_loss(torch.cat(src_norm), cxcywh_to_xyxy(torch.cat(tgt_cxcywh)), reduction="none")
        giou = 1 - paired_generalized_box_iou(src_t, torch.cat(tgt_xyxy))
        return {"loss_bbox": l1.sum() / num, "loss_giou": giou.sum() / num}

    def loss_masks(self, out: dict, targets: list[dict], matches: list[Match], ctx: dict) -> dict[str, Tensor]:
        total, num = None, 0
        for i, (t, m) in enumerate(zip(targets, matches)):
            if len(m.gt_indices) == 0:
                continue
            logits = self.mask_head(out["mask_feat"][i], out["kernels"][i][m.selected])
            dice = dice_loss(logits.sigmoid(), t["masks_s4"][m.gt_indices], self.cfg.dice_eps)
            if ctx.get("debug") is not None:
                ctx["debug"].setdefault("dice", []).append({"mask_logits": logits, "per_instance": dice})
            total = dice.sum() if total is None else total + dice.sum()
            num += len(m.gt_indices)
        if total is None:
            return {"loss_masks": self._zero(out)}
        return {"loss_masks": total / num * self.cfg.mask_weight}

    @staticmethod
    def _zero(out: dict) -> Tensor:
        zero = out["boxes"].sum() * 0
        if "kernels" in out:  # keep every mask parameter in the graph (DDP); still exactly 0
            zero = zero + out["kernels"].sum() * 0 + out["mask_feat"].sum() * 0
        return zero

    # --- driver --------------------------------------------------------------------------------
    def forward(
        self,
        outputs: dict[str, Tensor],
        targets: list[dict[str, Tensor]],
        noise: NoiseSource | None = None,
        class_weight: Tensor | None = None,
        debug: dict | None = None,
    ) -> dict[str, Tensor]:
        """Raw (unweighted) losses.

        Args:
            outputs: ``logits`` [S, B, N, K], ``boxes`` [S, B, N, 4] abs xyxy, ``kernels`` [S, B, N, P],
                ``mask_feat`` [B, C, Hm, Wm].
            targets: per image ``labels`` [G], ``boxes`` [G, 4] abs xyxy, ``boxes_cxcywh_norm`` [G, 4],
                ``whwh`` [4], ``masks_s4`` float [G, Hm, Wm] (GT masks sampled at stride 4).
            noise: source for the federated loss's class sampling.
            class_weight: [K] class frequency ^ power (federated loss only).
            debug: if a dict, per-stage matches and dice values are stored in it.
        Returns:
            ``loss_ce, loss_bbox, loss_giou, loss_masks`` (last stage) and ``..._i`` for auxiliary stage i.
        """
        num_stages = outputs["logits"].shape[0]
        order = [num_stages - 1] + (list(range(num_stages - 1)) if self.cfg.deep_supervision else [])
        ctx = {"noise": noise, "class_weight": class_weight, "debug": debug}
        losses: dict[str, Tensor] = {}
        for s in order:
            out = {
                "logits": outputs["logits"][s],
                "boxes": outputs["boxes"][s],
                "kernels": outputs["kernels"][s],
                "mask_feat": outputs["mask_feat"],
            }
            matches = [
                self.matcher(out["logits"][i], out["boxes"][i], t["boxes"], t["labels"], t["whwh"], debug is not None)
                for i, t in enumerate(targets)
            ]
            if debug is not None:
                debug.setdefault("matches", []).append(matches)
            suffix = "" if s == num_stages - 1 else f"_{s}"
            terms = [self.loss_labels, self.loss_boxes]
            if s == num_stages - 1 or self.cfg.aux_mask_loss:
                terms.append(self.loss_masks)
            for term in terms:
                for key, value in term(out, targets, matches, ctx).items():
                    losses[key + suffix] = value
        return losses

    def weighted(self, losses: dict[str, Tensor]) -> dict[str, Tensor]:
        """Multiply ce/bbox/giou terms (any suffix) by their weights; ``loss_masks*`` already carry theirs."""
        out = {}
        for key, value in losses.items():
            base = key.rsplit("_", 1)[0] if key.rsplit("_", 1)[-1].isdigit() else key
            out[key] = value * self.weights[base] if base in self.weights else value
        return out
