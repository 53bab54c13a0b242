"""Members that stop (pruned, early-stopped) leave the pack's stack at the end of that epoch: the
later steps compute the others only, who train on as they would have, and a member that stopped
ends as it did when it was only frozen (actlab.pack.PackTrainer._drop)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import PACKABLE, here, here_exit, metric_rows
from omegaconf import OmegaConf
from torch import nn

from actlab.results import SEARCH, read_results
from actlab.stacked_nets import StackedMLP, StackedOptimizer
from hydra_plugins.actlab_packed import PACKS

# Hand-stacked (PReLU: a stacked slope per member), SGD with momentum, the dead-unit probe on.
MLP = [*PACKABLE, "model.act=prelu", "seed=0,1,2", "trainer.log_every_n_steps=3"]
STEPS = 8  # a training epoch's steps: 500 rows (600 less 100 for validation), batches of 64
# A member that trained in a smaller stack after the others left, against the same member in
# a stack that kept them (hand-stacked) or never had them (torch.func), in every metric, csv row,
# weight and optimizer state: measured on this CPU 0.0 hand-stacked; through torch.func 2.4e-7
# (a loss), 4.5e-8 in the weights, 7e-9 in Adam's moments (vmap's batched convolution and
# matmuls add in another order for another number of members).
ATOL = 1e-6


def _sizes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """At each training step: the first stacked parameter's members, and its gradient's (what
    the forward and backward passes computed)."""
    seen = []
    step = StackedOptimizer.step

    def observed(self: StackedOptimizer) -> None:
        seen.append((len(self.params[0]), len(self.params[0].grad)))
        step(self)

    monkeypatch.setattr(StackedOptimizer, "step", observed)
    return seen


def _sweep(folder: Path, *args: str, prune: str | None = None) -> dict[str, Path]:
    """A packed sweep; with `prune`, its pack's pruner (as a search writes one) prunes after the
    first epoch each member whose folder's name contains it."""
    args = ("-m", "hydra/sweeper=packed", *args, f"hydra.sweep.dir={folder}")
    if prune is None:
        here(*args)
    else:
        (folder / PACKS / "pack-0").mkdir(parents=True)
        spec = {"_target_": "probes.prune_after", "epochs": 1, "match": prune}
        OmegaConf.save(spec, folder / PACKS / "pack-0" / SEARCH)
        status, out, _ = here_exit(*args)
        assert status == 1 and "pruned" in out  # a grid sweep's pruned job did not finish
    return {p.parent.name: p.parent for p in folder.glob("*/.hydra")}


def _keys(overrides: list[str]) -> list[str]:
    return [o.partition("=")[0] for o in overrides]


def _pruned(
    tmp: Path, monkeypatch: pytest.MonkeyPatch, prune: str
) -> tuple[list[tuple[int, int]], dict[int, Path]]:
    """The 3-epoch MLP pack with `prune`'s pruner (_sweep): its stack's sizes (_sizes) and jobs."""
    sizes = _sizes(monkeypatch)
    return sizes, _by_seed(_sweep(tmp, *MLP, "trainer.max_epochs=3", prune=prune))


def _by_seed(jobs: dict[str, Path]) -> dict[int, Path]:
    return {OmegaConf.load(f / ".hydra" / "config.yaml").seed: f for f in jobs.values()}


def _rows(folder: Path) -> list[dict[str, float]]:
    return [{k: float(v) for k, v in row.items() if v} for row in metric_rows(folder)]


def _close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert abs(value - b[key]) <= atol, (key, value, b[key])


def _same_member(got: Path, want: Path, atol: float) -> None:
    """Two members' metrics, csv rows and last checkpoints (weights, optimizer state,
    scheduler) equal within `atol`."""
    _close(read_results(got)["metrics"], read_results(want)["metrics"], atol)
    rows, expected = _rows(got), _rows(want)
    assert len(rows) == len(expected)
    for row, other in zip(rows, expected, strict=True):
        _close(row, other, atol)
    cg, cw = (torch.load(f / "checkpoints" / "last.ckpt", weights_only=False) for f in (got, want))
    assert (cg["epoch"], cg["global_step"]) == (cw["epoch"], cw["global_step"])
    assert cg["lr_schedulers"] == cw["lr_schedulers"]
    assert cg["state_dict"].keys() == cw["state_dict"].keys()
    for key, t in cw["state_dict"].items():
        torch.testing.assert_close(cg["state_dict"][key], t, atol=atol, rtol=0)
    og, ow = cg["optimizer_states"][0], cw["optimizer_states"][0]
    assert og["param_groups"] == ow["param_groups"]
    assert og["state"].keys() == ow["state"].keys()
    for i, state in ow["state"].items():
        for key, t in state.items():
            torch.testing.assert_close(og["state"][i][key], t, atol=atol, rtol=0)


