"""The MLP computes what its activation option says."""

from __future__ import annotations

import torch
from conftest import compose_train
from hydra.utils import instantiate


def build(*overrides: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return instantiate(compose_train(*overrides, "model.net.hidden_sizes=[32,16]").model).net


def test_leaky_slope_zero_is_relu_and_slope_one_is_identity() -> None:
    x = torch.randn(64, 784)
    relu, none = build("model.act=relu"), build("model.act=none")
    leaky0 = build("model.act=leaky", "model.act.negative_slope=0")
    leaky1 = build("model.act=leaky", "model.act.negative_slope=1")
    # Same seed, same layer shapes: the same weights; only the activation differs.
    assert torch.equal(leaky0(x), relu(x))
    assert torch.equal(leaky1(x), none(x))
    assert not torch.equal(relu(x), none(x))


def test_empty_hidden_sizes_is_a_linear_model() -> None:
    model = instantiate(compose_train("model.net.hidden_sizes=[]").model)
    assert [type(m).__name__ for m in model.net] == ["Linear"]
    assert model(torch.randn(3, 784)).shape == (3, 10)
