"""Networks the hand-stacked pack cannot take (a CNN, a batch-norm MLP) pack through torch.func
(actlab.stacked_nets.StackedNets): each member is its solo job, its buffers (BatchNorm's running
statistics) its own; what vmap cannot run as its solo job runs solo, with its reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import (
    PACKABLE,
    compose_train,
    ctrl_c_after_epoch,
    here,
    here_exit,
    members_and_solos,
    net_weights,
)
from hydra.utils import instantiate
from omegaconf import OmegaConf

from actlab import pack, packing
from actlab.eval import main as eval_main
from actlab.results import read_results

NETS = {
    "cnn": {"_target_": "user_nets.SmallCNN", "channels": 4, "act": "${model.act}"},
    "bn_mlp": {"_target_": "user_nets.BatchNormMLP", "act": "${model.act}"},
    "noisy": {"_target_": "user_nets.NoisyMLP"},
}
SIZES = {"in_features": "${data.in_features}", "num_classes": "${data.num_classes}"}
BASE = [
    *PACKABLE,
    "trainer.max_epochs=1",
    "trainer.log_every_n_steps=5",
]
GRID = ["model.act=relu,leaky", "seed=0,1"]
# A member's weights and its solo job's after 1 epoch (8 SGD steps): measured equal within
# 1e-8 (3e-8 after 2 epochs); vmap's grouped convolution adds in another order.
WEIGHT_ATOL = 1e-6
# What the dead-unit probe and the gradient norms report for each network: the CNN's conv
# channels (layer1) and hidden Linear (layer2); the batch-norm MLP's activation past its BN.
PROBED = {
    "cnn": (
        {"dead/layer1", "dead/layer2", "act_mean/layer1"},
        {"grad_norm/layer1", "grad_norm/layer2", "grad_norm/output"},
    ),
    "bn_mlp": ({"dead/layer1", "act_mean/layer1"}, {"grad_norm/layer1", "grad_norm/output"}),
}
BUFFERS = [f"net.layers.1.{b}" for b in ("running_mean", "running_var", "num_batches_tracked")]


@pytest.fixture(scope="module")
def configs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("configs")
    (folder / "model.net").mkdir()
    for name, node in NETS.items():
        OmegaConf.save(OmegaConf.create({**node, **SIZES}), folder / "model.net" / f"{name}.yaml")
    return folder


def _cfg(configs: Path, *overrides: str, net: str = "cnn"):
    return compose_train(
        *BASE, f"model.net={net}", f"hydra.searchpath=[file://{configs}]", *overrides
    )


@pytest.fixture(scope="module", params=list(PROBED))
def net(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def sweeps(configs: Path, net: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    out = {}
    for sweeper in ("basic", "packed"):
        folder = tmp_path_factory.mktemp(sweeper)
        args = [*BASE, f"model.net={net}", *GRID, f"hydra/sweeper={sweeper}"]
        args.append(f"hydra.searchpath=[file://{configs}]")
        here("-m", *args, f"hydra.sweep.dir={folder}")
        out[sweeper] = {p.parent.name: p.parent for p in folder.glob("*/.hydra")}
    return out["basic"], out["packed"]


@pytest.mark.slow
def test_a_network_packs_through_torch_func_and_each_member_is_its_solo_job(
    net: str, sweeps: tuple[dict, dict]
) -> None:
    solo, packed = sweeps
    probed, grad_norms = PROBED[net]
    for name, folder, s, p in members_and_solos(solo, packed, 4):
        assert "pack of 4 members on cpu (torch.func): " in (folder / "train.log").read_text()
        assert set(p["metrics"]) == set(s["metrics"])
        for key in ("val/acc_best", "test/acc"):
            assert abs(p["metrics"][key] - s["metrics"][key]) <= 0.001, (name, key)
        units = [k for k in s["metrics"] if k.startswith(("dead/", "rare/", "act_mean/"))]
        assert probed <= set(units)
        for key in units:
            assert p["metrics"][key] == pytest.approx(s["metrics"][key], abs=1e-4), (name, key)
        grads = [k for k in s["metrics"] if k.startswith("grad_norm/")]
        assert grad_norms <= set(grads)
        for key in grads:
            assert p["metrics"][key] == pytest.approx(s["metrics"][key], rel=1e-3), (name, key)
        ws, wp = net_weights(s["best_checkpoint"]), net_weights(p["best_checkpoint"])
        assert sorted(wp) == sorted(ws)  # the solo state_dict's names, eval.py's
        if net == "cnn":
            assert list(ws) == [f"net.{i}.{p}" for i in (1, 5, 7) for p in ("weight", "bias")]
        else:  # its running statistics, each member's own, in its checkpoint
            assert set(BUFFERS) < set(ws) and ws[BUFFERS[2]] == 8  # 1 epoch: 8 batches
        for key in ws:
            torch.testing.assert_close(wp[key], ws[key], atol=WEIGHT_ATOL, rtol=0)


@pytest.mark.slow
def test_eval_reads_a_members_checkpoint(sweeps: tuple[dict, dict]) -> None:
    folder = next(iter(sweeps[1].values()))
    record = read_results(folder)
    here(f"ckpt_path={record['best_checkpoint']}", main=eval_main)
    (result,) = folder.glob("eval_best-*.json")
    tested = json.loads(result.read_text())["metrics"]
    assert tested["test/acc"] == pytest.approx(record["metrics"]["test/acc"], abs=1e-6)


@pytest.mark.slow
def test_a_pack_in_bf16_trains_as_its_solo_jobs(
    configs: Path, net: str, sweeps: tuple[dict, dict], tmp_path: Path
) -> None:
    def grid_point(folder: Path) -> tuple[str, ...]:
        return tuple(o for o in read_results(folder)["job"]["overrides"] if o.split("=")[0] in keys)

    keys = {o.split("=")[0] for o in GRID}
    # The same pack in float32, by its members' activation and seed: the bf16 folders' names,
    # longer than a file name may be, are cut (actlab.job_dirname).
    float32 = {grid_point(folder): folder for folder in sweeps[1].values()}
    runs = {}
    for sweeper in ("basic", "packed"):
        here(
            "-m", *BASE, f"model.net={net}", *GRID, "trainer.precision=bf16-mixed",
            f"hydra/sweeper={sweeper}",
            f"hydra.searchpath=[file://{configs}]", f"hydra.sweep.dir={tmp_path / sweeper}",
        )  # fmt: skip
        runs[sweeper] = {p.parent.name: p.parent for p in (tmp_path / sweeper).glob("*/.hydra")}
    solo, packed = runs["basic"], runs["packed"]
    assert sorted(solo) == sorted(packed) and len(packed) == 4
    for name, folder in packed.items():
        s, p = read_results(solo[name]), read_results(folder)
        assert p["status"] == s["status"] == "finished", (name, p.get("error"))
        assert p["precision"] == s["precision"] == "bf16-mixed" and p["pack"]["size"] == 4
        assert "pack of 4 members on cpu (torch.func): " in (folder / "train.log").read_text()
        # As the stacked MLP's (test_precision): bfloat16's rounding, its matmuls batched.
        for key in ("val/acc_best", "test/acc"):
            assert abs(p["metrics"][key] - s["metrics"][key]) <= 0.03, (name, key)
        assert p["metrics"]["val/loss"] == pytest.approx(s["metrics"]["val/loss"], rel=0.02)
        # ... and in bfloat16: its weights are not the float32 member's to float32 rounding
        # (measured 6e-4 to 1e-3 apart; its val/loss may be within 3e-6 of it).
        p32 = read_results(float32[grid_point(folder)])
        w16, w32 = net_weights(p["best_checkpoint"]), net_weights(p32["best_checkpoint"])
        apart = max((w16[k].float() - w32[k].float()).abs().max().item() for k in w32)
        assert apart > 100 * WEIGHT_ATOL, (name, apart)


@pytest.mark.slow
def test_a_pack_interrupted_and_resumed_ends_as_if_never_stopped(
    configs: Path, net: str, tmp_path: Path
) -> None:
    """Ctrl-C after epoch 0, then `+resume=true`: each member continues from its last.ckpt
    (weights, buffers, optimizer) through torch.func to the numbers and weights of the pack run
    straight through."""
    args = [
        "-m", *BASE, f"model.net={net}", "trainer.max_epochs=2", "hydra/sweeper=packed",
        "model.act=relu,leaky", f"hydra.searchpath=[file://{configs}]",
    ]  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    here(*args, f"hydra.sweep.dir={straight}")
    with ctrl_c_after_epoch(0):
        status, _, err = here_exit(*args, f"hydra.sweep.dir={resumed}")
    assert status == 130, err  # 128 + SIGINT, as after Ctrl-C
    here(*args, f"hydra.sweep.dir={resumed}", "+resume=true")
    names = sorted(p.parent.name for p in straight.glob("*/.hydra"))
    assert len(names) == 2 and names == sorted(p.parent.name for p in resumed.glob("*/.hydra"))
    for name in names:
        s, r = read_results(straight / name), read_results(resumed / name)
        assert r["status"] == "finished" and r["epochs"] == s["epochs"] == 2, r.get("error")
        assert r["resumed_from"].endswith("last.ckpt")
        for key in ("val/acc_best", "test/acc", "train/loss_epoch"):
            assert r["metrics"][key] == pytest.approx(s["metrics"][key], abs=1e-6), (name, key)
        ws = net_weights(straight / name / "checkpoints" / "last.ckpt")
        wr = net_weights(resumed / name / "checkpoints" / "last.ckpt")
        for key in ws:
            torch.testing.assert_close(wr[key], ws[key], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_ckpt_path_continues_a_member_as_its_solo_job_would(
    configs: Path, net: str, tmp_path: Path
) -> None:
    """A torch.func member's last.ckpt, given to a single `python train.py ckpt_path=...` run,
    continues as a pack of one to the solo job's numbers."""
    sweep = tmp_path / "sweep"
    here(
        "-m", *BASE, f"model.net={net}", "hydra/sweeper=packed", "model.act=relu,leaky",
        f"hydra.searchpath=[file://{configs}]", f"hydra.sweep.dir={sweep}",
    )  # fmt: skip
    member = next(p.parent for p in sweep.glob("*/.hydra"))
    assert read_results(member)["pack"]["size"] == 2
    overrides = [str(o) for o in OmegaConf.load(member / ".hydra" / "overrides.yaml")]
    path = f"hydra.searchpath=[file://{configs}]"  # a Hydra override: not in overrides.yaml
    here(f"ckpt_path='{member}/checkpoints/last.ckpt'", "trainer.max_epochs=2", path)
    solo = tmp_path / "solo"
    here(*overrides, "trainer.max_epochs=2", path, f"hydra.run.dir={solo}")
    continued, fresh = read_results(member), read_results(solo)
    assert continued["status"] == fresh["status"] == "finished"
    assert continued["epochs"] == fresh["epochs"] == 2 and continued["pack"]["size"] == 1
    assert continued["metrics"]["test/acc"] == pytest.approx(fresh["metrics"]["test/acc"], abs=1e-3)
    ws = net_weights(solo / "checkpoints" / "last.ckpt")
    wc = net_weights(member / "checkpoints" / "last.ckpt")
    for key in ws:
        torch.testing.assert_close(wc[key], ws[key], atol=WEIGHT_ATOL, rtol=0)


