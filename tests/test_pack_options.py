"""Options that pack: schedulers, SGD with Nesterov or dampening, Adam with amsgrad, AdamW, the
regression task, early stopping and dropout (on a CPU). Each member of a pack equals its solo
job."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import CPU, LIGHTNING_LOOP, compose_train, ctrl_c_after_epoch, here, net_weights
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from test_pack import WEIGHT_ATOL, _columns
from torch import nn

from actlab.model import MLPClassifier
from actlab.results import read_results
from actlab.stacked_nets import StackedMLP, StackedOptimizer

SWEEP = ["data=synthetic", "data.source.n_train=1000", "logger=csv"]
SWEEP += ["callbacks.progress_bar.refresh_rate=0", "callbacks.model_summary=null", *CPU]


def _sweep(folder: Path, *args: str) -> dict[str, Path]:
    here("-m", *args, f"hydra.sweep.dir={folder}")
    return {p.parent.name: p.parent for p in folder.glob("*/.hydra")}


def _solo_and_packed(
    tmp: Path, *args: str, solo_args: tuple[str, ...] = ()
) -> tuple[dict[str, Path], dict[str, Path]]:
    solo = _sweep(tmp / "solo", "hydra/sweeper=basic", *args, *solo_args)
    solo = {_without(name, solo_args): folder for name, folder in solo.items()}
    if LIGHTNING_LOOP in solo_args:  # the reference trained under Lightning's loop, not a pack
        assert all("pack" not in read_results(folder) for folder in solo.values())
    packed = _sweep(tmp / "packed", "hydra/sweeper=packed", *args)
    assert sorted(solo) == sorted(packed)
    return solo, packed


def _without(name: str, overrides: tuple[str, ...]) -> str:
    """A job's folder name without `overrides` (its name among the packed sweep's)."""
    return ",".join(o for o in name.split(",") if o not in overrides)


def _last(folder: Path) -> dict:
    return torch.load(folder / "checkpoints" / "last.ckpt", weights_only=False)


def _early_stopping(ckpt: dict) -> dict:
    return {k: v for k, v in ckpt["callbacks"].items() if k.startswith("EarlyStopping")}


def _assert_members_are_their_solo_jobs(
    solo: dict[str, Path], packed: dict[str, Path], metric: str = "acc"
) -> None:
    """Records, metrics, best checkpoint, weights, optimizer, scheduler and early-stopping
    state of each member against its solo job's."""
    for name, folder in packed.items():
        s, p = read_results(solo[name]), read_results(folder)
        assert p["status"] == s["status"] == "finished", (name, p.get("error"))
        assert p["pack"]["size"] == len(packed)  # it trained in the pack, not alone
        assert p["epochs"] == s["epochs"]
        assert set(p["metrics"]) == set(s["metrics"])
        for key in (f"val/{metric}", f"val/{metric}_best", f"test/{metric}"):
            assert abs(p["metrics"][key] - s["metrics"][key]) <= 0.001, (name, key)
        assert Path(p["best_checkpoint"]).name == Path(s["best_checkpoint"]).name
        assert sorted(_columns(folder)) == sorted(_columns(solo[name]))
        for ckpt in (s["best_checkpoint"], solo[name] / "checkpoints" / "last.ckpt"):
            ws, wp = net_weights(ckpt), net_weights(folder / Path(ckpt).relative_to(solo[name]))
            for key in ws:
                torch.testing.assert_close(wp[key], ws[key], atol=WEIGHT_ATOL, rtol=0)
        cs, cp = _last(solo[name]), _last(folder)
        assert (cp["epoch"], cp["global_step"]) == (cs["epoch"], cs["global_step"])
        # torch's own formats, the same numbers (learning rate included) as the solo job's
        want, got = cs["optimizer_states"][0], cp["optimizer_states"][0]
        assert got["param_groups"] == want["param_groups"]
        assert got["state"].keys() == want["state"].keys()
        for i, state in want["state"].items():
            assert got["state"][i].keys() == state.keys()
            for key, t in state.items():
                torch.testing.assert_close(got["state"][i][key], t, atol=WEIGHT_ATOL, rtol=0)
        assert cp["lr_schedulers"] == cs["lr_schedulers"]
        assert _early_stopping(cp) == _early_stopping(cs)


