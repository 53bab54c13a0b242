"""Every experiment config composes, for every value its sweep would give each swept key."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

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


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_with_each_swept_value(name: str) -> None:
    base = [f"experiment={name}", "logger=csv"]
    cfg = compose("train", overrides=base, return_hydra_config=True)
    assert (
        (Path(CONFIG_DIR) / "experiment" / f"{name}.yaml")
        .read_text()
        .startswith(
            "# @package _global_\n# "  # and the reason for the experiment follows
        )
    )
    sweep = dict(cfg.hydra.sweeper.params or {})
    runs = [[]] + [[f"{k}={v}"] for k, values in sweep.items() for v in str(values).split(",")]
    for extra in runs:
        job = compose("train", overrides=base + extra)
        model = instantiate(job.model)
        assert model.net[0].in_features == job.model.in_features
        assert job.task_name == name


def test_experiment_settings_reach_the_config() -> None:
    cfg = compose("train", overrides=["experiment=relu_vs_linear"])
    assert list(cfg.model.hidden_sizes) == [512]
    assert (cfg.optimizer.lr, cfg.optimizer.momentum) == (0.15, 0.0)
    assert (cfg.data.batch_size, cfg.data.val_size, cfg.trainer.max_epochs) == (128, 10000, 50)
    reg = compose("train", overrides=["experiment=leaky_regression"])
    model = instantiate(reg.model)
    assert [m.out_features for m in model.net if hasattr(m, "out_features")] == [10, 10, 2]
    assert model.metric == "r2"
