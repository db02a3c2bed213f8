"""DiffusionInst: the whole model (encoder, diffusion training, DDIM sampling, rendering).

Frames: ``images`` are RGB 0..255 [B, 3, Hp, Wp], zero-padded bottom/right; ``image_sizes`` (h, w) are the
unpadded network-input sizes; boxes are absolute xyxy in that frame unless said otherwise. The model
normalises ``(x - mean) / std`` and then zeroes the padding (official: pad with 0 after normalisation),
padding further to a multiple of ``size_divisibility`` if needed.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from diffusioninst.config.schema import ModelConfig, SamplerConfig
from diffusioninst.model.backbone import build_backbone, build_fpn
from diffusioninst.model.box_ops import xyxy_to_cxcywh
from diffusioninst.model.criterion import SetCriterion
from diffusioninst.model.diffusion import DiffusionSchedule
from diffusioninst.model.dynamic_mask_head import DynamicMaskHead
from diffusioninst.model.head import DynamicHead, official_head_init
from diffusioninst.model.inputs import check_images, check_targets
from diffusioninst.model.mask_branch import MaskBranch
from diffusioninst.model.noise import NoiseSource, noise_sources
from diffusioninst.model.postprocess import postprocess
from diffusioninst.model.sampler import ddim_sample
from diffusioninst.model.structures import Detections, Encoded

__all__ = ["DiffusionInst"]

Noise = NoiseSource | Sequence[NoiseSource] | None


class DiffusionInst(nn.Module):
    """See the module docstring; build with :func:`diffusioninst.model.build_model`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg)
        self.fpn = build_fpn(cfg, self.backbone)
        levels = cfg.mask.in_features
        self.mask_branch = MaskBranch(
            cfg.fpn.out_channels,
            num_levels=len(levels),
            branch_channels=cfg.mask.branch_channels,
            num_convs=cfg.mask.num_convs,
            mask_channels=cfg.mask.mask_channels,
            norm=cfg.mask.norm,
        )
        self.mask_head = DynamicMaskHead(cfg.mask.mask_channels, cfg.mask.head_channels, cfg.mask.head_layers)
        strides = [self.fpn.strides[n] for n in cfg.head.in_features]
        self.head = DynamicHead(cfg, strides, self.mask_head.num_params)
        official_head_init(
            [self.head, self.mask_branch], cfg.head.num_classes, cfg.loss.prior_prob, cfg.head.prior_init_by_shape
        )
        self.schedule = DiffusionSchedule(cfg.diffusion)
        self.criterion = SetCriterion(cfg.loss, cfg.head.num_classes, self.mask_head)
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("fed_loss_weight", None, persistent=False)
        if cfg.channels_last:
            for module in (self.backbone, self.fpn, self.mask_branch):
                module.to(memory_format=torch.channels_last)

    @property
    def num_proposals(self) -> int:
        return self.cfg.head.num_proposals

    @property
    def num_classes(self) -> int:
        return self.cfg.head.num_classes

    def set_fed_loss_frequencies(self, class_freq: Tensor) -> None:
        """Per-class image counts [K] for the federated loss; stored as ``freq ** fed_loss_freq_weight_power``."""
        if class_freq.shape != (self.num_classes,):
            raise ValueError(f"class frequencies must be [{self.num_classes}], got {list(class_freq.shape)}")
        weight = class_freq.float() ** self.cfg.loss.fed_loss_freq_weight_power
        self.fed_loss_weight = weight.to(self.pixel_mean.device)

    # --- encoder --------------------------------------------------------------------------------
    def preprocess(self, images: Tensor, image_sizes: Tensor) -> Tensor:
        """uint8/float RGB [B, 3, Hp, Wp] -> normalized float32 [B, 3, Hp', Wp'] (padding = 0, multiple of 32)."""
        check_images(images, image_sizes)
        x = (images.to(self.pixel_mean.device, torch.float32) - self.pixel_mean) / self.pixel_std
        div = self.cfg.size_divisibility
        hp, wp = x.shape[-2:]
        ph, pw = (-hp) % div, (-wp) % div
        if ph or pw:
            x = nn.functional.pad(x, (0, pw, 0, ph))
        sizes = image_sizes.tolist()
        for i, (h, w) in enumerate(sizes):
            if h < x.shape[-2]:
                x[i, :, h:, :] = 0
            if w < x.shape[-1]:
                x[i, :, :, w:] = 0
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _encode(self, x: Tensor, image_sizes: Tensor) -> Encoded:
        feats = self.backbone(x)
        fpn = self.fpn([feats[n] for n in self.cfg.fpn.in_features])
        names = self.cfg.head.in_features
        sink = self.head.pooler.gradient_sink([fpn[n] for n in names])
        if sink is not None:
            # CPU training: wrapped before the mask branch reads them, so the sink's backward receives the mask
            # branch's gradient of each level too and adds the RoIAlign one to it in that gradient's (NCHW)
            # layout; the FPN convs' backward then needs no layout copy and autograd no separate sum
            fpn = {**fpn, **dict(zip(names, sink.wrap([fpn[n] for n in names])))}
        mask_feat = self.mask_branch([fpn[n] for n in self.cfg.mask.in_features])
        return Encoded(
            features=[fpn[n] for n in names],
            mask_feat=mask_feat,
            image_sizes=image_sizes.to(torch.int64),
            fpn=fpn,
            sink=sink,
        )

    def encode(self, images: Tensor, image_sizes: Tensor) -> Encoded:
        """Backbone + FPN + mask features, once per image (no grad). Use with :meth:`sample`."""
        with torch.no_grad():
            return self._encode(self.preprocess(images, image_sizes), image_sizes)

    # --- inference ------------------------------------------------------------------------------
    def sample(
        self, encoded: Encoded, sampler_cfg: SamplerConfig | None = None, noise: Noise = None, record: bool = False
    ) -> list[Detections]:
        """DDIM sampling (see :mod:`diffusioninst.model.sampler`); call repeatedly with other ``steps`` on one encoding.

        ``noise``: None = fresh generators (seeded ``sampler_cfg.seed + i`` when set), one source per image,
        or a single source (used by every image in turn).
        """
        cfg = sampler_cfg or SamplerConfig()
        return ddim_sample(self, encoded, cfg, noise_sources(noise, len(encoded), cfg.seed), record=record)

    def render(
        self, det: Detections, output_size: tuple[int, int] | None = None, mask_threshold: float = 0.5
    ) -> dict[str, Tensor]:
        """:func:`~diffusioninst.model.postprocess.postprocess` with this model's mask head."""
        return postprocess(det, det.image_size, output_size, mask_threshold, mask_head=self.mask_head)

    def predict(
        self,
        images: Tensor,
        image_sizes: Tensor,
        output_sizes: Tensor | Sequence[Sequence[int]] | None = None,
        sampler_cfg: SamplerConfig | None = None,
        noise: Noise = None,
    ) -> list[dict[str, Tensor]]:
        """encode + sample + postprocess: per image ``boxes/scores/labels/masks`` in the output frame."""
        cfg = sampler_cfg or SamplerConfig()
        encoded = self.encode(images, image_sizes)
        dets = self.sample(encoded, cfg, noise)
        outs = image_sizes.tolist() if output_sizes is None else [list(map(int, s)) for s in output_sizes]
        return [self.render(d, tuple(o), cfg.mask_threshold) for d, o in zip(dets, outs)]

    # --- training -------------------------------------------------------------------------------
    def prepare_targets(
        self, targets: list[dict[str, Tensor]], image_sizes: Tensor, mask_grid: tuple[int, int]
    ) -> list[dict]:
        """Validate and convert targets (boxes clipped to the image; empty boxes dropped with a warning)."""
        device = self.pixel_mean.device
        check_targets(targets, image_sizes, self.num_classes)
        out = []
        for i, (t, (h, w)) in enumerate(zip(targets, image_sizes.tolist())):
            whwh = torch.tensor([w, h, w, h], dtype=torch.float32, device=device)
            boxes = t["boxes"].to(device, torch.float32)
            clipped = torch.stack(
                [boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)], 1
            )
            keep = ((clipped[:, 2] - clipped[:, 0]) > 0) & ((clipped[:, 3] - clipped[:, 1]) > 0)
            if not bool(keep.all()):
                warnings.warn(
                    f"targets[{i}]: dropped {int((~keep).sum())} instance(s) whose box is empty inside the image",
                    stacklevel=2,
                )
            boxes = clipped[keep]
            masks = t["masks"][keep.to(t["masks"].device)].to(device)
            out.append(
                {
                    "labels": t["labels"].to(device, torch.int64)[keep],
                    "boxes": boxes,
                    "boxes_cxcywh_norm": xyxy_to_cxcywh(boxes / whwh),
                    "whwh": whwh,
                    "masks_s4": _masks_at_stride4(masks, mask_grid),
                }
            )
        return out

    def forward(
        self,
        images: Tensor,
        image_sizes: Tensor,
        targets: list[dict[str, Tensor]] | None = None,
        noise: Noise = None,
        class_freq: Tensor | None = None,
        record: dict | None = None,
    ) -> dict[str, Tensor]:
        """Training losses (WEIGHTED; the total loss is their sum), keyed ``loss_ce, loss_bbox, loss_giou,
        loss_masks`` (last stage) and ``loss_ce_0, ...`` (auxiliary stage i).

        Args:
            images, image_sizes: see the module docstring.
            targets: per image ``boxes`` float32 [G, 4] abs xyxy, ``labels`` int64 [G], ``masks`` uint8/bool
                [G, h, w] (unpadded; the padded size is accepted too). G may be 0 (a fake GT is diffused).
            noise: None (fresh generator), one source, or one per image.
            class_freq: [K] class image counts for the federated loss (overrides ``set_fed_loss_frequencies``).
            record: if a dict, intermediate tensors (corruption, head, matching, raw losses) are stored in it.
        """
        if targets is None:
            raise ValueError("DiffusionInst.forward computes training losses and needs targets; use predict() to infer")
        x = self.preprocess(images, image_sizes)
        enc = self._encode(x, image_sizes)
        prepared = self.prepare_targets(targets, image_sizes, tuple(enc.mask_feat.shape[-2:]))
        sources = noise_sources(noise, len(prepared))
        corrupted = [
            self.schedule.corrupt(t["boxes_cxcywh_norm"], self.num_proposals, src) for t, src in zip(prepared, sources)
        ]
        whwh = torch.stack([t["whwh"] for t in prepared])
        boxes = torch.stack([c.boxes_norm_xyxy for c in corrupted]) * whwh[:, None, :]
        t = torch.cat([c.t for c in corrupted])
        head_trace = {} if record is not None else None
        out = self.head(enc.features, boxes, t, trace=head_trace, sink=enc.sink)
        out["mask_feat"] = enc.mask_feat
        weight = (
            self.fed_loss_weight
            if class_freq is None
            else class_freq.float() ** self.cfg.loss.fed_loss_freq_weight_power
        )
        debug = {} if record is not None else None
        raw = self.criterion(out, prepared, noise=sources[0], class_weight=weight, debug=debug)
        if record is not None:
            record.update(encoded=enc, targets=prepared, corrupted=corrupted, head=head_trace, outputs=out, raw=raw)
            record.update(debug)
        return self.criterion.weighted(raw)


def _masks_at_stride4(masks: Tensor, grid: tuple[int, int]) -> Tensor:
    """GT masks [G, h, w] -> float [G, Hm, Wm]: the padded mask sampled at ``[2::4, 2::4]``, ``> 0.5``."""
    hm, wm = grid
    sampled = masks[:, 2::4, 2::4][:, :hm, :wm].float()
    pad = (0, wm - sampled.shape[-1], 0, hm - sampled.shape[-2])
    return nn.functional.pad(sampled, pad).gt(0.5).float()
