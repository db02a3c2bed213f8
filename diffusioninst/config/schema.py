"""Typed configuration of every part of diffusioninst.

One dataclass per concern; :class:`ExperimentConfig` is the root that YAML files under ``experiments/``
fill in. Defaults reproduce the official R50 COCO recipe (``diffinst.coco.res50.inst.yaml``); where the
official code hard-codes a constant it is a named field here, with the official value as its default.

Coordinate conventions used in help texts: boxes are ``xyxy`` in absolute pixels unless a field says
otherwise; "signal space" is the diffusion space ``(cxcywh_normalized * 2 - 1) * signal_scale``.

Cross-field rules live in each class's ``check()`` method, which returns ``(key, message)`` pairs; the
loader reports them with the file that set the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from diffusioninst.config.fields import option, section

Problem = tuple[str, str]

RESNET_DEPTHS = (18, 34, 50, 101, 152)


@dataclass
class BackboneConfig:
    name: str = option(
        "resnet50",
        help="backbone architecture: resnet18/34/50/101/152 (detectron2-style ResNet) or a timm Swin name "
        "(swin_base_patch4_window7_224, swin_base_patch4_window12_384, swin_large_patch4_window12_384, ...)",
    )
    weights: str | None = option(
        None,
        help="local path of backbone weights (torchvision/timm/detectron2 .pth/.pkl/.safetensors); "
        "nothing is downloaded; null = random init",
    )
    freeze_at: int = option(
        2, min=0, max=5, help="freeze the stem (1) and res2..res(freeze_at) stages; 0 trains everything"
    )
    norm: Literal["frozen_bn", "bn", "sync_bn", "gn"] = option(
        "frozen_bn", help="ResNet normalisation; frozen_bn as detectron2 FrozenBatchNorm2d"
    )
    stem_out_channels: int = option(64, min=1, help="ResNet stem width (detectron2 STEM_OUT_CHANNELS)")
    res2_out_channels: int | None = option(
        None,
        min=1,
        help="ResNet res2 output width, doubling per stage (RES2_OUT_CHANNELS); null = 64 (R18/34) or 256",
    )
    width_per_group: int = option(64, min=1, help="bottleneck width at res2 per group (WIDTH_PER_GROUP)")
    num_groups: int = option(1, min=1, help="bottleneck groups (ResNeXt when > 1)")
    stride_in_1x1: bool = option(False, help="put the stride on the 1x1 conv (MSRA style) instead of the 3x3")
    res5_dilation: int = option(1, choices=(1, 2), help="dilation of res5 (2 keeps stride 16)")
    drop_path_rate: float = option(0.0, min=0.0, max=1.0, help="stochastic depth for Swin backbones")


@dataclass
class FPNConfig:
    out_channels: int = option(256, min=1, help="FPN width; must equal model.head.hidden_dim")
    in_features: list[str] = option(["res2", "res3", "res4", "res5"], min_len=1, help="backbone stages fed to the FPN")
    norm: Literal["", "gn", "bn"] = option("", help="FPN normalisation ('' = none, as official)")
    top_block: Literal["maxpool", "none"] = option(
        "maxpool", help="p6 = max_pool2d(p5, 1, stride 2) (computed but unused by the head)"
    )


@dataclass
class HeadConfig:
    num_classes: int = option(80, min=1, help="number of object classes (sigmoid scores, no background)")
    num_proposals: int = option(500, min=1, help="N noisy boxes in training and sampling (NUM_PROPOSALS)")
    hidden_dim: int = option(256, min=1, help="head width d (HIDDEN_DIM)")
    nheads: int = option(8, min=1, help="self-attention heads among proposals")
    dim_feedforward: int = option(2048, min=1, help="FFN width")
    dropout: float = option(0.0, min=0.0, max=1.0, help="dropout in the head")
    activation: Literal["relu", "gelu", "glu"] = option("relu", help="FFN activation")
    num_cls: int = option(1, min=0, help="Linear-LN-ReLU blocks in the classification branch")
    num_reg: int = option(3, min=0, help="Linear-LN-ReLU blocks in the regression branch")
    num_stages: int = option(6, min=1, help="cascaded dynamic-head stages (official NUM_HEADS)")
    num_dynamic: int = option(
        2, choices=(2,), help="DynamicConv layers (NUM_DYNAMIC); the official DynamicConv only works with 2"
    )
    dim_dynamic: int = option(64, min=1, help="DynamicConv inner width (DIM_DYNAMIC)")
    in_features: list[str] = option(["p2", "p3", "p4", "p5"], min_len=1, help="FPN levels for RoIAlign")
    pooler_resolution: int = option(7, min=1, help="RoIAlign output size")
    pooler_sampling_ratio: int = option(2, min=0, help="RoIAlign sampling ratio")
    bbox_weights: list[float] = option(
        [2.0, 2.0, 1.0, 1.0], min_len=4, min=0.0, min_exclusive=True, help="box-delta weights (wx,wy,ww,wh)"
    )
    scale_clamp: float = option(11.512925464970229, min=0.0, help="clamp of dw/dh before exp; log(1e5/16) as official")
    canonical_box_size: float = option(
        224.0, min=0.0, min_exclusive=True, help="RoI level assignment: box size mapped to canonical_level"
    )
    canonical_level: int = option(4, min=0, help="RoI level assignment: level of a canonical_box_size box")
    prior_init_by_shape: bool = option(
        True,
        help="official init quirk: the focal prior bias is written into EVERY parameter whose last dim equals "
        "num_classes (e.g. bbox_delta.bias when num_classes == 4); False = only class_logits.bias",
    )


@dataclass
class MaskConfig:
    in_features: list[str] = option(
        ["p2", "p3", "p4"], min_len=1, help="FPN levels fused by the mask branch (official: p2,p3,p4)"
    )
    branch_channels: int = option(128, min=1, help="mask-branch width")
    num_convs: int = option(4, min=0, help="3x3 conv+BN+ReLU blocks in the mask tower")
    mask_channels: int = option(8, min=1, help="channels of the mask features F_mask (stride 4)")
    head_channels: int = option(8, min=1, help="channels of the dynamic mask head's hidden layers")
    head_layers: int = option(3, min=1, help="1x1 conv layers in the dynamic mask head")
    norm: Literal["bn", "sync_bn", "gn", "none"] = option("bn", help="mask-branch normalisation")


@dataclass
class DiffusionConfig:
    timesteps: int = option(1000, min=1, help="T, diffusion timesteps")
    signal_scale: float = option(2.0, min=0.0, min_exclusive=True, help="box signal scale (SNR_SCALE)")
    cosine_s: float = option(0.008, min=0.0, help="offset s of the cosine schedule")
    train_t_min: int = option(
        0,
        min=0,
        help="training draws t ~ randint(train_t_min, timesteps) (official 0); a larger value spends the training "
        "on the noisier boxes that few-step sampling starts from",
    )
    gt_padding: Literal["concat", "repeat"] = option(
        "concat",
        help="fill the N training proposals with the G GT boxes plus random placeholders ('concat', official) "
        "or with copies of the GT boxes, N // G or N // G + 1 each ('repeat', DiffusionDet's other strategy)",
    )
    pad_box_mean: float = option(0.5, help="mean of the random placeholder boxes (normalized cxcywh) padding the GT")
    pad_box_std: float = option(1.0 / 6.0, min=0.0, help="std of the placeholder boxes (official 1/6: 3 sigma = 1/2)")
    pad_box_min_wh: float = option(1e-4, min=0.0, help="placeholder boxes' w, h are clipped to at least this")
    empty_gt_box: list[float] = option(
        [0.5, 0.5, 1.0, 1.0], min_len=4, help="fake GT (normalized cxcywh) diffused for images without instances"
    )

    def check(self) -> list[Problem]:
        if self.train_t_min >= self.timesteps:
            return [("model.diffusion.train_t_min", f"must be < model.diffusion.timesteps ({self.timesteps})")]
        return []


@dataclass
class LossConfig:
    class_weight: float = option(2.0, min=0.0, help="focal classification loss and matcher cost weight")
    matcher_class_weight: float | None = option(
        None, min=0.0, help="matcher class-cost weight when it should differ from the loss's (None = class_weight)"
    )
    l1_weight: float = option(5.0, min=0.0, help="L1 box loss and matcher cost weight")
    giou_weight: float = option(2.0, min=0.0, help="GIoU loss and matcher cost weight")
    mask_weight: float = option(
        5.0, min=0.0, help="dice mask loss weight lambda (official: hard-coded 5 in loss_masks)"
    )
    focal_alpha: float = option(0.25, min=0.0, max=1.0, help="focal loss alpha")
    focal_gamma: float = option(2.0, min=0.0, help="focal loss gamma")
    prior_prob: float = option(
        0.01, min=0.0, max=1.0, min_exclusive=True, help="initial foreground probability (class bias)"
    )
    deep_supervision: bool = option(True, help="losses on every stage, not only the last")
    aux_mask_loss: bool = option(
        True, help="dice loss on auxiliary stages too (official quirk: the intended skip never triggers)"
    )
    ota_k: int = option(5, min=1, help="top-k IoUs summed to get each GT's dynamic k")
    center_radius: float = option(2.5, min=0.0, help="matcher center prior radius in units of GT size")
    outside_center_cost: float = option(
        100.0,
        min=0.0,
        help="matcher cost added where a prediction's center is not in both the GT box and its center region",
    )
    not_candidate_cost: float = option(
        10000.0, min=0.0, help="matcher cost added to predictions whose center is in no GT box or center region"
    )
    rematch_cost: float = option(
        100000.0, min=0.0, help="matcher cost added to already-matched predictions when an unmatched GT is re-assigned"
    )
    stale_rematch_rows: bool = option(
        True,
        help="official quirk: conflicts created while re-assigning unmatched GTs are resolved on the rows that "
        "conflicted BEFORE the loop; False = on the rows that conflict now",
    )
    dice_eps: float = option(1e-5, min=0.0, help="epsilon in the dice denominator")
    use_fed_loss: bool = option(False, help="LVIS federated loss (sampled classes per image)")
    fed_loss_num_classes: int = option(50, min=1, help="classes sampled by the federated loss")
    fed_loss_freq_weight_power: float = option(0.5, min=0.0, help="class-frequency power for fed-loss sampling")


@dataclass
class ModelConfig:
    backbone: BackboneConfig = section(BackboneConfig, help="image encoder")
    fpn: FPNConfig = section(FPNConfig, help="feature pyramid p2-p6")
    head: HeadConfig = section(HeadConfig, help="DiffusionDet dynamic head")
    mask: MaskConfig = section(MaskConfig, help="mask branch and dynamic mask head")
    diffusion: DiffusionConfig = section(DiffusionConfig, help="box diffusion")
    loss: LossConfig = section(LossConfig, help="set criterion and matcher")
    pixel_mean: list[float] = option([123.675, 116.28, 103.53], min_len=3, help="RGB pixel mean (0-255)")
    pixel_std: list[float] = option(
        [58.395, 57.12, 57.375], min_len=3, min=0.0, min_exclusive=True, help="RGB pixel std (0-255)"
    )
    size_divisibility: int = option(32, min=1, help="pad images to a multiple of this")
    channels_last: bool = option(
        False, help="run the convolutional encoder (backbone, FPN, mask branch) in channels_last memory format"
    )
    weights: str | None = option(None, help="whole-model weights to load (ours or a converted official file)")

    def check(self) -> list[Problem]:
        problems: list[Problem] = []
        if self.fpn.out_channels != self.head.hidden_dim:
            problems.append(("model.head.hidden_dim", f"must equal model.fpn.out_channels ({self.fpn.out_channels})"))
        if self.head.hidden_dim % self.head.nheads:
            problems.append(("model.head.nheads", f"must divide model.head.hidden_dim ({self.head.hidden_dim})"))
        levels = {f"p{i}" for i in range(2, 7)}
        for key, names in (
            ("model.head.in_features", self.head.in_features),
            ("model.mask.in_features", self.mask.in_features),
        ):
            bad = [n for n in names if n not in levels]
            if bad:
                problems.append((key, f"unknown FPN levels {bad}; allowed: {sorted(levels)}"))
        if self.mask.in_features and self.mask.in_features[0] != "p2":
            problems.append(("model.mask.in_features", "must start with p2 (mask features are at stride 4)"))
        name = self.backbone.name
        if name.startswith("resnet"):
            digits = name[len("resnet") :]
            if not digits.isdigit() or int(digits) not in RESNET_DEPTHS:
                problems.append(("model.backbone.name", f"unknown ResNet '{name}'; depths {RESNET_DEPTHS}"))
        elif not name.startswith("swin"):
            problems.append(("model.backbone.name", f"'{name}' is neither resnetNN nor a timm swin_* model"))
        return problems


@dataclass
class SamplerConfig:
    steps: int = option(1, min=1, help="DDIM sampling steps at inference (SAMPLE_STEP)")
    num_proposals: int | None = option(
        None,
        min=1,
        help="noise boxes sampled per image at inference (null = model.head.num_proposals, as official; "
        "DiffusionDet's 'dynamic boxes': any count works, more boxes find more objects)",
    )
    eta: float = option(1.0, min=0.0, max=1.0, help="DDIM eta (official 1.0; 0 = deterministic)")
    box_renewal: bool = option(True, help="replace low-score boxes with fresh noise between steps")
    renewal_threshold: float = option(0.5, min=0.0, max=1.0, help="max class score a box needs to be kept")
    ensemble: bool = option(True, help="merge the predictions of every step before NMS (steps > 1)")
    ensemble_last_step: bool = option(
        False, help="also ensemble the last step (the official code drops it); improvement, default off"
    )
    use_nms: bool = option(True, help="class-wise NMS on the (ensembled) detections")
    nms_iou: float = option(0.5, min=0.0, max=1.0, help="NMS IoU threshold")
    max_detections: int | None = option(
        None, min=1, help="keep at most this many detections per image after NMS (null = all, as official)"
    )
    batched: bool = option(False, help="sample B images in one forward (the official code only does B=1); improvement")
    mask_threshold: float = option(0.5, min=0.0, max=1.0, help="mask probability threshold")
    seed: int | None = option(None, help="seed of the sampler's noise generator (null = nondeterministic)")


@dataclass
class SplitConfig:
    images: str | None = option(
        None, help="image folder (LVIS: the folder holding train2017/ val2017/, or the images themselves)"
    )
    annotations: str | None = option(None, help="COCO/LVIS instances JSON")
    parquet: str | None = option(None, help="folder of Parquet shards written by pipelines/preprocess.py")
    max_images: int | None = option(None, min=1, help="use only the first N images (by image id) for quick runs")


@dataclass
class SyntheticConfig:
    root: str = option("data_cache/synthetic", help="where generated datasets are cached (one subfolder per config)")
    num_train: int = option(400, min=1, help="training images")
    num_val: int = option(100, min=1, help="validation images")
    image_size: list[int] = option([320, 320], min_len=2, min=32, help="image height, width")
    num_classes: int = option(
        4, min=1, max=8, help="classes in order: rectangle, ellipse, triangle, star, cross, hexagon, arrow, crescent"
    )
    min_instances: int = option(2, min=0, help="fewest instances drawn per image (before occlusion drops)")
    max_instances: int = option(8, min=1, help="most instances drawn per image")
    min_object_size: int = option(24, min=4, help="smallest object extent (longer side of its box) in pixels")
    max_object_size: int = option(200, min=4, help="largest object extent in pixels")
    small_fraction: float = option(
        0.5, min=0.0, max=1.0, help="fraction of objects drawn with extent < 40 px (about COCO 'small', area < 32^2)"
    )
    min_visible_area: int = option(
        40, min=1, help="instances whose visible (unoccluded) area is below this many pixels are removed"
    )
    min_visible_fraction: float = option(
        0.25, min=0.0, max=1.0, help="instances with less than this fraction of their shape visible are removed"
    )
    class_distribution_power: float = option(
        0.0, min=0.0, help="class k is drawn with probability ~ (k+1)^-power (0 = uniform; >0 gives LVIS-like tails)"
    )
    jpeg_quality: int = option(92, min=1, max=100, help="JPEG quality of the written images")
    seed: int = option(0, help="generator seed (same seed, same files)")


@dataclass
class AugmentationConfig:
    min_size_train: list[int] = option(
        list(range(480, 801, 32)), min_len=1, min=1, help="shortest-edge choices in training (MIN_SIZE_TRAIN)"
    )
    max_size_train: int = option(1333, min=1, help="longest-edge cap in training")
    min_size_train_sampling: Literal["choice", "range"] = option(
        "choice", help="how the shortest edge is drawn: one of the list, or uniform in [first, last]"
    )
    flip: Literal["horizontal", "vertical", "none"] = option("horizontal", help="random flip, p=0.5")
    crop_enabled: bool = option(True, help="the official crop chain with probability crop_prob")
    crop_prob: float = option(0.5, min=0.0, max=1.0, help="probability of applying the crop chain")
    crop_resize: list[int] = option(
        [400, 500, 600], min_len=1, min=1, help="shortest-edge choices before cropping (no longest-edge cap)"
    )
    crop_type: Literal["absolute_range", "absolute", "relative", "relative_range"] = option(
        "absolute_range", help="detectron2 RandomCrop type"
    )
    crop_size: list[float] = option([384, 600], min_len=2, min=0.0, help="crop size range (h, w bounds)")
    min_size_test: int = option(800, min=1, help="shortest edge at test time")
    max_size_test: int = option(1333, min=1, help="longest-edge cap at test time")
    resize_backend: Literal["pil", "cv2"] = option(
        "pil",
        help="image resize: pil = bilinear as detectron2 (antialiased when shrinking); cv2 = faster, "
        "differs by <= 1 grey level when enlarging",
    )

    def check(self) -> list[Problem]:
        problems: list[Problem] = []
        if self.min_size_train_sampling == "range" and len(self.min_size_train) != 2:
            problems.append(("data.augmentation.min_size_train", "sampling 'range' needs exactly [low, high]"))
        if self.crop_type == "absolute_range" and self.crop_size[0] > self.crop_size[1]:
            problems.append(("data.augmentation.crop_size", "absolute_range needs crop_size[0] <= crop_size[1]"))
        if self.crop_type.startswith("relative") and any(not 0 < v <= 1 for v in self.crop_size[:2]):
            problems.append(("data.augmentation.crop_size", f"{self.crop_type} needs fractions in (0, 1]"))
        return problems


@dataclass
class DataConfig:
    format: Literal["synthetic", "coco", "lvis", "parquet"] = option("coco", help="dataset format")
    train: SplitConfig = section(SplitConfig, help="training split")
    val: SplitConfig = section(SplitConfig, help="validation split")
    synthetic: SyntheticConfig = section(SyntheticConfig, help="generated dataset (format: synthetic)")
    augmentation: AugmentationConfig = section(AugmentationConfig, help="training/test transforms")
    repeat_factor_threshold: float = option(
        0.0, min=0.0, help="LVIS repeat-factor sampling threshold t (official LVIS: 0.001; 0 = off)"
    )
    filter_empty: bool = option(
        False, help="drop training images without (non-crowd) annotations (official FILTER_EMPTY_ANNOTATIONS False)"
    )
    on_bad_record: Literal["error", "skip"] = option(
        "error", help="invalid images/annotations: stop with the full list, or skip and count them by reason"
    )
    loader: Literal["ray_data", "local"] = option(
        "ray_data", help="feed training through Ray Data shards or a per-worker local loader"
    )
    decode_workers: int = option(1, min=0, help="CPU workers for decoding/augmentation per training worker")
    prefetch_batches: int = option(2, min=0, help="batches prefetched by the loader")
    ray_cache_mb: int = option(
        512,
        min=0,
        help="Ray Data ingest: read a training split whose files total at most this many MiB into Ray's object "
        "store once instead of every epoch (0 = re-read every epoch)",
    )
    ray_scheduling_period_ms: float = option(
        10.0,
        min=0.0,
        help="Ray Data ingest: shortest step of its scheduling loop, so an idle loop does not spin (0 = Ray's own)",
    )
    cache_images_mb: int = option(
        512, min=0, help="keep decoded training images in memory when the split fits in this many MiB (0 = off)"
    )

    def check(self) -> list[Problem]:
        problems: list[Problem] = []
        if self.format in ("coco", "lvis"):
            for split in ("train", "val"):
                s: SplitConfig = getattr(self, split)
                if s.parquet is None and (s.images is None or s.annotations is None):
                    problems.append(
                        (
                            f"data.{split}",
                            f"format '{self.format}' needs {split}.images and {split}.annotations (or {split}.parquet)",
                        )
                    )
        if self.format == "parquet":
            for split in ("train", "val"):
                if getattr(self, split).parquet is None:
                    problems.append((f"data.{split}.parquet", "format 'parquet' needs a shard folder"))
        syn = self.synthetic
        if syn.min_instances > syn.max_instances:
            problems.append(("data.synthetic.min_instances", "must be <= data.synthetic.max_instances"))
        if syn.min_object_size > syn.max_object_size:
            problems.append(("data.synthetic.min_object_size", "must be <= data.synthetic.max_object_size"))
        if syn.max_object_size > min(syn.image_size):
            problems.append(("data.synthetic.max_object_size", f"must fit in the image ({min(syn.image_size)} px)"))
        return problems


@dataclass
class SolverConfig:
    optimizer: Literal["adamw"] = option("adamw", help="optimizer (official: AdamW, torch default betas)")
    base_lr: float = option(5e-5, min=0.0, min_exclusive=True, help="learning rate at ims_per_batch")
    weight_decay: float = option(1e-4, min=0.0, help="AdamW weight decay (applied to every parameter)")
    betas: list[float] = option([0.9, 0.999], min_len=2, min=0.0, max=1.0, help="AdamW betas")
    backbone_lr_multiplier: float = option(1.0, min=0.0, help="lr factor for backbone parameters")
    ims_per_batch: int = option(32, min=1, help="global batch size (summed over workers)")
    grad_accum_steps: int = option(1, min=1, help="micro-batches accumulated per optimizer step")
    max_iter: int = option(90000, min=1, help="optimizer steps")
    time_budget_min: float | None = option(
        None,
        min=0.0,
        min_exclusive=True,
        help="also stop after this many minutes of training (time before a resume counts); the lr steps then fall "
        "at steps[i] / max_iter of whichever of max_iter and the budget runs out first (null = iterations only)",
    )
    lr_schedule: Literal["multistep", "linear", "cosine"] = option(
        "multistep",
        help="multistep = official (x gamma at each of steps); linear / cosine = decay after warmup to "
        "lr_end_factor * base_lr at the end of the run (of the time budget when it binds first)",
    )
    steps: list[int] = option([60000, 80000], min=1, help="multistep: iterations at which lr is multiplied by gamma")
    gamma: float = option(0.1, min=0.0, help="multistep: lr decay factor at each step")
    lr_end_factor: float = option(0.0, min=0.0, max=1.0, help="linear / cosine: lr factor reached at the end")
    warmup_iters: int = option(1000, min=0, help="linear warmup length")
    warmup_factor: float = option(0.01, min=0.0, max=1.0, help="lr factor at the start of warmup")
    clip_grad_norm: float = option(1.0, min=0.0, help="full-model gradient L2-norm clip (0 = off)")
    ema_decay: float = option(
        0.0,
        min=0.0,
        help="keep an exponential moving average of the weights with this decay (warmed up, see engine/ema.py) "
        "and evaluate / export it; 0 = off (official)",
    )
    amp: Literal["auto", "bf16", "none"] = option("auto", help="autocast: auto = bf16 on GPU, none on CPU")
    checkpoint_period: int = option(5000, min=1, help="save a checkpoint every N iterations")
    log_period: int = option(20, min=1, help="print a progress line every N iterations")
    eval_period: int = option(0, min=0, help="evaluate every N iterations (0 = only at the end)")
    seed: int = option(40244023, help="training seed (official SEED)")
    find_unused_parameters: bool = option(False, help="DDP find_unused_parameters")

    def check(self) -> list[Problem]:
        problems: list[Problem] = []
        if list(self.steps) != sorted(self.steps):
            problems.append(("solver.steps", f"must be increasing, got {self.steps}"))
        if any(s > self.max_iter for s in self.steps):
            problems.append(("solver.steps", f"every step must be <= solver.max_iter ({self.max_iter})"))
        if self.ema_decay >= 1.0:
            problems.append(("solver.ema_decay", f"must be < 1 (0 = off), got {self.ema_decay}"))
        return problems


@dataclass
class EvalConfig:
    steps: list[int] = option([1], min_len=1, min=1, help="sampling-step counts to evaluate (encoder run once)")
    evaluator: Literal["auto", "coco", "lvis"] = option("auto", help="auto = lvis for LVIS data, else coco")
    tasks: list[str] = option(["bbox", "segm"], min_len=1, choices=("bbox", "segm"), help="AP tasks")
    backend: Literal["pycocotools", "faster_coco_eval"] = option(
        "pycocotools",
        help="AP implementation: pycocotools = the references (pycocotools COCOeval; lvis-api LVISEval for LVIS); "
        "faster_coco_eval = same numbers, ~2.5x faster",
    )
    coco_max_dets: list[int] = option(
        [1, 10, 100], min_len=3, min=1, help="COCOeval maxDets per image and category (official [1, 10, 100])"
    )
    lvis_max_dets: int = option(300, min=1, help="LVIS: best detections kept per image (official 300)")
    batch_size: int = option(1, min=1, help="images per inference forward")
    max_images: int | None = option(None, min=1, help="evaluate only the first N validation images")
    seed: int = option(0, help="seed of the sampler noise during evaluation")
    at_end: bool = option(True, help="evaluate when training finishes")
    save_predictions: bool = option(
        False, help="also write the COCO-format results (predictions_steps_<S>.json) next to the AP tables"
    )

    def check(self) -> list[Problem]:
        problems: list[Problem] = []
        if len(self.coco_max_dets) != 3 or list(self.coco_max_dets) != sorted(self.coco_max_dets):
            problems.append(("eval.coco_max_dets", f"must be three increasing values, got {self.coco_max_dets}"))
        return problems


@dataclass
class RayConfig:
    address: str | None = option(None, help="Ray cluster address (null = start or reuse a local Ray)")
    num_workers: int = option(1, min=0, help="training workers (0 = run in-process without Ray Train)")
    use_gpu: bool = option(False, help="one GPU per worker")
    cpus_per_worker: float = option(1.0, min=0.0, help="CPUs reserved per training worker")
    gpus_per_worker: float = option(1.0, min=0.0, help="GPUs per worker when use_gpu")
    storage_path: str = option("runs", help="Ray Train storage (local dir, NFS path or s3://...)")
    max_failures: int = option(1, min=-1, help="worker-group restarts after a failure (-1 = unlimited)")
    num_to_keep: int = option(2, min=1, help="checkpoints kept")
    local_num_cpus: int | None = option(None, min=1, help="CPUs of a local Ray started by the pipeline")


@dataclass
class TrackingConfig:
    enabled: bool = option(True, help="log to MLflow")
    tracking_uri: str | None = option(
        None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<abs>/mlruns/mlflow.db)"
    )
    experiment_name: str = option("diffusioninst", help="MLflow experiment")
    run_name: str | None = option(None, help="MLflow run name (default: the experiment config name)")
    log_checkpoint: bool = option(True, help="log the final checkpoint as an artifact")


@dataclass
class HostConfig:
    keep_freed_memory: bool = option(
        True,
        help="glibc: freed memory stays in the heap for reuse instead of going back to the OS (no page faults on "
        "every large tensor: R50 training iteration ~5% faster; peak RSS +3-6%); see engine/host.py",
    )


@dataclass
class ExperimentConfig:
    name: str = option("experiment", help="run name; also names the Ray Train run and output folder")
    output_dir: str = option("outputs", help="folder for tables, plots and predictions")
    model: ModelConfig = section(ModelConfig, help="architecture and losses")
    data: DataConfig = section(DataConfig, help="datasets and augmentation")
    solver: SolverConfig = section(SolverConfig, help="optimisation")
    sampler: SamplerConfig = section(SamplerConfig, help="DDIM sampling and post-processing")
    eval: EvalConfig = section(EvalConfig, help="evaluation")
    ray: RayConfig = section(RayConfig, help="Ray cluster and Train scaling")
    tracking: TrackingConfig = section(TrackingConfig, help="MLflow tracking")
    host: HostConfig = section(HostConfig, help="settings of the processes that run the model")

    def check(self) -> list[Problem]:
        problems: list[Problem] = []
        if self.data.format == "synthetic" and self.model.head.num_classes < self.data.synthetic.num_classes:
            problems.append(
                ("model.head.num_classes", f"must be >= data.synthetic.num_classes ({self.data.synthetic.num_classes})")
            )
        workers = max(self.ray.num_workers, 1)
        if self.solver.ims_per_batch % (workers * self.solver.grad_accum_steps):
            problems.append(
                (
                    "solver.ims_per_batch",
                    f"must be divisible by ray.num_workers x solver.grad_accum_steps ({workers} x "
                    f"{self.solver.grad_accum_steps})",
                )
            )
        if self.solver.amp == "bf16" and not self.ray.use_gpu:
            problems.append(
                (
                    "solver.amp",
                    "'bf16' needs ray.use_gpu: true (torchvision's CPU RoIAlign has no bfloat16 kernel); "
                    "use 'auto' (bf16 on GPU, float32 on CPU) or 'none'",
                )
            )
        return problems
