"""Dynamic mask head: per-instance 1x1-conv MLP whose weights come from the detection head's controller.

With the official sizes (``mask_channels=8, head_channels=8, head_layers=3``) each instance has 153
parameters, split ``[64, 64, 8 | 8, 8, 1]`` = W0 (8 out x 8 in), W1 (8x8), W2 (1x8), b0, b1, b2 (row-major,
out-channel major). The instance mask logit at every F_mask pixel is
``W2 relu(W1 relu(W0 f + b0) + b1) + b2``; no relative coordinates are used. Defined once here and used
by inference, post-processing and the loss; vectorised over instances (batched matmuls, no Python loop
over instances).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["DynamicMaskHead"]


class DynamicMaskHead:
    """Shapes of the dynamic filters and their application.

    Args:
        in_channels: channels of F_mask (official 8).
        hidden_channels: width of the hidden layers (official 8).
        num_layers: number of 1x1 convs (official 3); the last outputs 1 channel.
    """

    def __init__(self, in_channels: int = 8, hidden_channels: int = 8, num_layers: int = 3):
        self.in_channels = in_channels
        self.hidden_channels = hidden_channels
        self.num_layers = num_layers
        dims = [in_channels] + [hidden_channels] * (num_layers - 1) + [1]
        self.layer_dims = list(zip(dims[1:], dims[:-1]))  # (out, in) per layer
        self.weight_nums = [o * i for o, i in self.layer_dims]
        self.bias_nums = [o for o, _ in self.layer_dims]

    @property
    def num_params(self) -> int:
        """Parameters per instance (153 for the official sizes); the controller's output width."""
        return sum(self.weight_nums) + sum(self.bias_nums)

    def parse(self, params: Tensor) -> list[tuple[Tensor, Tensor]]:
        """params [M, num_params] -> per layer (weight [M, out, in], bias [M, out])."""
        if params.dim() != 2 or params.shape[1] != self.num_params:
            raise ValueError(f"dynamic mask params must be [M, {self.num_params}], got {list(params.shape)}")
        splits = torch.split(params, self.weight_nums + self.bias_nums, dim=1)
        n = self.num_layers
        m = params.shape[0]
        return [(w.reshape(m, o, i), b.reshape(m, o)) for (o, i), w, b in zip(self.layer_dims, splits[:n], splits[n:])]

    def __call__(self, features: Tensor, params: Tensor, chunk: int | None = None) -> Tensor:
        """Mask logits of every instance on ONE shared feature map.

        Args:
            features: F_mask of one image, [C, *spatial] (e.g. [8, Hm, Wm]).
            params: [M, num_params] dynamic filter parameters.
            chunk: process at most this many instances at a time (bounds inference memory); None = all.
        Returns:
            [M, *spatial] logits (pre-sigmoid).
        """
        spatial = features.shape[1:]
        m = params.shape[0]
        if chunk is not None and m > chunk:
            return torch.cat([self(features, params[s : s + chunk]) for s in range(0, m, chunk)])
        layers = self.parse(params)
        flat = features.reshape(self.in_channels, -1)  # [C, P]
        w0, b0 = layers[0]
        x = (w0.reshape(-1, self.in_channels) @ flat).reshape(m, -1, flat.shape[1]) + b0.unsqueeze(-1)
        return self._rest(x, layers).reshape(m, *spatial)

    def per_instance(self, features: Tensor, params: Tensor) -> Tensor:
        """Like ``__call__`` but each instance has its own features: [M, C, *spatial] -> [M, *spatial]."""
        m = params.shape[0]
        layers = self.parse(params)
        w0, b0 = layers[0]
        x = torch.baddbmm(b0.unsqueeze(-1), w0, features.reshape(m, self.in_channels, -1))
        return self._rest(x, layers).reshape(m, *features.shape[2:])

    @staticmethod
    def _rest(x: Tensor, layers: list[tuple[Tensor, Tensor]]) -> Tensor:
        for w, b in layers[1:]:
            x = torch.baddbmm(b.unsqueeze(-1), w, torch.relu(x))
        return x
