"""Every option of every config group composes, and the `model.act` group behaves as documented."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import compose_train
from hydra.core.hydra_config import HydraConfig
from hydra.errors import MissingConfigException
from hydra.utils import instantiate
from torch import nn

from actlab import ROOT
from actlab.errors import UserError
from actlab.train import build

CONFIGS = ROOT / "configs"
GROUPS = sorted(
    p.name for p in CONFIGS.iterdir() if p.is_dir() and p.name not in {"hydra", "experiment"}
)


# Groups whose options need an optional extra's Hydra plugin.
NEEDS = {"hparams_search": ("optuna", "pip install -e '.[search]'")}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def group_option(group: str, option: str):
    module, how = NEEDS.get(group, (None, ""))
    missing = module is not None and importlib.util.find_spec(module) is None
    return pytest.param(
        group,
        option,
        marks=pytest.mark.skipif(missing, reason=f"needs {how}"),
        id=f"{group}={option}",
    )


@pytest.mark.parametrize("group,option", [group_option(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(group: str, option: str) -> None:
    cfg = compose_train(f"{group}={option}")
    assert cfg.hydra.runtime.choices[group] == option


def runnable(group: str, option: str):
    """`group_option`, also skipped where this machine cannot run the option at all."""
    param = group_option(group, option)
    if (group, option) == ("trainer", "gpu") and not torch.cuda.is_available():
        param = pytest.param(
            *param.values, marks=pytest.mark.skip(reason="no GPU here"), id=param.id
        )
    return param


@pytest.mark.parametrize(
    "group,option",
    [runnable(g, o) for g in GROUPS if g != "hparams_search" for o in options(g)],
)
def test_every_group_option_builds_what_a_run_builds(
    group: str, option: str, tmp_path: Path
) -> None:
    """Each option gives working objects, not only a config: the data, the model, the callbacks,
    the loggers and the trainer, built as train.py builds them (nothing is trained)."""
    cfg = compose_train(f"{group}={option}", "data=synthetic", f"paths.output_dir={tmp_path}")
    HydraConfig.instance().set_config(cfg)
    try:
        datamodule, model, trainer = build(cfg)
    except UserError as e:  # an option this install cannot serve must say how to get it
        pytest.fail(f"{group}={option} cannot be built here: {e}")
    assert isinstance(datamodule, L.LightningDataModule) and isinstance(model, L.LightningModule)
    callbacks = {type(c).__name__ for c in trainer.callbacks}
    loggers = {type(lg).__name__ for lg in trainer.loggers}
    if group == "callbacks":
        configured = {c._target_.rsplit(".", 1)[-1] for c in cfg.callbacks.values() if c}
        # Lightning's own default callbacks come in only where the group asks for them.
        lightning_defaults = {"ModelCheckpoint", "TQDMProgressBar", "ModelSummary"}
        assert callbacks & lightning_defaults <= configured
        assert configured <= callbacks
        if option == "none":
            assert trainer.checkpoint_callback is None and trainer.progress_bar_callback is None
    if group == "logger":
        expected = {"csv": {"AppendingCSVLogger"}, "wandb": {"AppendingCSVLogger", "WandbLogger"}}
        expected["tensorboard"] = {"AppendingCSVLogger", "TensorBoardLogger"}
        expected["many"] = expected["wandb"] | expected["tensorboard"]
        assert loggers == expected[option]
    if group == "trainer" and option == "cpu":
        assert trainer.strategy.root_device.type == "cpu"


@pytest.mark.parametrize("act", options("model.act"))
def test_every_activation_instantiates_one_module_per_layer(act: str) -> None:
    cfg = compose_train(f"model.act={act}", "model.net.hidden_sizes=[8,8]")
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
