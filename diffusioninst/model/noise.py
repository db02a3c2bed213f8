"""Injectable randomness for training corruption and DDIM sampling.

Every random draw of the model goes through a :class:`NoiseSource`, so that

* users can seed evaluation (``GeneratorNoise(seed)``), one source per image in batched sampling;
* tests can replay the draws recorded from the official implementation (:class:`ReplayNoise`).

The draw order of one image is the official one: training ``randint(0, T, (1,))``, ``randn(N, 4)``,
``randn(N - G, 4)`` (placeholders); sampling ``randn(1, N, 4)``, then per non-final step
``randn_like(kept)`` and ``randn(1, N - kept, 4)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["GeneratorNoise", "NoiseSource", "ReplayNoise", "noise_sources"]


@runtime_checkable
class NoiseSource(Protocol):
    """Where random numbers come from."""

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
        """Standard normal tensor of ``shape`` (like ``torch.randn``)."""
        ...

    def randn_like(self, t: Tensor) -> Tensor:
        """Standard normal tensor with the shape and dtype of ``t`` (like ``torch.randn_like``)."""
        ...

    def randint(self, low: int, high: int, shape: Sequence[int]) -> Tensor:
        """int64 tensor uniform in ``[low, high)`` (like ``torch.randint``)."""
        ...


class GeneratorNoise:
    """A :class:`NoiseSource` backed by an explicit ``torch.Generator`` (CPU draws, moved to ``device``).

    Drawing on the CPU keeps a seed's numbers identical across devices.
    """

    def __init__(self, seed: int | None = None, device: torch.device | str = "cpu"):
        self.generator = torch.Generator(device="cpu")
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(int(seed))
        self.device = torch.device(device)

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.randn(tuple(int(s) for s in shape), generator=self.generator, dtype=dtype).to(self.device)

    def randn_like(self, t: Tensor) -> Tensor:
        out = torch.randn(tuple(t.shape), generator=self.generator, dtype=t.dtype)
        return out.to(t.device)

    def randint(self, low: int, high: int, shape: Sequence[int]) -> Tensor:
        out = torch.randint(int(low), int(high), tuple(int(s) for s in shape), generator=self.generator)
        return out.to(self.device)


class ReplayNoise:
    """Replays recorded draws in order; raises if a draw's kind or shape differs from the record.

    Args:
        values: the recorded tensors, one per draw, in call order.
        kinds: optional list of ``"randn" | "randn_like" | "randint"`` to check the call kind too.
    """

    def __init__(self, values: Sequence[Tensor], kinds: Sequence[str] | None = None):
        self.values = list(values)
        self.kinds = list(kinds) if kinds is not None else None
        self.position = 0

    def _next(self, kind: str, shape: Sequence[int]) -> Tensor:
        if self.position >= len(self.values):
            raise RuntimeError(f"ReplayNoise exhausted: draw #{self.position} ({kind} {list(shape)}) was not recorded")
        value = self.values[self.position]
        if self.kinds is not None and self.kinds[self.position] != kind:
            raise RuntimeError(f"ReplayNoise draw #{self.position}: recorded {self.kinds[self.position]}, asked {kind}")
        if list(value.shape) != [int(s) for s in shape]:
            raise RuntimeError(
                f"ReplayNoise draw #{self.position} ({kind}): recorded shape {list(value.shape)}, asked {list(shape)}"
            )
        self.position += 1
        return value.clone()

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
        return self._next("randn", shape).to(dtype)

    def randn_like(self, t: Tensor) -> Tensor:
        return self._next("randn_like", t.shape).to(device=t.device, dtype=t.dtype)

    def randint(self, low: int, high: int, shape: Sequence[int]) -> Tensor:
        value = self._next("randint", shape).long()
        if value.numel() and (int(value.min()) < low or int(value.max()) >= high):
            raise RuntimeError(f"ReplayNoise randint value {value.tolist()} outside [{low}, {high})")
        return value

    @property
    def exhausted(self) -> bool:
        return self.position == len(self.values)


def noise_sources(
    noise: NoiseSource | Sequence[NoiseSource] | None, batch_size: int, seed: int | None = None
) -> list[NoiseSource]:
    """One noise source per image.

    ``None`` -> fresh generators (seeded ``seed + i`` when ``seed`` is given); a single source -> used by
    every image in turn (only sensible for batch size 1 or sequential use); a sequence -> one per image.
    """
    if noise is None:
        return [GeneratorNoise(None if seed is None else seed + i) for i in range(batch_size)]
    if isinstance(noise, NoiseSource):
        return [noise] * batch_size
    sources = list(noise)
    if len(sources) != batch_size:
        raise ValueError(f"got {len(sources)} noise sources for a batch of {batch_size} images; pass one per image")
    return sources
