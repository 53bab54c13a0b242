"""Each `model.act` option's gradient on negative inputs is what its definition says.

The NumPy write-up this project grew from back-propagated Leaky ReLU with ReLU's derivative (0 for
x < 0); autograd through the configured module must give the slope instead.
"""

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

ACT_DIR = Path(__file__).resolve().parents[1] / "configs" / "model.act"
X = torch.tensor([-3.0, -2.0, -1.0, -0.5, -0.1])


def phi(x: float) -> float:
    return math.exp(-x * x / 2) / math.sqrt(2 * math.pi)


def Phi(x: float) -> float:  # noqa: N802 (the usual name of the normal CDF)
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# d act(x) / dx for x < 0, from each function's definition and its config's parameters.
DERIVATIVE = {
    "relu": lambda c, x: 0.0,
    "leaky": lambda c, x: c.negative_slope,
    "none": lambda c, x: 1.0,
    "elu": lambda c, x: c.alpha * math.exp(x),
    "gelu": lambda c, x: Phi(x) + x * phi(x),
    "silu": lambda c, x: sig(x) * (1 + x * (1 - sig(x))),
    "tanh": lambda c, x: 1 - math.tanh(x) ** 2,
    "sigmoid": lambda c, x: sig(x) * (1 - sig(x)),
    "prelu": lambda c, x: c.init,  # the learned slope, at its initial value
    "rrelu": lambda c, x: (c.lower + c.upper) / 2,  # evaluation mode: the mean slope
}
OPTIONS = sorted(p.stem for p in ACT_DIR.glob("*.yaml"))


def test_every_option_has_its_derivative_here() -> None:
    assert set(OPTIONS) == set(DERIVATIVE)


@pytest.mark.parametrize("name", OPTIONS)
def test_gradient_on_negative_inputs(name: str) -> None:
    cfg = OmegaConf.load(ACT_DIR / f"{name}.yaml")
    act = instantiate(cfg)().eval()
    x = X.clone().requires_grad_(True)
    act(x).sum().backward()
    expected = torch.tensor([DERIVATIVE[name](cfg, v) for v in X.tolist()])
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-6)


def test_leaky_relu_values() -> None:
    act = instantiate(OmegaConf.load(ACT_DIR / "leaky.yaml"))()
    assert act.negative_slope == 0.01
    out = act(torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0]))
    torch.testing.assert_close(out, torch.tensor([-0.02, -0.01, 0.0, 1.0, 2.0]))


def test_leaky_relu_gradient_is_not_relus() -> None:
    """The write-up's bug, stated directly: on x < 0 the gradient is the slope, not 0."""
    x = torch.tensor([-2.0, -1.0, 1.0, 2.0], requires_grad=True)
    torch.nn.LeakyReLU(0.01)(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([0.01, 0.01, 1.0, 1.0]))