def test_what_torch_func_cannot_run_as_its_solo_job_runs_solo_with_its_reason(
    configs: Path,
) -> None:
    for net in PROBED:
        assert packing.solo_reason(_cfg(configs, net=net)) is None, net
        assert packing.engine(_cfg(configs, net=net)) == "torch.func", net
    assert packing.engine(compose_train("data=synthetic")) == "stacked"  # the template's MLP
    cases = {
        # BatchNorm's cumulative average reads its step count as a number.
        ("bn_mlp", "+model.net.momentum=null"): "torch.func.vmap of its forward raised "
        "RuntimeError on the probe (vmap: It looks like you're calling .item() on a Tensor.",
        ("noisy",): "torch.func.vmap of its forward raised RuntimeError on the probe (vmap: called "
        "random operation while in randomness error mode.",
    }
    for (net, *overrides), why in cases.items():
        reason = packing.solo_reason(_cfg(configs, *overrides, net=net))
        assert reason.startswith(f"model.net {NETS[net]['_target_']} cannot be stacked (the "), net
        assert f") nor packed through torch.func: {why}" in reason and "\n" not in reason, reason
    reason = packing.solo_reason(_cfg(configs, "model.act=rrelu"))
    assert "its module 2 (actlab.activations.RReLU) draws random numbers" in reason, reason