def test_after_keep_a_step_gives_the_members_left_what_the_whole_stack_gives_them() -> None:
    """Weights, activation parameters (PReLU's slope), Adam's moments and each member's numbers
    are cut to the members that stay (runs of equal numbers re-formed)."""
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Linear(6, 5), nn.PReLU(), nn.Linear(5, 3)) for _ in range(4)]
    numbers = [{"lr": 0.1}, {"lr": 0.1}, {"lr": 0.2}, {"lr": 0.2, "amsgrad": True}]
    x, y = torch.randn(4, 8, 6), torch.randint(0, 3, (4, 8))

    def stack() -> tuple[StackedMLP, StackedOptimizer]:
        model = StackedMLP(nets, [net[1] for net in nets], ["prelu"] * 4)
        model.generators = [torch.Generator() for _ in nets]
        return model, StackedOptimizer(list(model.parameters()), "torch.optim.Adam", numbers)

    def step(model: StackedMLP, opt: StackedOptimizer, rows: list[int]) -> None:
        for p in model.parameters():
            p.grad = None
        logits = model(x[rows])
        F.cross_entropy(logits.flatten(0, 1), y[rows].flatten(), reduction="sum").backward()
        opt.step()

    (whole, whole_opt), (part, part_opt) = stack(), stack()
    for model, opt in ((whole, whole_opt), (part, part_opt)):
        step(model, opt, [0, 1, 2, 3])
    part.keep([0, 2, 3], [(0, 3)])
    part_opt.keep([0, 2, 3], list(part.parameters()))
    assert [(a, b) for a, b, _ in part_opt.runs] == [(0, 1), (1, 2), (2, 3)]
    step(whole, whole_opt, [0, 1, 2, 3])
    step(part, part_opt, [0, 2, 3])
    for p, q in zip(part.parameters(), whole.parameters(), strict=True):
        assert torch.equal(p, q[[0, 2, 3]])
    for state, full in zip(part_opt.state, whole_opt.state, strict=True):
        assert state.keys() == full.keys() == {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
        for key, t in state.items():
            assert torch.equal(t, full[key][[0, 2, 3]])


@pytest.fixture(scope="module")
def unpruned(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[int, Path], dict[int, Path]]:
    """The pack without a pruner: 3 epochs, and 1 (what a member pruned after it ends as)."""
    folder = tmp_path_factory.mktemp("unpruned")
    whole = _by_seed(_sweep(folder / "3", *MLP, "trainer.max_epochs=3"))
    one = _by_seed(_sweep(folder / "1", *MLP, "trainer.max_epochs=1"))
    return whole, one


def test_a_pruned_member_leaves_the_stack_and_the_others_train_on_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unpruned: tuple[dict, dict]
) -> None:
    whole, one = unpruned
    sizes, jobs = _pruned(tmp_path, monkeypatch, "seed=1")
    # The middle member of three (the stack is kept in order) left after the first epoch.
    assert sizes == [(3, 3)] * STEPS + [(2, 2)] * 2 * STEPS
    record = read_results(jobs[1])
    assert record["status"] == "pruned" and record["epochs"] == 1
    assert record["pruned"] == {"epoch": 1, "val/acc": record["metrics"]["val/acc"]}
    assert "test/acc" in record["metrics"]
    assert {p.name for p in (jobs[1] / "checkpoints").iterdir()} == {
        "best-epoch000.ckpt",
        "last.ckpt",
    }
    # As the member of the pack trained for 1 epoch: the same stack until it stopped.
    _same_member(jobs[1], one[1], atol=0)
    for seed in (0, 2):
        assert read_results(jobs[seed])["status"] == "finished"
        assert read_results(jobs[seed])["pack"]["size"] == 3  # it trained in the pack of 3
        _same_member(jobs[seed], whole[seed], ATOL)


def test_a_pack_whose_members_all_stop_ends_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unpruned: tuple[dict, dict]
) -> None:
    _, one = unpruned
    sizes, jobs = _pruned(tmp_path, monkeypatch, "seed=")
    assert sizes == [(3, 3)] * STEPS  # no step after the first epoch
    for seed, folder in jobs.items():
        record = read_results(folder)
        assert record["status"] == "pruned" and record["epochs"] == 1
        _same_member(folder, one[seed], atol=0)


def test_early_stopped_members_leave_a_torch_func_stack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.func (a CNN, two activations: two vmapped runs), Adam, a scheduler that steps each
    epoch, the dead-unit probe: early stopping's threshold stops half the members after the
    first epoch; the others train on as in a pack of only them."""
    nets = tmp_path / "configs" / "model.net"
    nets.mkdir(parents=True)
    cnn = {"_target_": "user_nets.SmallCNN", "channels": 4, "act": "${model.act}"}
    cnn |= {"in_features": "${data.in_features}", "num_classes": "${data.num_classes}"}
    OmegaConf.save(cnn, nets / "cnn.yaml")
    args = [*PACKABLE, f"hydra.searchpath=[file://{tmp_path / 'configs'}]", "model.net=cnn"]
    args += ["model.act=relu,leaky", "optimizer=adam", "scheduler=step", "scheduler.step_size=1"]
    args += ["callbacks=with_early_stopping", "trainer.max_epochs=3"]
    # Folder names within 255 characters: PACKABLE's keys left out of them.
    args.append(f"hydra.job.config.override_dirname.exclude_keys=[{','.join(_keys(PACKABLE))}]")
    alone = _sweep(tmp_path / "alone", *args, "+callbacks.early_stopping.stopping_threshold=2.0")
    sizes = _sizes(monkeypatch)
    threshold = "+callbacks.early_stopping.stopping_threshold"
    jobs = _sweep(tmp_path / "packed", *args, f"{threshold}=0.0,2.0")
    assert sizes == [(4, 4)] * STEPS + [(2, 2)] * 2 * STEPS
    assert len(jobs) == 4
    for name, folder in jobs.items():
        record = read_results(folder)
        assert record["status"] == "finished" and record["pack"]["size"] == 4
        if f"{threshold}=0.0" in name:  # val/acc > 0 after the first epoch: it stops there
            assert record["epochs"] == 1 and "test/acc" in record["metrics"]
            last = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=False)
            assert last["epoch"] == 0
            (state,) = (v for k, v in last["callbacks"].items() if k.startswith("EarlyStopping"))
            assert state["stopped_epoch"] == 0
            continue
        assert record["epochs"] == 3
        assert "dead/layer1" in record["metrics"]  # the probe, for the members left
        _same_member(folder, alone[name], ATOL)
