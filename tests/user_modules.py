"""What a researcher adds to the template: own activations, networks and data, given by `_target_`
(`model.act._target_=user_modules.Swish`). Subprocesses find this module through PYTHONPATH
(see conftest.script_env)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from actlab.model import MLPClassifier


class Swish(nn.Module):
    """x * sigmoid(beta * x) with a fixed beta: no parameters, elementwise."""

    def __init__(self, beta: float = 1.0) -> None:
        super().__init__()
        self.beta = beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.beta * x)


class LearnableSwish(nn.Module):
    """x * sigmoid(beta * x) with beta learned (one number per layer)."""

    def __init__(self, beta: float = 1.0) -> None:
        super().__init__()
        self.beta = nn.Parameter(torch.tensor(float(beta)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.beta * x)


class Softmax(nn.Module):
    """Not elementwise: each output depends on the whole row."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x, dim=-1)


class BatchNormMLP(MLPClassifier):
    """The template's classifier, subclassed to batch-normalise its net's hidden layer."""

    def __init__(self, net: nn.Sequential, act: Callable[[], nn.Module], **rest: Any) -> None:
        super().__init__(net, act=act, **rest)
        width = net[0].out_features
        self.net = nn.Sequential(
            nn.Linear(net[0].in_features, width),
            nn.BatchNorm1d(width),
            act(),
            nn.Linear(width, net[-1].out_features),
        )


class SmallCNN(MLPClassifier):
    """The template's classifier, subclassed to put a convolution over the 28x28 image."""

    def __init__(self, net: nn.Sequential, act: Callable[[], nn.Module], **rest: Any) -> None:
        super().__init__(net, act=act, **rest)
        self.net = nn.Sequential(
            nn.Unflatten(1, (1, 28, 28)),
            nn.Conv2d(1, 4, 5, stride=3),
            act(),
            nn.Flatten(),
            nn.Linear(4 * 8 * 8, net[-1].out_features),
        )


class RandomDataModule(L.LightningDataModule):
    """An own DataModule: random MNIST-shaped images and labels through torch DataLoaders. It
    takes the template's data keys (`**unused`), as a drop-in `data._target_`."""

    def __init__(self, batch_size: int = 64, seed: int = 0, **unused: Any) -> None:
        super().__init__()
        self.batch_size, self.seed = batch_size, seed

    def setup(self, stage: str | None = None) -> None:
        g = torch.Generator().manual_seed(self.seed)
        x, y = torch.randn(400, 784, generator=g), torch.randint(0, 10, (400,), generator=g)
        self.splits = {
            "train": TensorDataset(x[:300], y[:300]),
            "val": TensorDataset(x[300:350], y[300:350]),
            "test": TensorDataset(x[350:], y[350:]),
        }

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["train"], batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["val"], batch_size=100)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["test"], batch_size=100)
