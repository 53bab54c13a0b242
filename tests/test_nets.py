"""The network is a config (`model.net`), its sizes come from the data, and the dead-unit probe
finds a user's network's activations by its contract (README "Extending")."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import user_nets
from conftest import CPU, QUICK, compose_train, results, run_command, run_train
from omegaconf import OmegaConf
from torch import nn

from actlab.data import md5, write_idx
from actlab.diagnostics import UnitStats, hidden_activations
from actlab.errors import UserError
from actlab.nets import MLP
from actlab.packing import engine, solo_reason
from actlab.results import config_differences
from actlab.validation import check_net, validate

TESTS = Path(__file__).resolve().parent
# Quick runs the packed sweeper can pack (QUICK's trainer.enable_progress_bar it cannot).
PACKABLE = ["callbacks.progress_bar.refresh_rate=0", "logger=csv", "trainer.max_epochs=2", *CPU]
USER_NETS = {
    "cnn": "_target_: user_nets.SmallCNN\nin_features: ${data.in_features}\n"
    "num_classes: ${data.num_classes}\nact: ${model.act}\nchannels: 4\n",
    "bn_mlp": "_target_: user_nets.BatchNormMLP\nin_features: ${data.in_features}\n"
    "num_classes: ${data.num_classes}\nact: ${model.act}\n",
    "functional": "_target_: user_nets.FunctionalMLP\nin_features: ${data.in_features}\n"
    "num_classes: ${data.num_classes}\n",
}


@pytest.fixture
def configs(tmp_path: Path) -> Path:
    """A config folder of the user's own (on hydra.searchpath) with the networks above."""
    folder = tmp_path / "configs"
    (folder / "model.net").mkdir(parents=True)
    for name, text in USER_NETS.items():
        (folder / "model.net" / f"{name}.yaml").write_text(text)
    return folder


def searchpath(configs: Path) -> str:
    return f"hydra.searchpath=[file://{configs}]"


def idx_data(configs: Path, data_dir: Path, name: str, num_classes: int) -> None:
    """An MNIST-format IDX data set under another name (KMNIST-like), written as its files and
    a data config `data=<name>` that names them: class templates plus noise, so it is learnable."""
    rng = np.random.default_rng(num_classes)
    templates = rng.uniform(0, 255, size=(num_classes, 28, 28))

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % num_classes  # every class, the highest label included
        x = templates[y] * 0.5 + rng.normal(60, 40, size=(n, 28, 28))
        return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.uint8)

    arrays = dict(zip(("train_images", "train_labels"), sample(470), strict=True))
    arrays.update(zip(("test_images", "test_labels"), sample(94), strict=True))
    files = {}
    for key, arr in arrays.items():
        path = data_dir / name / f"{key}-idx-ubyte"
        write_idx(path, arr)
        files[key] = [path.name, md5(path)]
    cfg = {
        "_target_": "actlab.data.MNISTDataModule",
        "source": {
            "_target_": "actlab.data.IDXSource",
            "name": name,
            "files": files,
            "mirrors": [],
        },
        "in_features": 784,
        "num_classes": num_classes,
        "data_dir": "${paths.data_dir}",
        "batch_size": 64,
        "eval_batch_size": 500,
        "val_size": 94,
        "train_size": None,
        "split_seed": 0,
        "seed": "${seed}",
        "mean": 0.3,
        "std": 0.3,
    }
    (configs / "data").mkdir(exist_ok=True)
    OmegaConf.save(OmegaConf.create(cfg), configs / "data" / f"{name}.yaml")


# ---------------------------------------------------------------------------------------------
# The probe's contract, on networks whose units are known by construction


def test_the_probe_finds_the_activation_after_each_linear_and_conv() -> None:
    def found(net: nn.Module) -> list[tuple[str, bool]]:
        return [(type(m).__name__, channels) for m, channels in hidden_activations(net)]

    assert found(user_nets.SmallCNN(784, 10, nn.ReLU)) == [("ReLU", True), ("ReLU", False)]
    assert found(user_nets.BatchNormMLP(784, 10, nn.GELU)) == [("GELU", False)]  # past the BN
    assert found(MLP(784, [8, 8], 10, nn.Tanh, dropout=0.5)) == [("Tanh", False)] * 2
    assert found(MLP(784, [], 10, nn.ReLU)) == []
    assert found(user_nets.FunctionalMLP(784, 10)) == []


