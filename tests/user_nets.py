"""Networks a user brings as `model.net` (README "Extending"): no actlab code inside."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


class SmallCNN(nn.Sequential):
    """[B, side*side] rows as 1 x side x side images: conv 3x3 -> act -> 2x2 max-pool, a hidden
    Linear -> act, then a read-out. The dead-unit probe sees two layers: channels, then units."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        act: Callable[[], nn.Module],
        channels: int = 4,
        hidden: int = 16,
    ) -> None:
        side = math.isqrt(in_features)
        pooled = (side - 2) // 2
        super().__init__(
            nn.Unflatten(1, (1, side, side)),
            nn.Conv2d(1, channels, 3),
            act(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(channels * pooled * pooled, hidden),
            act(),
            nn.Linear(hidden, num_classes),
        )


class BatchNormMLP(nn.Module):
    """Linear -> BatchNorm1d -> act, then a read-out; a plain Module holding a Sequential.
    `momentum=None`: BatchNorm's cumulative average, which reads its step count as a number."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        act: Callable[[], nn.Module],
        hidden: int = 32,
        momentum: float | None = 0.1,
    ) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.BatchNorm1d(hidden, momentum=momentum),
            act(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class FunctionalMLP(nn.Module):
    """Its activation is a function call, no module: the dead-unit probe has nothing to watch."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 16) -> None:
        super().__init__()
        self.hidden, self.out = nn.Linear(in_features, hidden), nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x)))


class NoisyMLP(nn.Module):
    """Gaussian noise on its hidden layer while training (a regulariser): random numbers drawn
    inside its forward, which a pack's torch.func path cannot draw as each member's solo job."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 16) -> None:
        super().__init__()
        self.hidden, self.out = nn.Linear(in_features, hidden), nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.hidden(x))
        return self.out(h + 0.1 * torch.randn_like(h) if self.training else h)
