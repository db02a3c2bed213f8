"""Box diffusion: cosine schedule, training corruption and the DDIM update (pure functions + a buffer holder).

Spaces: GT boxes arrive as normalized cxcywh; the diffusion runs in "signal" space
``x0 = (cxcywh_norm * 2 - 1) * scale``. The schedule is float64 (as official), so q_sample, predicted
noise and the DDIM update are float64 tensors; boxes are cast to float32 inside the head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from diffusioninst.config.schema import DiffusionConfig
from diffusioninst.model.box_ops import cxcywh_to_xyxy
from diffusioninst.model.noise import NoiseSource

__all__ = [
    "CorruptedBoxes",
    "DiffusionSchedule",
    "cosine_beta_schedule",
    "ddim_coefficients",
    "ddim_time_pairs",
]


def cosine_beta_schedule(timesteps: int, s: float = 0.008) -> Tensor:
    """float64 [T] betas of the cosine schedule: ``ac(t) = cos(((t/T) + s) / (1 + s) * pi/2)^2 / ac(0)``,
    ``beta_t = clip(1 - ac(t+1)/ac(t), 0, 0.999)``."""
    x = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64)
    ac = torch.cos(((x / timesteps) + s) / (1 + s) * math.pi * 0.5) ** 2
    ac = ac / ac[0]
    return torch.clip(1 - (ac[1:] / ac[:-1]), 0, 0.999)


def ddim_time_pairs(timesteps: int, steps: int) -> list[tuple[int, int]]:
    """``(t, t_next)`` pairs of a ``steps``-step DDIM run: float32 ``linspace(-1, T-1, steps+1)`` truncated to
    int, reversed (S=1: [(999, -1)]; S=4: [(999, 749), (749, 499), (499, 249), (249, -1)])."""
    if steps < 1 or steps > timesteps:
        raise ValueError(f"sampler.steps must be in [1, {timesteps}], got {steps}")
    times = list(reversed(torch.linspace(-1, timesteps - 1, steps=steps + 1).int().tolist()))
    return list(zip(times[:-1], times[1:]))


def ddim_coefficients(alpha: Tensor, alpha_next: Tensor, eta: float) -> tuple[Tensor, Tensor]:
    """DDIM ``sigma = eta * sqrt((1 - a/a_next) (1 - a_next) / (1 - a))`` and ``c = sqrt(1 - a_next - sigma^2)``
    from 0-dim float64 cumulative alphas at t and t_next."""
    sigma = eta * ((1 - alpha / alpha_next) * (1 - alpha_next) / (1 - alpha)).sqrt()
    c = (1 - alpha_next - sigma**2).sqrt()
    return sigma, c


@dataclass
class CorruptedBoxes:
    """Training input of one image: ``boxes_norm_xyxy`` [N, 4] float64 head boxes (normalized xyxy),
    ``t`` int64 [1], ``noise`` [N, 4], ``x_start`` [N, 4] and ``x_t`` [N, 4] (signal-space cxcywh)."""

    boxes_norm_xyxy: Tensor
    t: Tensor
    noise: Tensor
    x_start: Tensor
    x_t: Tensor


def repeat_counts(num_gt: int, num_proposals: int, noise: NoiseSource) -> Tensor:
    """How many copies of each of ``num_gt`` GT boxes fill ``num_proposals`` slots (``repeat`` padding).

    Every GT gets ``N // G`` copies and ``N % G`` of them, chosen at random (the largest of one ``randn(G)``
    draw), one more: int64 ``[G]`` summing to ``N``. Needs ``0 < G <= N``.
    """
    if not 0 < num_gt <= num_proposals:
        raise ValueError(f"repeat padding needs 0 < num_gt <= num_proposals, got {num_gt} and {num_proposals}")
    counts = torch.full((num_gt,), num_proposals // num_gt, dtype=torch.int64)
    extra = num_proposals % num_gt
    if extra:
        counts[random_choice(num_gt, extra, noise).cpu()] += 1
    return counts


def random_choice(n: int, k: int, noise: NoiseSource) -> Tensor:
    """Indices of ``k`` of ``n`` items, chosen uniformly at random: the ``k`` largest of one ``randn(n)`` draw
    (int64 ``[k]``, in ``topk`` order, on the noise source's device)."""
    return torch.topk(noise.randn((n,)), k).indices


class DiffusionSchedule(nn.Module):
    """Holds the float64 schedule (non-persistent buffers, recomputed from the config) and the diffusion math."""

    def __init__(self, cfg: DiffusionConfig):
        super().__init__()
        self.cfg = cfg
        self.timesteps = cfg.timesteps
        self.scale = cfg.signal_scale
        betas = cosine_beta_schedule(cfg.timesteps, cfg.cosine_s)
        ac = torch.cumprod(1.0 - betas, dim=0)
        for name, value in (
            ("betas", betas),
            ("alphas_cumprod", ac),
            ("sqrt_alphas_cumprod", torch.sqrt(ac)),
            ("sqrt_one_minus_alphas_cumprod", torch.sqrt(1.0 - ac)),
            ("sqrt_recip_alphas_cumprod", torch.sqrt(1.0 / ac)),
            ("sqrt_recipm1_alphas_cumprod", torch.sqrt(1.0 / ac - 1)),
        ):
            self.register_buffer(name, value, persistent=False)

    def _apply(self, fn, recurse=True):
        # keep the schedule float64 whatever dtype the model is cast to (model.half(), .to(bfloat16))
        out = super()._apply(fn, recurse)
        for name, buf in self._buffers.items():
            if buf is not None and buf.dtype != torch.float64:
                self._buffers[name] = buf.to(torch.float64)
        return out

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """``sqrt(ac_t) x_start + sqrt(1 - ac_t) noise`` (one image): x_start, noise [N, 4], t [1] -> float64 [N, 4]."""
        a = self.sqrt_alphas_cumprod.gather(-1, t).reshape(1, 1)
        b = self.sqrt_one_minus_alphas_cumprod.gather(-1, t).reshape(1, 1)
        return a * x_start + b * noise

    def corrupt(self, gt_cxcywh_norm: Tensor, num_proposals: int, noise: NoiseSource) -> CorruptedBoxes:
        """Official ``prepare_diffusion_concat`` for one image (or its ``repeat`` alternative).

        Draws ``t ~ randint(train_t_min, T)`` (official ``randint(0, T)``), ``noise ~ randn(N, 4)``; pads the
        G GT boxes (kept FIRST, in order) with ``randn(N-G, 4) * pad_box_std + pad_box_mean`` placeholders
        (w, h clipped at ``pad_box_min_wh``), or keeps a random subset of N when G > N (order preserved; drawn
        as the N largest of ``randn(G)``); an image without GT diffuses one fake box ``empty_gt_box``. With
        ``gt_padding: repeat`` the N boxes are instead copies of the G GT boxes, in GT order
        (``repeat_counts`` copies each), and nothing else.
        """
        cfg = self.cfg
        device = gt_cxcywh_norm.device
        t = noise.randint(cfg.train_t_min, self.timesteps, (1,)).to(device)
        eps = noise.randn((num_proposals, 4)).to(device)
        gt = gt_cxcywh_norm
        if gt.shape[0] == 0:
            gt = torch.as_tensor([cfg.empty_gt_box], dtype=torch.float32, device=device)
        g = gt.shape[0]
        if g < num_proposals and cfg.gt_padding == "repeat":
            x_start = gt.repeat_interleave(repeat_counts(g, num_proposals, noise).to(device), dim=0)
        elif g < num_proposals:
            pad = noise.randn((num_proposals - g, 4)).to(device) / (1.0 / cfg.pad_box_std) + cfg.pad_box_mean
            pad[:, 2:] = torch.clip(pad[:, 2:], min=cfg.pad_box_min_wh)
            x_start = torch.cat((gt, pad), dim=0)
        elif g > num_proposals:
            x_start = gt[random_choice(g, num_proposals, noise).to(device).sort().values]
        else:
            x_start = gt
        x_start = (x_start * 2.0 - 1.0) * self.scale
        x_t = self.q_sample(x_start, t, eps)
        x = torch.clamp(x_t, min=-self.scale, max=self.scale)
        x = ((x / self.scale) + 1) / 2.0
        return CorruptedBoxes(boxes_norm_xyxy=cxcywh_to_xyxy(x), t=t, noise=eps, x_start=x_start, x_t=x_t)

    def predict_noise(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """``(sqrt(1/ac_t) x_t - x0) / sqrt(1/ac_t - 1)``: x_t, x0 [B, N, 4], t int64 [B] -> float64 [B, N, 4]."""
        b = t.shape[0]
        recip = self.sqrt_recip_alphas_cumprod.gather(-1, t).reshape(b, 1, 1)
        recipm1 = self.sqrt_recipm1_alphas_cumprod.gather(-1, t).reshape(b, 1, 1)
        return (recip * x_t - x0) / recipm1

    def ddim_step(self, x0: Tensor, eps: Tensor, z: Tensor, t: int, t_next: int, eta: float) -> Tensor:
        """One DDIM update of the kept boxes: ``x0 sqrt(ac_next) + c eps + sigma z``.

        ``z`` is the caller's ``randn_like(img)`` draw (official: same shape and dtype as the kept ``img``).
        With float32 ``x0`` and float64 ``eps`` the result is float64, as official.
        """
        alpha = self.alphas_cumprod[t]
        alpha_next = self.alphas_cumprod[t_next]
        sigma, c = ddim_coefficients(alpha, alpha_next, eta)
        return x0 * alpha_next.sqrt() + c * eps + sigma * z