def test_a_conv_channel_is_dead_where_it_is_never_positive() -> None:
    net = user_nets.SmallCNN(784, 10, nn.ReLU, channels=4)
    conv = net[1]
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.copy_(torch.tensor([-1.0, 0.0, 1.0, 2.0]))  # channels 0 and 1 never > 0
    stats = UnitStats(net).attach()
    with torch.no_grad():
        for batch in torch.randn(50, 784).split(16):
            net(batch)
    stats.detach()
    got = stats.tensors()
    assert got["dead/layer1"].item() == 0.5
    assert got["act_mean/layer1"].item() == pytest.approx((0 + 0 + 1 + 2) / 4)
    assert stats.n == 50  # samples, not positions


def test_a_network_that_does_not_fit_the_data_is_refused() -> None:
    with pytest.raises(UserError, match=r"cannot take the data's rows \[batch, 100\]"):
        check_net(user_nets.SmallCNN(784, 10, nn.ReLU), 100, 10)
    with pytest.raises(UserError, match=r"gives \[2, 10\] .* the data has 47 classes"):
        check_net(MLP(784, [8], 10, nn.ReLU), 784, 47)
    net = user_nets.BatchNormMLP(784, 10, nn.ReLU)
    check_net(net, 784, 10)
    assert net.training and net.layers[1].num_batches_tracked == 0  # nothing of it changed


def test_a_data_config_without_its_sizes_is_refused() -> None:
    with pytest.raises(UserError, match=r"data.num_classes is not set: the data config says it"):
        validate(compose_train("data=synthetic", "~data.num_classes"))


def test_a_batchnorm_mlp_packs_through_torch_func_and_one_vmap_cannot_run_runs_solo() -> None:
    assert solo_reason(compose_train("data=synthetic")) is None
    net = ["model.net._target_=user_nets.BatchNormMLP", "~model.net.hidden_sizes"]
    cfg = compose_train("data=synthetic", *net, "~model.net.dropout")
    assert solo_reason(cfg) is None and engine(cfg) == "torch.func"  # its buffers stacked
    # BatchNorm's cumulative average reads its step count as a number: not under vmap.
    cfg = compose_train("data=synthetic", *net, "~model.net.dropout", "+model.net.momentum=null")
    reason = solo_reason(cfg)
    assert reason.startswith(
        "model.net user_nets.BatchNormMLP cannot be stacked (the network is a "
        "user_nets.BatchNormMLP, not an nn.Sequential) nor packed through torch.func: "
        "torch.func.vmap of its forward raised RuntimeError on the probe (vmap: It looks like "
        "you're calling .item() on a Tensor."
    ), reason


# ---------------------------------------------------------------------------------------------
# Whole runs