@pytest.mark.slow
def test_each_member_steps_with_its_solo_jobs_learning_rate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = [*SWEEP, "trainer.max_epochs=3", "scheduler=cosine"]
    args += ["model.act=relu", "optimizer.lr=0.05,0.1"]
    solo_lrs: dict[str, list[float]] = {}
    step = MLPClassifier.training_step

    def training_step(self: MLPClassifier, batch: object, batch_idx: int) -> torch.Tensor:
        job = _without(Path(HydraConfig.get().runtime.output_dir).name, (LIGHTNING_LOOP,))
        solo_lrs.setdefault(job, []).append(self.optimizers().param_groups[0]["lr"])
        return step(self, batch, batch_idx)

    packed_lrs: list[list[float | None]] = []  # per step, each member's
    stacked_step = StackedOptimizer.step

    def stacked(self: StackedOptimizer) -> None:
        lrs = [None] * len(self.active)
        for a, b, numbers in self.runs:
            lrs[a:b] = [numbers["lr"]] * (b - a)
        packed_lrs.append(lrs)
        stacked_step(self)

    monkeypatch.setattr(MLPClassifier, "training_step", training_step)
    monkeypatch.setattr(StackedOptimizer, "step", stacked)
    # The solo jobs under Lightning's loop: a real scheduler on a real optimizer, stepped there.
    solo, packed = _solo_and_packed(tmp_path, *args, solo_args=(LIGHTNING_LOOP,))
    _assert_members_are_their_solo_jobs(solo, packed)
    for name, folder in packed.items():
        k = read_results(folder)["pack"]["member"]
        assert [lrs[k] for lrs in packed_lrs] == solo_lrs[name]
        assert len(set(solo_lrs[name])) == 3  # one learning rate per epoch


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [
        ["+optimizer.nesterov=true", "optimizer.lr=0.03,0.05"],
        [
            "optimizer=adam",
            "optimizer._target_=torch.optim.AdamW",
            "optimizer.weight_decay=0.1",
            "+optimizer.amsgrad=true,false",
        ],
    ],
    ids=["sgd-nesterov", "adamw-amsgrad"],
)
def test_members_with_other_optimizers_are_their_solo_jobs(
    tmp_path: Path, options: list[str]
) -> None:
    solo, packed = _solo_and_packed(tmp_path, *SWEEP, "trainer.max_epochs=2", *options)
    assert len(packed) == 2
    _assert_members_are_their_solo_jobs(solo, packed)


@pytest.mark.slow
def test_regression_members_are_their_solo_jobs(tmp_path: Path) -> None:
    """MSE and R^2 per member; the best checkpoint by val/r2, as experiment=leaky_regression
    monitors it."""
    args = ["experiment=leaky_regression", "data.source.n_train=1500", *SWEEP[2:]]
    args += ["trainer.max_epochs=3", "model.act=leaky,none"]
    solo, packed = _solo_and_packed(tmp_path, *args)
    assert len(packed) == 2
    _assert_members_are_their_solo_jobs(solo, packed, metric="r2")
    for folder in packed.values():
        assert "val/r2_best" in read_results(folder)["metrics"]


@pytest.mark.slow
def test_an_early_stopped_member_is_recorded_as_its_solo_job(tmp_path: Path) -> None:
    """A member that stops is frozen and ends as its solo job does (its epochs, its best
    checkpoint, tested on it, early stopping's state in its checkpoints); the others train on."""
    # Not SWEEP: a folder's name (the overrides) must stay within 255 characters.
    args = ["data=synthetic", "logger=csv", "callbacks.progress_bar.refresh_rate=0", *CPU]
    args += ["trainer.max_epochs=3", "callbacks=with_early_stopping"]
    args += ["callbacks.early_stopping.patience=1", "callbacks.early_stopping.min_delta=0.01"]
    args.append("optimizer.lr=0.01,0.1")
    solo, packed = _solo_and_packed(tmp_path, *args)
    assert len(packed) == 2
    _assert_members_are_their_solo_jobs(solo, packed)
    epochs = {read_results(f)["epochs"] for f in packed.values()}
    assert min(epochs) < 3 == max(epochs)  # one stopped early, one trained to max_epochs
    for folder in packed.values():
        (state,) = _early_stopping(_last(folder)).values()
        assert state["stopped_epoch"] in (0, read_results(folder)["epochs"] - 1)


