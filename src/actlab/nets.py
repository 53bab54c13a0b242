"""Networks for `model.net`: ordinary torch modules, built by Hydra from their config node.

A network takes a batch of the data's rows, [B, data.in_features], to [B, data.num_classes]
(README "Extending"). Any `torch.nn.Module` that does can be `model.net`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

from torch import nn


def without_stackable(act: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """The activation's factory without the `stackable:` key of its config, which the packing
    rules read (actlab.packing) and its class does not take."""
    if isinstance(act, functools.partial) and "stackable" in act.keywords:
        keywords = {k: v for k, v in act.keywords.items() if k != "stackable"}
        return functools.partial(act.func, *act.args, **keywords)
    return act


class MLP(nn.Sequential):
    """Linear -> act (-> Dropout) per hidden layer, then a linear read-out.

    `act` is called once per hidden layer: activations with weights (PReLU) are not shared.
    An empty `hidden_sizes` gives a linear (softmax-regression) model. A Sequential, so its
    parameters are named `0.weight`, `0.bias`, `2.weight`, ...: the names of every checkpoint.
    """

    def __init__(
        self,
        in_features: int,
        hidden_sizes: Sequence[int],
        num_classes: int,
        act: Callable[[], nn.Module],
        dropout: float = 0.0,
    ) -> None:
        act = without_stackable(act)
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden_sizes:
            layers += [nn.Linear(width, h), act()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)
