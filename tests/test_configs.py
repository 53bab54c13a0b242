"""Every option of every config group composes, and the `model.act` group behaves as documented."""

from __future__ import annotations

import pytest
from conftest import compose_train
from hydra.errors import MissingConfigException
from hydra.utils import instantiate
from torch import nn

from actlab import ROOT

CONFIGS = ROOT / "configs"
GROUPS = sorted(
    p.name for p in CONFIGS.iterdir() if p.is_dir() and p.name not in {"hydra", "experiment"}
)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "group,option", [(g, o) for g in GROUPS for o in options(g)], ids=lambda v: str(v)
)
def test_every_group_option_composes(group: str, option: str) -> None:
    cfg = compose_train(f"{group}={option}")
    assert cfg.hydra.runtime.choices[group] == option


@pytest.mark.parametrize("act", options("model.act"))
def test_every_activation_instantiates_one_module_per_layer(act: str) -> None:
    cfg = compose_train(f"model.act={act}", "model.hidden_sizes=[8,8]")
    model = instantiate(cfg.model)
    acts = [m for m in model.net if not isinstance(m, nn.Linear)]
    assert len(acts) == 2 and acts[0] is not acts[1]
    assert all(type(a) is type(acts[0]) for a in acts)


def test_act_group_is_a_choice_and_slope_is_settable() -> None:
    cfg = compose_train("model.act=leaky", "model.act.negative_slope=0.1")
    assert cfg.model.act._target_ == "torch.nn.LeakyReLU"
    layer = instantiate(cfg.model).net[1]
    assert isinstance(layer, nn.LeakyReLU) and layer.negative_slope == 0.1


def test_unknown_activation_lists_the_options() -> None:
    with pytest.raises(MissingConfigException) as e:
        compose_train("model.act=swishy")
    assert "leaky" in str(e.value) and "relu" in str(e.value)