@pytest.mark.slow
def test_a_members_checkpoint_resumes_its_scheduler(tmp_path: Path) -> None:
    """`ckpt_path=` of a packed member's last.ckpt goes on to the numbers of an uninterrupted
    solo run: its scheduler's state came with it."""
    args = [*SWEEP, "trainer.max_epochs=2", "scheduler=step", "scheduler.step_size=1"]
    args.append("scheduler.gamma=0.5")
    packed = _sweep(tmp_path / "packed", "hydra/sweeper=packed", *args, "model.act=relu,none")
    member = next(iter(packed.values()))
    assert read_results(member)["pack"]["size"] == 2
    overrides = [str(o) for o in OmegaConf.load(member / ".hydra" / "overrides.yaml")]
    here(f"ckpt_path='{member}/checkpoints/last.ckpt'", "trainer.max_epochs=3")
    fresh = tmp_path / "fresh"
    here(*overrides, "trainer.max_epochs=3", f"hydra.run.dir={fresh}")
    resumed, expected = read_results(member), read_results(fresh)
    assert resumed["epochs"] == expected["epochs"] == 3
    for key in ("val/acc", "test/acc"):
        assert abs(resumed["metrics"][key] - expected["metrics"][key]) <= 0.001
    cr, cf = _last(member), _last(fresh)
    assert cr["lr_schedulers"] == cf["lr_schedulers"]
    assert cr["optimizer_states"][0]["param_groups"] == cf["optimizer_states"][0]["param_groups"]
    for key, w in net_weights(str(fresh / "checkpoints" / "last.ckpt")).items():
        torch.testing.assert_close(cr["state_dict"][key], w, atol=WEIGHT_ATOL, rtol=0)


