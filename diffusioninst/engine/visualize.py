"""Pictures people look at: prediction overlays and loss curves (PNG)."""

from __future__ import annotations

import colorsys
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def palette(n: int) -> list[tuple[int, int, int]]:
    """``n`` well-separated RGB colours (golden-ratio hue steps)."""
    return [tuple(int(c * 255) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 1.0)) for i in range(n)]


def draw_overlay(
    image: np.ndarray,
    result: dict[str, Any],
    class_names: Sequence[str] | None = None,
    score_threshold: float = 0.3,
    alpha: float = 0.45,
    max_detections: int | None = None,
) -> Image.Image:
    """Blend masks, draw boxes and ``label score`` captions on an RGB image.

    Args:
        image: uint8 [H, W, 3] RGB, the frame the result is in.
        result: ``{"boxes": [M,4] abs xyxy, "scores": [M], "labels": [M], "masks": bool [M,H,W] (optional)}``.
        score_threshold: detections below it are not drawn.
        max_detections: draw at most this many, the highest-scoring first (``None``: no limit).
    """
    canvas = image.astype(np.float32).copy()
    scores = _np(result["scores"])
    keep = np.nonzero(scores >= score_threshold)[0]
    keep = keep[np.argsort(-scores[keep], kind="stable")][:max_detections]
    colors = palette(max(len(keep), 1))
    masks = result.get("masks")
    if masks is not None:
        masks = _np(masks)
        for c, i in zip(colors, keep):
            m = masks[i].astype(bool)
            canvas[m] = canvas[m] * (1 - alpha) + np.asarray(c, np.float32) * alpha
    pil = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    font = ImageFont.load_default()
    boxes, labels = _np(result["boxes"]), _np(result["labels"])
    for c, i in zip(colors, keep):
        x0, y0, x1, y1 = (float(v) for v in boxes[i])
        draw.rectangle([x0, y0, x1, y1], outline=c, width=2)
        name = class_names[int(labels[i])] if class_names and int(labels[i]) < len(class_names) else str(labels[i])
        text = f"{name} {scores[i]:.2f}"
        tw = draw.textlength(text, font=font)
        draw.rectangle([x0, max(0, y0 - 11), x0 + tw + 4, max(0, y0 - 11) + 11], fill=c)
        draw.text((x0 + 2, max(0, y0 - 11)), text, fill=(0, 0, 0), font=font)
    return pil


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def grid(images: Sequence[Image.Image], columns: int = 2) -> Image.Image:
    """Tile images (scaled to the first one's height) into one picture."""
    if not images:
        raise ValueError("grid() needs at least one image")
    h = images[0].height
    scaled = [im if im.height == h else im.resize((round(im.width * h / im.height), h)) for im in images]
    rows = [scaled[i : i + columns] for i in range(0, len(scaled), columns)]
    width = max(sum(im.width for im in row) for row in rows)
    out = Image.new("RGB", (width, h * len(rows)), (255, 255, 255))
    for r, row in enumerate(rows):
        x = 0
        for im in row:
            out.paste(im, (x, r * h))
            x += im.width
    return out


def plot_loss_curves(history: Sequence[dict[str, float]], path: str | Path) -> Path:
    """Total loss and every loss term (log scale) plus the learning rate against iterations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [h["iteration"] for h in history]
    terms = [k for k in history[0] if k.startswith("loss")]
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for k in sorted(terms, key=lambda k: (k != "loss", k)):
        ax.plot(its, [h.get(k, float("nan")) for h in history], label=k, lw=2.0 if k == "loss" else 0.8)
    ax.set_yscale("log")
    ax.set_ylabel("loss (weighted)")
    ax.legend(fontsize=6, ncol=4)
    ax.grid(alpha=0.3)
    ax_lr.plot(its, [h.get("lr", float("nan")) for h in history], color="black")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("iteration")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@torch.no_grad()
def prediction_samples(
    model: torch.nn.Module,
    cfg: Any,
    path: str | Path,
    device: torch.device,
    num_images: int = 4,
    score_threshold: float = 0.05,
    max_detections: int = 8,
) -> Path:
    """Overlays of the model's predictions on the first validation images, tiled into one PNG.

    Draws each image's ``max_detections`` best detections scoring at least ``score_threshold`` (captions show
    the scores): a model early in training scores below the usual 0.3 and would otherwise show nothing.
    """
    from diffusioninst.data import build_eval_dataset, collate
    from diffusioninst.model import GeneratorNoise

    data = build_eval_dataset(cfg, split="val")
    items = [data.dataset[i] for i in range(min(num_images, len(data.dataset)))]
    batch = collate(items, cfg.model.size_divisibility).to(device)
    model.eval()
    sampler = dataclasses.replace(cfg.sampler, steps=1)
    noise = [GeneratorNoise(cfg.eval.seed + i, device) for i in range(len(items))]
    results = model.predict(batch.images, batch.image_sizes, batch.orig_sizes, sampler, noise=noise)
    pictures = [
        draw_overlay(
            data.dataset.images(i), results[i], data.class_names, score_threshold, max_detections=max_detections
        )
        for i in range(len(items))
    ]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid(pictures).save(path)
    return path
