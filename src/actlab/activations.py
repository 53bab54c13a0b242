"""Activations of the template's own, where torch's cannot serve a pack as they serve a job."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RReLU(nn.Module):
    """torch.nn.RReLU's function: in training each negative input is multiplied by its own slope
    drawn from U(lower, upper), in evaluation by their mean.

    torch's kernel draws a slope only where the input is <= 0, so its random stream depends on
    the signs of the inputs: in a pack, where batched matmuls round a pre-activation across 0
    now and then, a member's stream would part from its solo job's for good. This draws one
    slope for every element, from `generator` (the global one when None): a job and a pack
    member with a generator in the same state draw the same slopes, whatever the signs.
    """

    def __init__(self, lower: float = 1 / 8, upper: float = 1 / 3) -> None:
        super().__init__()
        self.lower, self.upper = lower, upper

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if not self.training:
            return F.leaky_relu(x, (self.lower + self.upper) / 2)
        slope = torch.empty_like(x).uniform_(self.lower, self.upper, generator=generator)
        return torch.where(x >= 0, x, x * slope)

    def extra_repr(self) -> str:
        return f"lower={self.lower}, upper={self.upper}"