@pytest.mark.parametrize(
    ("target", "members"),
    [
        (
            "torch.optim.SGD",
            [
                {"lr": 0.1, "momentum": 0.9, "nesterov": True},
                {"lr": 0.1, "momentum": 0.9, "nesterov": True},
                {"lr": 0.1, "momentum": 0.9, "dampening": 0.5, "weight_decay": 0.01},
                {"lr": 0.03},
            ],
        ),
        (
            "torch.optim.Adam",
            [
                {"lr": 1e-3, "amsgrad": True},
                {"lr": 1e-3, "amsgrad": True, "weight_decay": 0.1},
                {"lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-6},
                {"lr": 1e-2},
            ],
        ),
        (
            "torch.optim.AdamW",
            [{"lr": 1e-3}, {"lr": 1e-3, "weight_decay": 0.1}, {"lr": 3e-3, "amsgrad": True}, {}],
        ),
    ],
)
def test_each_member_gets_its_solo_optimizers_update_and_state_bit_for_bit(
    target: str, members: list[dict]
) -> None:
    """Same gradients in, the same parameters and state_dict out as torch.optim, exactly, also
    after each member's learning rate changes (a scheduler's step)."""
    torch.manual_seed(0)
    K = len(members)
    stacked = [nn.Parameter(torch.randn(K, 5, 3)), nn.Parameter(torch.randn(K, 1, 3))]
    ours = StackedOptimizer(stacked, target, members)

    def solo_view(t: torch.Tensor, k: int, i: int) -> torch.Tensor:
        """Member k's tensor as its solo optimizer holds it: a Linear's [out, in], a bias."""
        return (t[k].T if i == 0 else t[k, 0]).detach().clone().contiguous()

    solo = [[nn.Parameter(solo_view(p, k, i)) for i, p in enumerate(stacked)] for k in range(K)]
    cls = getattr(torch.optim, target.rsplit(".", 1)[1])
    theirs = [cls(ps, **m) for ps, m in zip(solo, members, strict=True)]
    for step in range(6):
        if step == 3:
            for k, opt in enumerate(theirs):
                opt.param_groups[0]["lr"] *= 0.5 + 0.1 * k
            ours.set_groups([opt.param_groups[0] for opt in theirs])
        grads = [torch.randn_like(p) for p in stacked]
        for p, g in zip(stacked, grads, strict=True):
            p.grad = g.clone()
        ours.step()
        for k, (ps, opt) in enumerate(zip(solo, theirs, strict=True)):
            for i, (p, g) in enumerate(zip(ps, grads, strict=True)):
                p.grad = solo_view(g, k, i)
            opt.step()
    for k, opt in enumerate(theirs):
        for i, (p, q) in enumerate(zip(stacked, solo[k], strict=True)):
            assert torch.equal(solo_view(p, k, i), q)
        expected = opt.state_dict()
        got = ours.member_state(k, expected["param_groups"], ["weight", "bias"])
        assert got["param_groups"] == expected["param_groups"]
        assert got["state"].keys() == expected["state"].keys()
        for i, state in expected["state"].items():
            assert got["state"][i].keys() == state.keys(), (k, i)
            for key, t in state.items():
                assert torch.equal(got["state"][i][key], t), (k, i, key)


@pytest.mark.slow
def test_an_interrupted_pack_resumes_its_schedulers_and_early_stopping(tmp_path: Path) -> None:
    """`+resume=true` continues each member from its last.ckpt (learning rate, scheduler, early
    stopping's wait) to the numbers of its uninterrupted solo job."""
    args = ["data=synthetic", "logger=csv", "callbacks.progress_bar.refresh_rate=0", *CPU]
    args += ["trainer.max_epochs=3", "scheduler=step", "scheduler.step_size=1"]
    args += ["callbacks=with_early_stopping", "callbacks.early_stopping.patience=1"]
    args += ["callbacks.early_stopping.min_delta=0.01", "optimizer.lr=0.01,0.1"]
    # The CPU pin out of the folders' names, which would grow past 255 characters with it.
    unnamed = [*compose_train().hydra.job.config.override_dirname.exclude_keys, "trainer"]
    args.append(f"hydra.job.config.override_dirname.exclude_keys=[{','.join(unnamed)}]")
    solo = _sweep(tmp_path / "solo", *args)
    args = ["hydra/sweeper=packed", *args, f"hydra.sweep.dir={tmp_path / 'packed'}"]
    with ctrl_c_after_epoch(0), pytest.raises(SystemExit):
        here("-m", *args)
    packed = {p.parent.name: p.parent for p in (tmp_path / "packed").glob("*/.hydra")}
    assert all(read_results(f)["status"] == "interrupted" for f in packed.values())
    here("-m", *args, "+resume=true")
    assert all(read_results(f)["resumed_from"] for f in packed.values())
    _assert_members_are_their_solo_jobs(solo, packed)


def test_a_members_dropout_masks_are_its_solo_jobs() -> None:
    """nn.Dropout in training mode draws from the global generator; a member's own generator,
    started in that state, draws the same masks, step after step."""
    torch.manual_seed(3)
    nets = [nn.Sequential(nn.Linear(6, 50), nn.ReLU(), nn.Dropout(0.3), nn.Linear(50, 3))] * 2
    model = StackedMLP(nets, [nn.ReLU(), nn.ReLU()])
    x = torch.randn(2, 33, 50)
    state = torch.get_rng_state()
    model.generators = [torch.Generator().set_state(state), torch.Generator().manual_seed(1)]
    dropout = nn.Dropout(0.3).train()
    for _ in range(3):
        got = model.dropout(x)
        assert torch.equal(got[0], dropout(x[0]))
        assert not torch.equal(got[1] == 0, got[0] == 0)  # the other member's own masks


@pytest.mark.slow
@pytest.mark.parametrize(
    "grid",
    [
        ["model.net.dropout=0.2", "model.act=relu,none"],
        # RReLU's random slopes, beside members without them
        ["model.act=rrelu,relu", "seed=0,1"],
    ],
    ids=["dropout", "rrelu"],
)
def test_members_that_draw_random_numbers_are_their_solo_jobs(
    tmp_path: Path, grid: list[str]
) -> None:
    solo, packed = _solo_and_packed(tmp_path, *SWEEP, "trainer.max_epochs=2", *grid)
    assert len(packed) == 2 * (len(grid[1].split(",")) if "seed" in grid[1] else 1)
    _assert_members_are_their_solo_jobs(solo, packed)
