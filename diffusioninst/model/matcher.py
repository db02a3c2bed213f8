"""Dynamic-k (SimOTA-style) label assignment of DiffusionDet, one image at a time.

For N predictions and G ground-truth boxes of one image:

* candidates: ``in_boxes[n, g]`` = prediction centre strictly inside GT g; ``in_centers[n, g]`` = centre
  within ``gt_centre +- radius * (gt_w, gt_h)``; ``fg[n] = any_g in_boxes | any_g in_centers``;
* cost ``= l1_w * L1(pred/whwh, gt/whwh) + cls_w * focal_cost + giou_w * (-GIoU) + outside_center_cost *
  ~(in_boxes & in_centers)``, plus ``not_candidate_cost`` on rows with ``~fg``; ``cls_w`` is the loss's
  ``class_weight`` unless ``matcher_class_weight`` is set (the official code has one weight for both);
* GT g takes its ``k_g = max(1, int(sum of its top-ota_k IoUs))`` cheapest predictions (truncation, not
  rounding); a prediction claimed by several GTs keeps its cheapest GT (over ALL GTs); while a GT has no
  prediction, matched predictions get ``rematch_cost`` added and every unmatched GT takes its cheapest
  prediction; new conflicts are then resolved on the rows that conflicted before the loop (official quirk,
  ``stale_rematch_rows``) or on the rows that conflict now.

Output: one-to-many assignment ``selected`` bool [N] and ``gt_indices`` int64 [M] (GT of each selected
prediction, in prediction order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from diffusioninst.config.schema import LossConfig
from diffusioninst.model.box_ops import box_iou, cxcywh_to_xyxy, generalized_box_iou, xyxy_to_cxcywh

__all__ = ["DynamicKMatcher", "Match"]


@dataclass
class Match:
    """Assignment of one image. ``selected`` bool [N]; ``gt_indices`` int64 [M]; ``matched_query_per_gt`` [G]
    (cheapest matched prediction of each GT); the rest is kept for inspection."""

    selected: Tensor
    gt_indices: Tensor
    matched_query_per_gt: Tensor
    cost: Tensor | None = None
    ious: Tensor | None = None
    fg_mask: Tensor | None = None
    in_box_and_center: Tensor | None = None
    dynamic_ks: Tensor | None = None

    @staticmethod
    def empty(num_queries: int, device: torch.device) -> Match:
        e = torch.zeros(0, dtype=torch.int64, device=device)
        return Match(torch.zeros(num_queries, dtype=torch.bool, device=device), e, e)


class DynamicKMatcher:
    """Usable alone: ``DynamicKMatcher(cfg.model.loss, num_classes)(logits, boxes, gt_boxes, gt_labels, whwh)``."""

    def __init__(self, cfg: LossConfig):
        self.cfg = cfg

    def candidates(self, pred_xyxy: Tensor, gt_xyxy: Tensor) -> tuple[Tensor, Tensor]:
        """fg mask [N] and in_box_and_center [N, G] (the official round trip through cxcywh is kept)."""
        pred = xyxy_to_cxcywh(pred_xyxy)
        gt = xyxy_to_cxcywh(gt_xyxy)
        gt_xy = cxcywh_to_xyxy(gt)
        cx, cy = pred[:, 0:1], pred[:, 1:2]
        in_boxes = (cx > gt_xy[:, 0]) & (cx < gt_xy[:, 2]) & (cy > gt_xy[:, 1]) & (cy < gt_xy[:, 3])
        r = self.cfg.center_radius
        rw = r * (gt_xy[:, 2] - gt_xy[:, 0])
        rh = r * (gt_xy[:, 3] - gt_xy[:, 1])
        in_centers = (cx > gt[:, 0] - rw) & (cx < gt[:, 0] + rw) & (cy > gt[:, 1] - rh) & (cy < gt[:, 1] + rh)
        fg = in_boxes.any(1) | in_centers.any(1)
        return fg, in_boxes & in_centers

    def cost_matrix(
        self, logits: Tensor, pred_xyxy: Tensor, gt_xyxy: Tensor, gt_labels: Tensor, whwh: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Returns (cost [N, G], ious [N, G], fg [N], in_box_and_center [N, G])."""
        c = self.cfg
        fg, in_box_center = self.candidates(pred_xyxy, gt_xyxy)
        ious = box_iou(pred_xyxy, gt_xyxy)
        prob = logits.sigmoid()[:, gt_labels]
        a, g = c.focal_alpha, c.focal_gamma
        neg = (1 - a) * (prob**g) * (-(1 - prob + 1e-8).log())
        pos = a * ((1 - prob) ** g) * (-(prob + 1e-8).log())
        cost_class = pos - neg
        cost_bbox = torch.cdist(pred_xyxy / whwh, gt_xyxy / whwh, p=1)
        cost_giou = -generalized_box_iou(pred_xyxy, gt_xyxy)
        w_class = c.class_weight if c.matcher_class_weight is None else c.matcher_class_weight
        cost = c.l1_weight * cost_bbox + w_class * cost_class + c.giou_weight * cost_giou
        cost = cost + c.outside_center_cost * (~in_box_center)
        cost[~fg] = cost[~fg] + c.not_candidate_cost
        return cost, ious, fg, in_box_center

    def assign(self, cost: Tensor, ious: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Dynamic-k assignment on a cost [N, G] and IoU [N, G] matrix.

        Returns (selected bool [N], gt_indices [M], matched_query_per_gt [G], dynamic_ks int32 [G]).
        """
        cost = cost.clone()
        n, g = cost.shape
        matching = torch.zeros_like(cost)
        topk_ious = torch.topk(ious, min(self.cfg.ota_k, n), dim=0).values
        ks = torch.clamp(topk_ious.sum(0).int(), min=1)
        kmax = int(ks.max())
        order = torch.topk(cost, kmax, dim=0, largest=False).indices  # [kmax, G], cheapest first
        take = torch.arange(kmax, device=cost.device)[:, None] < ks[None, :]
        cols = torch.arange(g, device=cost.device).expand(kmax, g)
        matching[order[take], cols[take]] = 1.0

        stale = matching.sum(1) > 1
        if stale.any():
            self._keep_cheapest(matching, cost, stale)
        for _ in range(n + g + 1):  # terminates in a few rounds unless N < G; bounded for safety
            unmatched = matching.sum(0) == 0
            if not unmatched.any():
                break
            cost[matching.sum(1) > 0] += self.cfg.rematch_cost
            cols_u = torch.nonzero(unmatched).squeeze(1)
            matching[cost[:, cols_u].argmin(0), cols_u] = 1.0
            if (matching.sum(1) > 1).any():
                rows = stale if self.cfg.stale_rematch_rows else matching.sum(1) > 1
                self._keep_cheapest(matching, cost, rows)
        selected = matching.sum(1) > 0
        gt_indices = matching[selected].max(1)[1]
        cost[matching == 0] = cost[matching == 0] + float("inf")
        matched_query_per_gt = torch.min(cost, dim=0)[1]
        return selected, gt_indices, matched_query_per_gt, ks

    @staticmethod
    def _keep_cheapest(matching: Tensor, cost: Tensor, rows: Tensor) -> None:
        _, argmin = torch.min(cost[rows], dim=1)
        matching[rows] *= 0
        matching[rows, argmin] = 1

    @torch.no_grad()
    def __call__(
        self,
        logits: Tensor,
        pred_xyxy: Tensor,
        gt_xyxy: Tensor,
        gt_labels: Tensor,
        whwh: Tensor,
        keep_debug: bool = False,
    ) -> Match:
        """Match one image: logits [N, K], pred_xyxy [N, 4] abs, gt_xyxy [G, 4] abs, gt_labels [G], whwh [4]."""
        if gt_xyxy.shape[0] == 0:
            return Match.empty(logits.shape[0], logits.device)
        cost, ious, fg, ibc = self.cost_matrix(logits, pred_xyxy, gt_xyxy, gt_labels, whwh)
        selected, gt_indices, per_gt, ks = self.assign(cost, ious)
        if not keep_debug:
            return Match(selected, gt_indices, per_gt)
        return Match(selected, gt_indices, per_gt, cost, ious, fg, ibc, ks)
