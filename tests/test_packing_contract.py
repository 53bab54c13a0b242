"""Packing by contract (actlab.packing): a probe, not a list, decides which activations stack;
learnable ones stack with their parameters per member; a job the pack engine cannot take (its
own network, its own data, random activations) runs solo with a true reason, and finishes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    PACKABLE,
    compose_train,
    ctrl_c_after_epoch,
    net_weights,
    run_command,
    run_train,
)
from hydra.utils import instantiate
from test_pack import WEIGHT_ATOL, _main
from torch import nn
from user_modules import LearnableSwish, Softmax, Swish

from actlab import ROOT, packing, stacked_nets
from actlab.activations import RReLU
from actlab.errors import UserError
from actlab.results import read_results
from actlab.validation import validate

# Folder names are the overrides: short ones, or a path grows past the file system's limit.
BASE = [
    *PACKABLE,
    "trainer.max_epochs=2",
    "model.net.hidden_sizes=[16,16]",
]
NEW_ACTS = [
    "torch.nn.Mish",
    "torch.nn.Softplus",
    "torch.nn.Hardswish",
    "user_modules.Swish",
    "torch.nn.PReLU",
    "user_modules.LearnableSwish",
]


def _sweep(folder: Path, *args: str, base: list[str] = BASE) -> tuple[dict[str, Path], str]:
    proc = run_train("-m", *base, *args, f"hydra.sweep.dir={folder}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {p.parent.name: p.parent for p in folder.glob("*/.hydra")}, proc.stdout + proc.stderr


def _assert_equal_to_solo(packed: dict[str, Path], solo: dict[str, Path], size: int) -> None:
    assert any(name in solo for name in packed)
    for name, folder in packed.items():
        p = read_results(folder)
        assert p["status"] == "finished" and p["pack"]["size"] == size, (name, p.get("error"))
        if name not in solo:
            continue
        s = read_results(solo[name])
        for key in ("val/acc_best", "test/acc"):
            assert abs(p["metrics"][key] - s["metrics"][key]) <= 0.001, (name, key)
        ws, wp = net_weights(s["best_checkpoint"]), net_weights(p["best_checkpoint"])
        assert set(wp) == set(ws), name  # the activation's parameters too, by their solo names
        for key in ws:
            torch.testing.assert_close(wp[key], ws[key], atol=WEIGHT_ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# The probe and the rules (cheap)


@pytest.mark.parametrize(
    "act",
    [nn.Mish(), nn.Softplus(), nn.Hardswish(), Swish(2.0), nn.PReLU(), nn.PReLU(16)]
    + [LearnableSwish(0.5), nn.ReLU(), nn.LeakyReLU(0.1), nn.Identity()],
    ids=repr,
)
def test_the_probe_passes_elementwise_activations(act: nn.Module) -> None:
    assert packing.probe(act, 16) is None


@pytest.mark.parametrize(
    ("act", "reason"),
    [
        (nn.RReLU(), "a second call gives another output (it draws random numbers)"),
        (RReLU(), "a second call gives another output (it draws random numbers)"),
        (nn.Dropout(0.1), "draws random numbers"),
        (Softmax(), "a permuted input does not give the permuted output"),
        (nn.BatchNorm1d(16), "it has buffers (running_mean, running_var"),
        (nn.BatchNorm1d(16, affine=False, track_running_stats=False), "permuted input"),
        (nn.Linear(16, 16), "a changed input changes other outputs too"),
        (nn.LayerNorm(16), "a changed input changes other outputs too"),
        (nn.Flatten(0), "it changes its input's shape"),
    ],
    ids=lambda v: repr(v) if isinstance(v, nn.Module) else "",
)
def test_the_probe_refuses_what_a_stack_would_change_and_says_why(
    act: nn.Module, reason: str
) -> None:
    assert reason in packing.probe(act, 16)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (["model.act._target_=torch.nn.Mish"], None),
        (["model.act._target_=torch.nn.Softplus"], None),
        (["model.act._target_=torch.nn.Hardswish"], None),
        (["model.act._target_=user_modules.Swish"], None),
        (["model.act=prelu"], None),
        (["model.act=prelu", "model.act.num_parameters=256"], None),
        (["model.act._target_=user_modules.LearnableSwish"], None),
        (["model.net.hidden_sizes=[]", "model.act=rrelu"], None),  # nothing to activate
        (["model.act=rrelu"], None),  # on a CPU: each member draws its solo slopes
        (
            ["model._target_=user_modules.BatchNormMLP"],
            "model user_modules.BatchNormMLP is not actlab.model.MLPClassifier",
        ),
        (
            ["model._target_=user_modules.SmallCNN"],
            "model user_modules.SmallCNN is not actlab.model.MLPClassifier",
        ),
        (
            ["data._target_=user_modules.RandomDataModule"],
            "data user_modules.RandomDataModule is not actlab.data.MNISTDataModule",
        ),
        (["+model.act.stackable=false"], "model.act torch.nn.ReLU has stackable: false"),
        (["model.act._target_=user_modules.Softmax", "+model.act.stackable=true"], None),
        (["model.act=rrelu", "+model.act.stackable=true"], None),
        (["model.net.dropout=0.1"], None),  # on a CPU: each member draws its solo masks
    ],
)
def test_a_job_packs_by_contract_or_says_the_true_reason(
    overrides: list[str], reason: str | None
) -> None:
    got = packing.solo_reason(compose_train(*overrides))
    assert got is None if reason is None else reason in got, got


@pytest.mark.parametrize(
    ("net", "reason"),
    [
        (nn.Sequential(nn.Linear(4, 3), nn.Mish(), nn.Linear(3, 2)), None),
        (nn.Sequential(nn.Linear(4, 2)), None),
        (
            nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2)),
            "layer 2 is torch.nn.modules.activation.ReLU where a pack stacks only nn.Linear",
        ),
        (
            nn.Sequential(nn.Unflatten(1, (1, 2, 2)), nn.Conv2d(1, 1, 2), nn.Flatten()),
            "layer 0 is torch.nn.modules.flatten.Unflatten",
        ),
        (nn.Sequential(nn.Linear(4, 3, bias=False), nn.ReLU(), nn.Linear(3, 2)), "(with bias)"),
        (nn.Sequential(nn.Linear(4, 3), nn.ReLU()), "does not end with an nn.Linear"),
        (nn.Linear(4, 2), "not an nn.Sequential"),
    ],
)
def test_a_network_stacks_only_as_linear_layers_and_activations(
    net: nn.Module, reason: str | None
) -> None:
    got = packing.network_reason(net)
    assert got is None if reason is None else reason in got, got


def test_an_activation_with_other_parameter_shapes_is_another_pack() -> None:
    def key(*overrides: str) -> str:
        return packing.pack_key(compose_train(*overrides))

    free = key("model.act=relu", "seed=1")
    assert key("model.act._target_=torch.nn.Mish") == key("model.act=leaky") == free
    assert key("model.act=prelu", "model.act.init=0.1") == key("model.act=prelu", "seed=2")
    assert (
        len({free, key("model.act=prelu"), key("model.act=prelu", "model.act.num_parameters=256")})
        == 3
    )


def test_the_sweeper_builds_each_distinct_model_once(monkeypatch: pytest.MonkeyPatch) -> None:
    built = []
    decide = packing._decide
    monkeypatch.setattr(packing, "_MODELS", {})
    monkeypatch.setattr(packing, "_decide", lambda *args: built.append(args) or decide(*args))
    for seed in range(3):
        for lr in (0.01, 0.1):
            cfg = compose_train("model.act=prelu", f"seed={seed}", f"optimizer.lr={lr}")
            packing.solo_reason(cfg)
            packing.pack_key(cfg)
    assert len(built) == 1


def test_stackable_is_read_by_the_rules_and_never_given_to_the_activation() -> None:
    for value in ("true", "false"):
        cfg = compose_train("model.act=leaky", f"+model.act.stackable={value}")
        validate(cfg)
        net = instantiate(cfg.model).net  # what a solo job and a pack's member both build
        assert isinstance(net[1], nn.LeakyReLU)
    with pytest.raises(UserError, match="model.act.stackable=3 must be true or false"):
        validate(compose_train("+model.act.stackable=3"))


# ---------------------------------------------------------------------------------------------
# End to end: packed members equal their solo jobs; what cannot pack runs solo and finishes


@pytest.mark.slow
def test_new_and_own_activations_pack_and_each_member_equals_its_solo_job(
    tmp_path: Path,
) -> None:
    acts = "model.act._target_=" + ",".join(NEW_ACTS)
    packed, out = _sweep(tmp_path / "packed", "hydra/sweeper=packed", acts, "seed=0,1")
    assert "runs as a solo job" not in out
    solo, _ = _sweep(tmp_path / "solo", "hydra/sweeper=basic", acts, "seed=0")
    free = {n: f for n, f in packed.items() if "PReLU" not in n and "LearnableSwish" not in n}
    _assert_equal_to_solo(free, solo, size=8)
    for learnable in ("PReLU", "LearnableSwish"):  # its parameters' shapes: a pack of its own
        _assert_equal_to_solo({n: f for n, f in packed.items() if learnable in n}, solo, 2)


@pytest.mark.slow
def test_prelu_per_unit_packs_resumes_and_its_checkpoints_serve_eval_and_ckpt_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    grid = ["model.act=prelu", "model.act.num_parameters=16"]
    packed, _ = _sweep(tmp_path / "packed", "hydra/sweeper=packed", *grid, "seed=0,1")
    solo, _ = _sweep(tmp_path / "solo", "hydra/sweeper=basic", *grid, "seed=0")
    _assert_equal_to_solo(packed, solo, size=2)
    (name,) = solo
    member = packed[name]
    record = read_results(member)

    # eval.py reads a member's checkpoint (net.1.weight is its PReLU's slopes).
    proc = run_command(
        [sys.executable, ROOT / "eval.py", f"ckpt_path='{record['best_checkpoint']}'"]
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

    # `ckpt_path=` continues the member as a solo job: its slopes and their optimizer state.
    more = tmp_path / "more"
    proc = run_train(f"ckpt_path='{member}/checkpoints/last.ckpt'", "trainer.max_epochs=3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run_train(*BASE, *grid, "seed=0", "trainer.max_epochs=3", f"hydra.run.dir={more}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ws = net_weights(str(more / "checkpoints" / "last.ckpt"))
    wp = net_weights(str(member / "checkpoints" / "last.ckpt"))
    assert set(wp) == set(ws)
    for key in ws:
        torch.testing.assert_close(wp[key], ws[key], atol=WEIGHT_ATOL, rtol=0)

    # `+resume=true` continues an interrupted pack from its members' last.ckpt, slopes included.
    args = [
        "-m",
        *BASE,
        "hydra/sweeper=packed",
        *grid,
        "seed=0,1",
        f"hydra.sweep.dir={tmp_path / 'again'}",
    ]
    with ctrl_c_after_epoch(0), pytest.raises(SystemExit):
        _main(monkeypatch, *args)
    _main(monkeypatch, *args, "+resume=true")
    resumed = {p.parent.name: p.parent for p in (tmp_path / "again").glob("*/.hydra")}
    assert all(read_results(f).get("resumed_from") for f in resumed.values())
    _assert_equal_to_solo(resumed, solo, size=2)


@pytest.mark.slow
def test_what_a_pack_cannot_take_runs_solo_with_a_true_reason_and_finishes(
    tmp_path: Path,
) -> None:
    base = [*BASE[:-2], "trainer.max_epochs=1", "hydra/sweeper=packed"]
    sweeps = {
        "nets": (
            [
                "model._target_=user_modules.BatchNormMLP,user_modules.SmallCNN",
                "model.act=relu,leaky",
            ],
            ["model user_modules.BatchNormMLP is not", "model user_modules.SmallCNN is not"],
        ),
        # Its `stackable: false` never reaches the activation's class.
        "data": (
            [
                "data._target_=user_modules.RandomDataModule",
                "model.act=relu,leaky",
                "+model.act.stackable=false",
            ],
            ["data user_modules.RandomDataModule is not actlab.data.MNISTDataModule"],
        ),
    }
    for name, (grid, reasons) in sweeps.items():
        jobs, out = _sweep(tmp_path / name, *grid, base=base)
        assert len(jobs) == (4 if name == "nets" else 2)
        for reason in reasons:
            assert out.count(f"runs as a solo job: {reason}") == 2, out
        for folder in jobs.values():
            record = read_results(folder)
            assert record["status"] == "finished" and "pack" not in record, record.get("error")


def test_gradient_clipping_is_per_member_with_an_activations_parameters() -> None:
    """A learnable Swish's beta is one number per member ([K]): clipped with its member alone."""
    torch.manual_seed(0)
    stacked = [nn.Parameter(torch.randn(3, 5, 4)), nn.Parameter(torch.randn(3))]
    for p in stacked:
        p.grad = 10 * torch.randn_like(p)
    solo = [[p.grad[k].clone() for p in stacked] for k in range(3)]
    stacked_nets.clip_per_member(stacked, 1.0)
    for k, grads in enumerate(solo):
        params = [nn.Parameter(g.clone()) for g in grads]
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for p, q in zip(stacked, params, strict=True):
            torch.testing.assert_close(p.grad[k], q.grad)