def test_the_memory_estimate_of_a_cnn_pack_bounds_its_weights_and_activations(
    configs: Path,
) -> None:
    cfg = _cfg(configs, "optimizer.momentum=0.9", "data.batch_size=64", "data.eval_batch_size=500")
    assert packing.engine(cfg) == "torch.func"  # the estimate is that engine's
    net = instantiate(cfg.model, optimizer=None, scheduler=None).net
    outputs = []
    for m in net.modules():
        if next(m.children(), None) is None:
            m.register_forward_hook(lambda m, i, out: outputs.append(out.nbytes))
    width = cfg.data.in_features
    net(torch.zeros(64, width))  # one batch of data.batch_size rows
    with torch.device("meta"):
        shapes = instantiate(cfg.model, optimizer=None, scheduler=None).net
    data = [
        torch.empty(n, width) if i % 2 == 0 else torch.empty(n) for i, n in enumerate([640] * 6)
    ]
    need = pack.memory_need(shapes, [cfg] * 9, data, torch.device("cpu"))
    weights = 9 * sum(p.nbytes for p in net.parameters())
    assert need.kept["weights"] == need.kept["optimizer state"] == weights
    bn_cfg = _cfg(configs, "optimizer.momentum=0.9", net="bn_mlp")
    bn_mlp = instantiate(bn_cfg.model, optimizer=None, scheduler=None).net
    bn_need = pack.memory_need(bn_mlp, [bn_cfg] * 9, data, torch.device("cpu"))
    params, buffers = (sum(t.nbytes for t in ts) for ts in (bn_mlp.parameters(), bn_mlp.buffers()))
    assert bn_need.kept["weights"] == 9 * (params + buffers) and buffers > 0  # its statistics
    # What autograd keeps of each member's forward (each module's output), and more.
    assert need.phases["training activations (data.batch_size=64)"] > 9 * sum(outputs)