@pytest.mark.slow
def test_a_cnn_and_a_batchnorm_mlp_as_model_net_train_in_a_packed_sweep(
    configs: Path, tmp_path: Path
) -> None:
    """Both could pack (through torch.func, tests/test_pack_func.py), but each alone in the
    sweep is a job of its own, a pack of one."""
    sweep = tmp_path / "sweep"
    proc = run_train(
        "-m",
        "data=synthetic",
        *PACKABLE,
        "hydra/sweeper=packed",
        "model.net=cnn,bn_mlp",
        searchpath(configs),
        f"hydra.sweep.dir={sweep}",
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "runs as a solo job: model.net" not in out
    assert "2 jobs as 0 pack(s) and 2 solo job(s)" in out
    jobs = {
        results(p.parent)["job"]["overrides"][-1]: results(p.parent) for p in sweep.glob("*/.hydra")
    }
    assert sorted(jobs) == ["model.net=bn_mlp", "model.net=cnn"]
    for name, record in jobs.items():
        assert record["status"] == "finished" and record["pack"]["size"] == 1, name
        assert {"test/acc", "dead/layer1", "grad_norm/layer1", "grad_norm/output"} <= set(
            record["metrics"]
        ), name
    assert "dead/layer2" in jobs["model.net=cnn"]["metrics"]  # the conv's and the hidden Linear's
    assert "dead/layer2" not in jobs["model.net=bn_mlp"]["metrics"]


@pytest.mark.slow
def test_a_network_without_activation_modules_trains_and_the_probe_says_it_skips(
    configs: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    proc = run_train(
        *QUICK, "logger=csv", "model.net=functional", searchpath(configs), f"hydra.run.dir={run}"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = results(run)
    assert record["status"] == "finished"
    assert not any(k.startswith(("dead/", "rare/", "act_mean/")) for k in record["metrics"])
    lines = [line for line in (run / "train.log").read_text().splitlines() if "dead units:" in line]
    assert len(lines) == 1 and "model.net (FunctionalMLP) has no activation module" in lines[0]


@pytest.mark.slow
def test_a_kmnist_like_idx_data_set_trains_and_packs(configs: Path, tmp_path: Path) -> None:
    # Not "kmnist": the template's own data=kmnist (torchvision's) would win over a searchpath's.
    idx_data(configs, tmp_path / "data", "kmnist_like", 10)
    base = ["data=kmnist_like", f"paths.data_dir={tmp_path / 'data'}", searchpath(configs)]
    run = tmp_path / "run"
    proc = run_train(*base, *PACKABLE, f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert results(run)["status"] == "finished" and results(run)["config"]["data"] == "kmnist_like"
    sweep = tmp_path / "sweep"
    proc = run_train(
        "-m",
        *base,
        *PACKABLE,
        "hydra/sweeper=packed",
        "model.act=relu,leaky",
        f"hydra.sweep.dir={sweep}",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = [results(p.parent) for p in sweep.glob("*/.hydra")]
    assert len(records) == 2
    for record in records:
        assert record["status"] == "finished" and record["pack"]["size"] == 2


def _run_emnist_like(configs: Path, tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`python train.py` on a 47-class IDX data set (EMNIST-like), into tmp_path/run."""
    idx_data(configs, tmp_path / "data", "emnist_like", 47)
    return run_train(
        "data=emnist_like",
        f"paths.data_dir={tmp_path / 'data'}",
        searchpath(configs),
        *QUICK[4:],
        "logger=csv",
        *overrides,
        f"hydra.run.dir={tmp_path / 'run'}",
    )


@pytest.mark.slow
def test_a_47_class_data_set_trains_with_a_read_out_sized_by_the_data(
    configs: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    proc = _run_emnist_like(
        configs, tmp_path, "trainer.max_epochs=1", "model.net.hidden_sizes=[16]"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = results(run)
    assert record["status"] == "finished" and "test/acc" in record["metrics"]
    state = torch.load(record["best_checkpoint"], weights_only=False)["state_dict"]
    assert state["net.2.weight"].shape == (47, 16)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "error"),
    [
        (
            "data.num_classes=10",
            "error: the labels of emnist_like reach 46 but data.num_classes=10 (the network's "
            "read-out is that wide): set data.num_classes=47 in the data config.",
        ),
        (
            "model.net.num_classes=10",
            "error: model.net (MLP) gives [2, 10] for [2, 784] rows but the data has 47 classes "
            "(data.num_classes): make its output [batch, 47], e.g. by reading ${data.num_classes} "
            "in its config.",
        ),
    ],
)
def test_a_read_out_narrower_than_the_labels_is_refused_before_training(
    configs: Path, tmp_path: Path, override: str, error: str
) -> None:
    run = tmp_path / "run"
    proc = _run_emnist_like(configs, tmp_path, override)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.splitlines()[-1] == error  # the last line, and no traceback before it
    assert "Traceback" not in proc.stderr and proc.stderr.count("error:") == 1
    assert results(run)["status"] == "failed"
    assert not list(run.glob("checkpoints/*.ckpt"))


# ---------------------------------------------------------------------------------------------
# A run saved before the network was `model.net`

OLD_RUN = TESTS / "old_run"  # .hydra/ files the version before `model.net` wrote (same run)


def old_overrides() -> list[str]:
    return list(OmegaConf.load(OLD_RUN / "overrides.yaml"))


def test_an_old_config_reads_as_todays() -> None:
    old = OmegaConf.to_container(OmegaConf.load(OLD_RUN / "config.yaml"))
    moved = [o.replace("model.hidden_sizes", "model.net.hidden_sizes") for o in old_overrides()]
    now = OmegaConf.to_container(compose_train(*moved), resolve=False)
    del now["hydra"]
    assert config_differences(old, now) == []
    assert config_differences(old, {**now, "seed": 1}) == ["seed: 0 -> 1"]  # it does compare


@pytest.mark.slow
def test_an_old_run_folder_evaluates_and_resumes(tmp_path: Path) -> None:
    """Trained today with the old run's settings, then given its old .hydra/ files: eval.py and
    `ckpt_path=` read the old config and the checkpoint's names (net.0.weight, ...)."""
    run = tmp_path / "run"
    moved = [o.replace("model.hidden_sizes", "model.net.hidden_sizes") for o in old_overrides()]
    proc = run_train(*moved, f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("config.yaml", "overrides.yaml"):
        shutil.copy(OLD_RUN / name, run / ".hydra" / name)
    record = results(run)
    best = Path(record["best_checkpoint"])
    names = [k for k in torch.load(best, weights_only=False)["state_dict"] if k.startswith("net.")]
    assert names == ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]

    proc = run_command([sys.executable, TESTS.parent / "eval.py", f"ckpt_path={best}"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tested = json.loads((run / f"eval_{best.stem}.json").read_text())["metrics"]
    assert tested["test/acc"] == record["metrics"]["test/acc"]

    proc = run_train(f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "trainer.max_epochs=2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert results(run)["status"] == "finished" and results(run)["epochs"] == 2
