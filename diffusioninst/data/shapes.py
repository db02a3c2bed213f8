"""Shape outlines, backgrounds and fills of the synthetic dataset (pure functions of an explicit Generator).

Every shape is a polygon in absolute pixel coordinates, so the image is painted with exactly the
rasteriser COCO uses for the annotations (pycocotools): pixels and masks agree by construction.
"""

from __future__ import annotations

import numpy as np

SHAPE_NAMES = ("rectangle", "ellipse", "triangle", "star", "cross", "hexagon", "arrow", "crescent")


def _regular(n: int, phase: float = 0.0) -> np.ndarray:
    a = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([np.cos(a), np.sin(a)], 1)


def _unit_outline(name: str) -> np.ndarray:
    """Outline of a shape class in [-1, 1]^2, float64 [k, 2] (counter-clockwise in image axes)."""
    if name == "rectangle":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64)
    if name == "ellipse":
        return _regular(48)
    if name == "triangle":
        return _regular(3, -np.pi / 2)
    if name == "star":
        outer = _regular(5, -np.pi / 2)
        inner = 0.42 * _regular(5, -np.pi / 2 + np.pi / 5)
        return np.stack([outer, inner], 1).reshape(-1, 2)
    if name == "cross":
        t = 0.34
        return np.array(
            [
                [-t, -1],
                [t, -1],
                [t, -t],
                [1, -t],
                [1, t],
                [t, t],
                [t, 1],
                [-t, 1],
                [-t, t],
                [-1, t],
                [-1, -t],
                [-t, -t],
            ],
            np.float64,
        )
    if name == "hexagon":
        return _regular(6)
    if name == "arrow":
        return np.array([[-1, -0.35], [0.2, -0.35], [0.2, -1], [1, 0], [0.2, 1], [0.2, 0.35], [-1, 0.35]], np.float64)
    if name == "crescent":
        # unit disc minus a disc of radius 0.85 centred at (0.5, 0): outer arc through the left, inner arc back
        cx, r = 0.5, 0.85
        x = (1 - r * r + cx * cx) / (2 * cx)
        top = np.arctan2(np.sqrt(1 - x * x), x)
        a = np.linspace(top, 2 * np.pi - top, 28)
        inner_top = np.arctan2(np.sqrt(1 - x * x), x - cx)
        b = np.linspace(2 * np.pi - inner_top, inner_top, 20)[1:-1]
        return np.concatenate([np.stack([np.cos(a), np.sin(a)], 1), np.stack([cx + r * np.cos(b), r * np.sin(b)], 1)])
    raise ValueError(f"unknown shape '{name}'; known: {SHAPE_NAMES}")


def sample_extent(rng: np.random.Generator, min_size: int, max_size: int, small_fraction: float) -> float:
    """Object extent (longer side of its box) in pixels: ``small_fraction`` of draws in [min, 40), the rest
    log-uniform in [40, max] (clamped to the configured range)."""
    split = float(np.clip(40.0, min_size, max_size))
    if rng.random() < small_fraction or split >= max_size:
        return float(rng.uniform(min_size, max(split, min_size + 1e-6)))
    return float(np.exp(rng.uniform(np.log(split), np.log(max_size))))


def shape_polygon(
    rng: np.random.Generator, name: str, extent: float, image_hw: tuple[int, int], margin: float = 1.0
) -> np.ndarray:
    """A randomly rotated, stretched ``name`` whose box's longer side is ``extent`` px, placed fully inside
    the image. Returns float64 [2k] flat ``x, y`` absolute pixel coordinates rounded to 2 decimals (the
    precision written to JSON, so what is painted is exactly what is annotated)."""
    pts = _unit_outline(name) * np.array([1.0, rng.uniform(0.55, 1.0)])
    theta = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    pts = pts @ rot.T
    pts -= (pts.max(0) + pts.min(0)) / 2
    span = (pts.max(0) - pts.min(0)).max()
    h, w = image_hw
    extent = min(extent, min(h, w) - 2 * margin - 1)
    pts *= extent / span
    lo, hi = pts.min(0), pts.max(0)
    cx = rng.uniform(margin - lo[0], w - margin - hi[0])
    cy = rng.uniform(margin - lo[1], h - margin - hi[1])
    return np.round((pts + np.array([cx, cy])).reshape(-1), 2)


def background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Textured background: a two-colour linear gradient plus 1-2 sinusoidal gratings. float32 [h, w, 3].

    Both terms are separable in x and y, so they are built from 1-D profiles (cheap at any size)."""
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    c0, c1 = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.float32(np.cos(angle)) * x + np.float32(np.sin(angle)) * y
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    img = c0 + (c1 - c0) * ramp[..., None]
    for _ in range(int(rng.integers(1, 3))):
        fx, fy = rng.uniform(-12, 12, 2)
        amp = rng.uniform(5, 35, 3).astype(np.float32)
        phase = rng.uniform(0, 2 * np.pi)
        ax, ay = 2 * np.pi * fx * x, 2 * np.pi * fy * y + phase
        grating = np.sin(ax) * np.cos(ay) + np.cos(ax) * np.sin(ay)  # sin(ax + ay)
        img += amp * grating[..., None]
    return img


def fill_colour(rng: np.random.Generator, avoid: np.ndarray, min_distance: float = 70.0) -> np.ndarray:
    """A random RGB colour (float32 [3]) at least ``min_distance`` (L2) from ``avoid`` when possible."""
    colour = rng.uniform(0, 255, 3)
    for _ in range(8):
        if np.linalg.norm(colour - avoid) >= min_distance:
            break
        colour = rng.uniform(0, 255, 3)
    return colour.astype(np.float32)


def shaded_patch(rng: np.random.Generator, colour: np.ndarray, height: int, width: int) -> np.ndarray:
    """A fill for a ``height x width`` box: the colour with a random linear shading of +-25. float32 [h, w, 3]."""
    gy, gx = rng.uniform(-25, 25, 2)
    yy = np.linspace(-0.5, 0.5, height, dtype=np.float32)[:, None, None]
    xx = np.linspace(-0.5, 0.5, width, dtype=np.float32)[None, :, None]
    return colour + gy * yy + gx * xx
