"""The dead-unit measurement on a network whose dead and rare units are known by construction."""

import pytest
import torch
from torch import nn

from actlab.diagnostics import UnitStats
from actlab.nets import MLP


def hand_built(act: type[nn.Module]) -> MLP:
    """4 inputs -> 5 -> 3 -> 2. Layer 1: units 0-2 never positive (bias -1, -0.5, and exactly 0),
    unit 3 follows input 0, unit 4 input 1. Layer 2: unit 0 never positive, unit 1 follows
    layer-1 unit 4, unit 2 always on."""
    net = MLP(4, [5, 3], 2, act)
    lin1, lin2 = net[0], net[2]
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        lin1.bias[:3] = torch.tensor([-1.0, -0.5, 0.0])
        lin1.weight[3, 0] = 1.0
        lin1.weight[4, 1] = 1.0
        lin2.bias[:] = torch.tensor([-1.0, 0.0, 1.0])
        lin2.weight[1, 4] = 1.0
    return net


def inputs() -> torch.Tensor:
    """200 samples: input 0 positive on exactly one (0.5% < 1%), input 1 on the first 100."""
    x = torch.zeros(200, 4)
    x[:, 0] = -1.0
    x[0, 0] = 1.0
    x[:100, 1] = 1.0
    x[100:, 1] = -1.0
    return x


@pytest.mark.parametrize("act", [nn.ReLU, nn.LeakyReLU])
def test_dead_and_rare_units_are_counted_exactly(act: type[nn.Module]) -> None:
    net = hand_built(act)
    stats = UnitStats(net).attach()
    with torch.no_grad():
        for batch in inputs().split(64):  # counts must add up over uneven batches
            net(batch)
    stats.detach()
    got = {k: v.item() for k, v in stats.tensors().items()}

    assert got["dead/layer1"] == pytest.approx(3 / 5)
    assert got["rare/layer1"] == pytest.approx(4 / 5)  # the 3 dead + unit 3 (1 of 200 samples)
    assert got["dead/layer2"] == pytest.approx(1 / 3)
    assert got["rare/layer2"] == pytest.approx(1 / 3)
    assert got["dead/mean"] == pytest.approx((3 / 5 + 1 / 3) / 2)
    # Mean activation of layer 1: the activation's outputs over all samples and units.
    with torch.no_grad():
        expected = net[1](net[0](inputs())).mean().item()
    assert got["act_mean/layer1"] == pytest.approx(expected)
    if act is nn.ReLU:
        assert expected == pytest.approx(101 / (200 * 5))


def test_hooks_are_removed_after_detach() -> None:
    net = hand_built(nn.ReLU)
    stats = UnitStats(net).attach()
    stats.detach()
    net(inputs())
    assert stats.n == 0
    assert stats.tensors() == {}
