"""Small models and inputs shared by the model tests (fast on CPU)."""

from __future__ import annotations

import pytest
import torch

from diffusioninst.config.schema import (
    BackboneConfig,
    FPNConfig,
    HeadConfig,
    MaskConfig,
    ModelConfig,
)
from diffusioninst.model import build_model


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny tensors gain nothing from threads, and on a shared 2-core box OpenMP barriers can stall 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**head) -> ModelConfig:
    """A ResNet-18 / 2-stage model small enough for unit tests."""
    h = {"num_classes": 5, "num_proposals": 16, "hidden_dim": 32, "nheads": 4, "dim_feedforward": 64}
    h |= {"dim_dynamic": 8, "num_stages": 2}
    h.update(head)
    return ModelConfig(
        backbone=BackboneConfig(name="resnet18", freeze_at=0, norm="bn"),
        fpn=FPNConfig(out_channels=32),
        head=HeadConfig(**h),
        mask=MaskConfig(branch_channels=16, num_convs=1),
    )


def tiny_model(class_bias: float | None = 0.0, seed: int = 0, **head):
    """Eval-mode tiny model; ``class_bias`` (logit) makes box renewal keep a varying share of proposals."""
    torch.manual_seed(seed)
    model = build_model(tiny_config(**head)).eval()
    if class_bias is not None:
        with torch.no_grad():
            for stage in model.head.stages:
                stage.class_logits.bias.fill_(class_bias)
    return model


def batch(sizes: list[tuple[int, int]], seed: int = 0, instances: int = 2):
    """uint8 images zero-padded to a common multiple of 32, their sizes and targets with masks."""
    g = torch.Generator().manual_seed(seed)
    hp = max(h for h, _ in sizes)
    wp = max(w for _, w in sizes)
    hp, wp = -(-hp // 32) * 32, -(-wp // 32) * 32
    images = torch.zeros(len(sizes), 3, hp, wp, dtype=torch.uint8)
    targets = []
    for i, (h, w) in enumerate(sizes):
        images[i, :, :h, :w] = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        xy = torch.rand(instances, 2, generator=g) * torch.tensor([w * 0.5, h * 0.5])
        wh = (torch.rand(instances, 2, generator=g) * 0.4 + 0.1) * torch.tensor([w, h])
        boxes = torch.cat([xy, xy + wh], 1)
        masks = torch.zeros(instances, h, w, dtype=torch.uint8)
        for k, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
            masks[k, y1:y2, x1:x2] = 1
        labels = torch.randint(0, 5, (instances,), generator=g)
        targets.append({"boxes": boxes, "labels": labels, "masks": masks})
    return images, torch.tensor(sizes), targets
