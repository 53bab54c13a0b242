"""actlab.activations.RReLU: torch.nn.RReLU's function, with a random stream a pack repeats."""

import torch
from torch import nn

from actlab.activations import RReLU


def test_rrelu_is_torchs_in_evaluation_and_draws_slopes_in_its_range_in_training() -> None:
    x = torch.linspace(-3, 3, 601)
    ours, theirs = RReLU(0.1, 0.3).eval(), nn.RReLU(0.1, 0.3).eval()
    torch.testing.assert_close(ours(x), theirs(x))
    slopes = RReLU(0.1, 0.3).train()(-torch.ones(10_000))
    assert slopes.min() >= -0.3 and slopes.max() <= -0.1
    assert abs(slopes.mean().item() + 0.2) < 0.01
    assert torch.equal(RReLU().train()(x.abs()), x.abs())  # positive inputs pass


def test_rrelus_slopes_depend_on_the_generator_not_on_the_inputs_signs() -> None:
    """Unlike torch's kernel, which draws only where the input is <= 0: one input rounded
    across 0 must not shift every later slope (a pack member and its solo job round apart)."""
    x = -torch.rand(64, 32)
    flipped = x.clone()
    flipped[0, 0] = 1e-7
    act = RReLU().train()
    a = act(x, generator=torch.Generator().manual_seed(1))
    b = act(flipped, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.flatten()[1:], b.flatten()[1:])
    torch.manual_seed(1)
    assert torch.equal(act(x), a)  # without one: the global generator, as a solo job draws