def test_stacked_learnable_activations_give_each_member_its_own_output_and_gradients() -> None:
    """Per-unit PReLU slopes, two runs of members (inits differ): each member's slice is its own
    network's output, and its slopes get its own network's gradients, under its solo names."""
    torch.manual_seed(0)
    inits = [0.25, 0.25, 0.1]
    nets = [
        nn.Sequential(
            nn.Linear(6, 4), nn.PReLU(4, init), nn.Linear(4, 4), nn.PReLU(4, init), nn.Linear(4, 3)
        )
        for init in inits
    ]
    acts = [net[1] for net in nets]
    model = stacked_nets.StackedMLP(nets, acts, [str(i) for i in inits])
    x = torch.randn(5, 6)
    out = model(x)
    out.square().sum().backward()
    params, kinds = model.solo_order()
    names = [n for n, _ in nets[0].named_parameters()]
    assert kinds == ["weight", "bias", "act", "weight", "bias", "act", "weight", "bias"]
    for k, net in enumerate(nets):
        net(x).square().sum().backward()
        torch.testing.assert_close(out[k], net(x))
        state = model.member_state(k, names)
        for (name, p), stacked, kind in zip(net.named_parameters(), params, kinds, strict=True):
            torch.testing.assert_close(state[name], p.detach())
            torch.testing.assert_close(stacked_nets.to_solo(stacked.grad, k, kind), p.grad)


def test_on_a_gpu_an_activation_that_does_not_import_is_a_reason_not_a_crash() -> None:
    cfg = compose_train("trainer.accelerator=gpu", "model.act._target_=nowhere.Act")
    assert packing.solo_reason(cfg).startswith("the model cannot be built here")
    cfg = compose_train("trainer.accelerator=gpu", "model.act=rrelu")
    assert packing.solo_reason(cfg) == (
        "model.act actlab.activations.RReLU on a GPU draws numbers a pack cannot repeat per member"
    )
