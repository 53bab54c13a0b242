"""Every experiment config composes, for every value its sweep would give each swept key."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import get_object, instantiate
from omegaconf import OmegaConf
from torch import nn

from actlab.train import CONFIG_DIR

EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))


@pytest.fixture(autouse=True)
def hydra_config_dir():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        yield


def test_the_reference_experiments_exist() -> None:
    names = {"act_compare", "slope_sweep", "relu_vs_linear", "leaky_mlp", "dying_relu"}
    assert names | {"leaky_regression"} <= set(EXPERIMENTS)


def swept_value_reaches_the_objects(job, key: str, value: str) -> None:
    """The value a sweep gives `key` is the one the built data, model and optimizer use."""
    model = instantiate(job.model)
    acts = [m for m in model.net if not isinstance(m, nn.Linear | nn.Dropout)]
    if key == "model.act":
        option = OmegaConf.load(Path(CONFIG_DIR) / "model.act" / f"{value}.yaml")
        assert acts and all(type(a) is get_object(option._target_) for a in acts)
    elif key == "model.act.negative_slope":
        assert acts and all(a.negative_slope == float(value) for a in acts)
    elif key == "seed":
        assert instantiate(job.data).seed == int(value)  # the batch order, not only the init
    elif key.startswith("optimizer."):
        optimizer = instantiate(job.optimizer)(params=model.parameters())
        assert optimizer.param_groups[0][key.split(".", 1)[1]] == float(value)
    else:
        pytest.fail(f"no check for the swept key {key}: add one here")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_with_each_swept_value(name: str) -> None:
    path = Path(CONFIG_DIR) / "experiment" / f"{name}.yaml"
    # `# @package _global_`, then a comment saying why the experiment exists.
    assert path.read_text().startswith("# @package _global_\n# ")
    base = [f"experiment={name}", "logger=csv"]
    cfg = compose("train", overrides=base, return_hydra_config=True)
    for key, values in dict(cfg.hydra.sweeper.params or {}).items():
        for value in str(values).split(","):
            job = compose("train", overrides=[*base, f"{key}={value}"])
            assert job.task_name == name
            swept_value_reaches_the_objects(job, key, value)


def test_experiment_settings_reach_the_config() -> None:
    cfg = compose("train", overrides=["experiment=relu_vs_linear"])
    assert list(cfg.model.net.hidden_sizes) == [512]
    assert (cfg.optimizer.lr, cfg.optimizer.momentum) == (0.15, 0.0)
    assert (cfg.data.batch_size, cfg.data.val_size, cfg.trainer.max_epochs) == (128, 10000, 50)
    reg = compose("train", overrides=["experiment=leaky_regression"])
    model = instantiate(reg.model)
    assert [m.out_features for m in model.net if hasattr(m, "out_features")] == [10, 10, 2]
    assert model.metric == "r2"
