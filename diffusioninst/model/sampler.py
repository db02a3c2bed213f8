"""DDIM sampling over boxes with box renewal and step ensembling (official ``ddim_sample``), batched.

Per image (signal space = cxcywh normalized, ``* 2 - 1``, ``* scale``):

1. ``img = randn(1, N, 4)``; for each ``(t, t_next)`` of :func:`~diffusioninst.model.diffusion.ddim_time_pairs`:
2. head on ``signal_to_xyxy_abs(img)`` at time t; ``x0`` = last-stage boxes back in signal space (clamped);
   ``eps = (sqrt(1/ac_t) img - x0) / sqrt(1/ac_t - 1)``;
3. box renewal: keep proposals whose max class score > ``renewal_threshold``;
4. last step: stop (its predictions are not ensembled unless ``ensemble_last_step``);
5. otherwise ``img = x0 sqrt(ac_next) + c eps + sigma randn_like(img)`` on the kept ones, then append
   ``randn(1, N - kept, 4)`` fresh boxes; with several steps, the step's top-N (score, label) pairs over
   all N*K scores join the ensemble.
6. ensemble (or the final step's top-N) -> class-wise NMS -> :class:`Detections` (masks are rendered later).

With ``sampler.batched`` the B images share each head forward; renewal keeps a different number of boxes
per image, which is handled per image (index bookkeeping) between forwards, so results equal B
single-image runs with the same per-image noise sources.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from diffusioninst.config.schema import SamplerConfig
from diffusioninst.model.box_ops import signal_to_xyxy_abs, xyxy_abs_to_signal
from diffusioninst.model.diffusion import ddim_time_pairs
from diffusioninst.model.noise import NoiseSource
from diffusioninst.model.structures import Detections, Encoded

__all__ = ["ddim_sample", "select_detections", "topk_candidates"]


def topk_candidates(logits: Tensor, boxes: Tensor, kernels: Tensor, k: int) -> dict[str, Tensor]:
    """Top-k (score, class) pairs over the N*K sigmoid scores of one image (``topk(sorted=False)``, as official).

    logits [N, K], boxes [N, 4], kernels [N, P] -> boxes [k, 4], scores [k], labels [k], kernels [k, P];
    a proposal appears once per selected class.
    """
    num_classes = logits.shape[1]
    scores, idx = torch.sigmoid(logits).flatten().topk(min(k, logits.numel()), sorted=False)
    proposal = torch.div(idx, num_classes, rounding_mode="floor")
    return {"boxes": boxes[proposal], "scores": scores, "labels": idx % num_classes, "kernels": kernels[proposal]}


def select_detections(cands: dict[str, Tensor], cfg: SamplerConfig, trace: dict | None = None) -> dict[str, Tensor]:
    """Class-wise NMS (``batched_nms``, kept sorted by decreasing score) and the optional cap on detections."""
    if cfg.use_nms:
        keep = batched_nms(cands["boxes"], cands["scores"], cands["labels"], cfg.nms_iou)
        if trace is not None:
            trace["nms"] = {**{k: v for k, v in cands.items() if k != "kernels"}, "keep": keep}
    else:
        keep = torch.argsort(cands["scores"], descending=True, stable=True)
    if cfg.max_detections is not None:
        keep = keep[: cfg.max_detections]
    return {k: v[keep] for k, v in cands.items()}


@torch.no_grad()
def ddim_sample(
    model, encoded: Encoded, cfg: SamplerConfig, noises: list[NoiseSource], record: bool = False
) -> list[Detections]:
    """Sample detections for every image of ``encoded`` (see module doc). ``noises``: one source per image."""
    if len(noises) != len(encoded):
        raise ValueError(f"need one noise source per image: {len(noises)} for {len(encoded)} images")
    if cfg.batched:
        return _sample(model, encoded, cfg, noises, record)
    out: list[Detections] = []
    for i in range(len(encoded)):
        out += _sample(model, encoded.select(i), cfg, [noises[i]], record)
    return out


def _sample(model, enc: Encoded, cfg: SamplerConfig, noises: list[NoiseSource], record: bool) -> list[Detections]:
    schedule = model.schedule
    scale = schedule.scale
    n = cfg.num_proposals or model.num_proposals
    b = len(enc)
    device = enc.mask_feat.device
    whwh = enc.whwh.to(device)
    pairs = ddim_time_pairs(schedule.timesteps, cfg.steps)
    imgs = [noise.randn((1, n, 4)).to(device)[0] for noise in noises]
    members: list[list[dict[str, Tensor]]] = [[] for _ in range(b)]
    traces: list[dict | None] = [{"steps": [], "members": [], "head": []} if record else None for _ in range(b)]
    final: list[dict[str, Tensor]] = []
    use_ensemble = cfg.ensemble and cfg.steps > 1
    for t, t_next in pairs:
        x = torch.stack(imgs)  # [B, N, 4]
        tt = torch.full((b,), t, dtype=torch.long, device=device)
        head_trace = {} if record else None
        out = model.head(enc.features, signal_to_xyxy_abs(x, whwh, scale), tt, trace=head_trace)
        x0 = xyxy_abs_to_signal(out["boxes"][-1], whwh, scale)
        eps = schedule.predict_noise(x, tt, x0)
        last = t_next < 0
        for i in range(b):
            logits, boxes, kernels = out["logits"][-1][i], out["boxes"][-1][i], out["kernels"][-1][i]
            keep = torch.ones(n, dtype=torch.bool, device=device)
            max_score = torch.sigmoid(logits).max(-1).values
            if cfg.box_renewal:
                keep = max_score > cfg.renewal_threshold
            if traces[i] is not None:
                traces[i]["head"].append(_slice_trace(head_trace, i))
                traces[i]["steps"].append(
                    {"time": t, "x_t": x[i], "pred_x_start": x0[i], "pred_noise": eps[i]}
                    | {"max_score": max_score, "keep": keep}
                )
            if not last:
                img, x0_i, eps_i = x[i][keep], x0[i][keep], eps[i][keep]
                z = noises[i].randn_like(img[None])[0]
                img = schedule.ddim_step(x0_i, eps_i, z, t, t_next, cfg.eta)
                if cfg.box_renewal:
                    fresh = noises[i].randn((1, n - int(keep.sum()), 4)).to(device)[0]
                    img = torch.cat((img, fresh), dim=0)
                imgs[i] = img
            if use_ensemble and (not last or cfg.ensemble_last_step):
                members[i].append(topk_candidates(logits, boxes, kernels, n))
            elif last and not use_ensemble:
                members[i].append(topk_candidates(logits, boxes, kernels, n))
    for i in range(b):
        cands = {k: torch.cat([m[k] for m in members[i]]) for k in members[i][0]}
        if traces[i] is not None:
            traces[i]["members"] = members[i]
        final.append(select_detections(cands, cfg, traces[i]))
    sizes = enc.image_sizes.tolist()
    return [
        Detections(
            boxes=f["boxes"],
            scores=f["scores"],
            labels=f["labels"],
            kernels=f["kernels"],
            mask_feat=enc.mask_feat[i],
            image_size=(int(sizes[i][0]), int(sizes[i][1])),
            trace=traces[i],
            mask_head=model.mask_head,
        )
        for i, f in enumerate(final)
    ]


def _slice_trace(trace: dict | None, i: int) -> dict | None:
    """Image ``i`` of a head trace (``roi`` is image-major [B*N, d, S, S])."""
    if trace is None:
        return None
    stages = []
    for s in trace["stages"]:
        n = s["in_boxes"].shape[1]
        stages.append({k: (v[i * n : (i + 1) * n] if k == "roi" else v[i]) for k, v in s.items()})
    return {"time_emb": trace["time_emb"][i], "stages": stages}
