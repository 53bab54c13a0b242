"""Packed sweeps (actlab.pack, hydra/sweeper=packed): each member is its solo job."""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    CPU,
    FAST,
    compose_train,
    ctrl_c_after_epoch,
    members_and_solos,
    net_weights,
    run_command,
    run_train,
    wandb_inspect,
)
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from torch import nn

from actlab import ROOT, pack, packing
from actlab.results import read_results
from actlab.stacked_nets import MemberMatmuls, StackedMLP, StackedOptimizer, by_member

GRID = ["model.act=relu,leaky,none", "seed=0,1", "optimizer.lr=0.01,0.03"]
SWEEP = [*FAST, "trainer.max_epochs=2", "logger=csv"]
# Weights of a member and its solo job after 2 epochs (58 SGD steps) on the synthetic data:
# the same arithmetic in another order (batched matmuls), so equal up to float32 rounding.
WEIGHT_ATOL = 1e-4
MNIST_WEIGHT_RTOL = 0.05


def _sweep(tmp: Path, *args: str, base: list[str] = SWEEP, status: int = 0) -> dict[str, Path]:
    proc = run_train("-m", *base, *args, f"hydra.sweep.dir={tmp}")
    assert proc.returncode == status, proc.stdout + proc.stderr
    return {p.parent.name: p.parent for p in tmp.glob("*/.hydra")}


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    solo = _sweep(tmp_path_factory.mktemp("solo"), "hydra/sweeper=basic", *GRID)
    packed = _sweep(tmp_path_factory.mktemp("packed"), "hydra/sweeper=packed", *GRID)
    return solo, packed


def _columns(folder: Path) -> list[str]:
    with open(folder / "csv" / "metrics.csv") as f:
        return next(csv.reader(f))


def test_every_member_matches_its_solo_job(sweeps: tuple[dict, dict]) -> None:
    solo, packed = sweeps
    for name, folder, s, p in members_and_solos(solo, packed, 12):
        # s/epoch: the member's share of the pack's epoch, comparable with a solo job's.
        share = p["pack"]["seconds_per_epoch"] / 12
        assert p["seconds_per_epoch"] == pytest.approx(share, abs=1e-3)
        assert p["config"] == s["config"]
        assert set(p) == set(s) and s["pack"]["size"] == 1  # a basic sweep's job: a pack of one
        assert set(p["metrics"]) == set(s["metrics"])
        for key in ("val/acc_best", "test/acc"):
            assert abs(p["metrics"][key] - s["metrics"][key]) <= 0.001, (name, key)
        # The dead-unit probe's numbers: one definition (diagnostics.unit_metrics) for both.
        for key in ("dead/mean", "dead/layer1", "rare/layer1", "act_mean/layer1"):
            assert p["metrics"][key] == pytest.approx(s["metrics"][key], abs=1e-4), (name, key)
        # And the last logged gradient norms: one definition (diagnostics.grad_norms) for both.
        for key in ("grad_norm/layer1", "grad_norm/output"):
            assert p["metrics"][key] == pytest.approx(s["metrics"][key], rel=1e-3), (name, key)
        ws, wp = net_weights(s["best_checkpoint"]), net_weights(p["best_checkpoint"])
        assert Path(s["best_checkpoint"]).name == Path(p["best_checkpoint"]).name
        for key in ws:
            torch.testing.assert_close(wp[key], ws[key], atol=WEIGHT_ATOL, rtol=0)
        assert sorted(_columns(folder)) == sorted(_columns(solo[name]))
        hydra = folder / ".hydra"
        assert (hydra / "overrides.yaml").read_text() == (
            solo[name] / ".hydra" / "overrides.yaml"
        ).read_text()
        assert (hydra / "config.yaml").read_text() == (
            solo[name] / ".hydra" / "config.yaml"
        ).read_text()


def test_eval_reads_a_member_checkpoint(sweeps: tuple[dict, dict]) -> None:
    folder = next(iter(sweeps[1].values()))
    record = read_results(folder)
    proc = run_command(
        [sys.executable, ROOT / "eval.py", f"ckpt_path='{record['best_checkpoint']}'"]
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (result,) = folder.glob("eval_best-*.json")
    tested = json.loads(result.read_text())["metrics"]
    assert tested["test/acc"] == pytest.approx(record["metrics"]["test/acc"], abs=1e-6)


def test_each_member_has_its_own_wandb_run_that_tells_its_status(tmp_path: Path) -> None:
    """As a solo job's: named by its overrides, in the sweep's group, and a diverged member's
    run ends with a non-zero exit code and its status in the summary."""
    base = [a for a in SWEEP if a != "logger=csv"]  # the default logger: W&B (offline) + CSV
    grid = ["hydra/sweeper=packed", "model.act=none", "optimizer.lr=1000,0.05"]
    jobs = _sweep(tmp_path, *grid, base=base, status=1)  # a member diverged
    seen = {}
    for folder in jobs.values():
        record = read_results(folder)
        assert record["pack"]["size"] == 2, folder
        (run_dir,) = (folder / "wandb").glob("offline-run-*")
        run = wandb_inspect(run_dir)
        assert run["config"]["lr"] == record["config"]["lr"]
        seen[record["status"]] = run
    assert set(seen) == {"diverged", "finished"}
    assert (
        seen["diverged"]["exit_code"] != 0 and seen["diverged"]["summary"]["status"] == "diverged"
    )
    assert (
        seen["finished"]["exit_code"] == 0 and seen["finished"]["summary"]["status"] == "finished"
    )


def test_slope_zero_is_relu_and_slope_one_is_no_activation_in_one_pack() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    acts = [nn.ReLU(), nn.LeakyReLU(0.0), nn.Identity(), nn.LeakyReLU(1.0)]
    model = StackedMLP([net] * 4, acts)
    params = [p for pair in zip(model.weights, model.biases, strict=True) for p in pair]
    cfg = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0}
    opt = StackedOptimizer(params, "torch.optim.SGD", [cfg] * 4)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    for _ in range(20):
        logits = model(x)
        losses = nn.functional.cross_entropy(
            logits.transpose(1, 2), y.expand(4, -1), reduction="none"
        ).mean(1)
        for p in params:
            p.grad = None
        losses.sum().backward()
        opt.step()
    # Equal up to float32 rounding: slices of a batched matmul at other offsets may round apart.
    for p in params:
        torch.testing.assert_close(p[1], p[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(p[3], p[2], atol=1e-6, rtol=0)
        assert (p[0] - p[2]).abs().max() > 1e-2  # ReLU and no activation did train apart


def test_each_run_of_activations_gets_its_members_output_and_gradient_bit_for_bit() -> None:
    """The stack's activation over runs of unequal length (relu x2, leaky, none, leaky): each
    member's output, and the gradient back to its pre-activation, as its own module gives
    them alone."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    acts = [nn.ReLU(), nn.ReLU(), nn.LeakyReLU(0.1), nn.Identity(), nn.LeakyReLU(0.3)]
    model = StackedMLP([net] * len(acts), acts)
    assert model.runs == [(0, 2), (2, 3), (3, 4), (4, 5)]
    h = torch.randn(len(acts), 16, 5, requires_grad=True)
    upstream = torch.randn(len(acts), 16, 5)
    stacked = model.act(h, 0)
    stacked.backward(upstream)
    for k, act in enumerate(acts):
        alone = h.detach()[k].clone().requires_grad_()
        out = act(alone)
        out.backward(upstream[k])
        assert torch.equal(stacked[k].detach(), out.detach())
        assert torch.equal(h.grad[k], alone.grad)


@pytest.mark.parametrize("shared_input", [False, True])
def test_a_matmul_per_member_gives_baddbmms_output_and_gradients_bit_for_bit(
    shared_input: bool,
) -> None:
    """MemberMatmuls is the stack's layer where baddbmm would leave threads idle: the same
    output and the same gradients to the input (each member's, or one input shared by all),
    the weights and the biases."""
    torch.manual_seed(0)
    x = torch.randn(64, 784) if shared_input else torch.randn(3, 64, 784)
    w, b = torch.randn(3, 784, 256), torch.randn(3, 1, 256)
    upstream = torch.randn(3, 64, 256)
    results = []
    for layer in (torch.baddbmm, lambda b, h, w: MemberMatmuls.apply(h, w, b)):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        h = leaves[0].expand(3, 64, 784) if shared_input else leaves[0]
        out = layer(leaves[2], h, leaves[1])
        out.backward(upstream)
        results.append([out.detach(), *(t.grad for t in leaves)])
    for ours, theirs in zip(*results, strict=True):
        assert torch.equal(ours, theirs)


def test_a_layer_is_a_matmul_per_member_only_where_baddbmm_leaves_threads_idle() -> None:
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        big = [torch.zeros(k, 784, 256) for k in (1, 2, 3, 4, 5, 7, 9)]
        assert [by_member(w) for w in big] == [False, False, True, False, True, False, False]
        assert not by_member(torch.zeros(3, 256, 10))  # too small a matmul to share
        torch.set_num_threads(1)
        assert not any(by_member(w) for w in big)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("target", "numbers"),
    [
        ("torch.optim.SGD", [(0.1, 0.9, 0.0), (0.1, 0.9, 0.0), (0.03, 0.0, 0.01), (0.1, 0.5, 0.0)]),
        ("torch.optim.Adam", [(1e-3, 0.0, 0.0), (1e-3, 0.0, 0.0), (3e-3, 0.0, 0.1), (1e-2, 0, 0)]),
    ],
)
def test_each_member_gets_its_solo_optimizers_update_bit_for_bit(
    target: str, numbers: list[tuple[float, float, float]]
) -> None:
    """Same gradients in, the same parameters out as torch.optim, exactly; a frozen member
    (diverged) is not touched again."""
    torch.manual_seed(0)
    keys = (
        ("lr", "momentum", "weight_decay") if target.endswith("SGD") else ("lr", "", "weight_decay")
    )
    members = [{k: v for k, v in zip(keys, n, strict=True) if k} for n in numbers]
    stacked = [nn.Parameter(torch.randn(len(numbers), 5, 3)), nn.Parameter(torch.randn(4, 1, 3))]
    ours = StackedOptimizer(stacked, target, members)
    solo = [[nn.Parameter(p[k].detach().clone()) for p in stacked] for k in range(len(numbers))]
    theirs = [
        getattr(torch.optim, target.rsplit(".", 1)[1])(ps, **m)
        for ps, m in zip(solo, members, strict=True)
    ]
    for step in range(6):
        grads = [torch.randn_like(p) for p in stacked]
        for p, g in zip(stacked, grads, strict=True):
            p.grad = g.clone()
        if step == 3:
            ours.freeze(3)
            frozen = [p[3].detach().clone() for p in stacked]
        ours.step()
        for k, (ps, opt) in enumerate(zip(solo, theirs, strict=True)):
            for p, g in zip(ps, grads, strict=True):
                p.grad = g[k].clone()
            if step < 3 or k != 3:
                opt.step()
    for k in range(3):
        for p, q in zip(stacked, solo[k], strict=True):
            assert torch.equal(p[k], q)
    for p, f in zip(stacked, frozen, strict=True):
        assert torch.equal(p[3], f)


@pytest.mark.parametrize(
    ("target", "numbers"),
    [
        ("torch.optim.SGD", [(0.1, 0.9, 0.0), (0.03, 0.5, 0.01), (0.1, 0.9, 0.0), (0.1, 0.0, 0.0)]),
        ("torch.optim.Adam", [(1e-3, 0.0, 0.0), (3e-3, 0.0, 0.1), (1e-3, 0.0, 0.0), (1e-2, 0, 0)]),
    ],
)
def test_members_that_join_a_stack_get_their_solo_optimizers_updates_from_their_first_step(
    target: str, numbers: list[tuple[float, float, float]]
) -> None:
    """Two members join a stack that has taken 3 steps (a search's refilled slots): theirs are
    torch's first steps (momentum started as the first gradient, Adam's bias correction of
    step 1), the others' go on as they were, all bit for bit."""
    torch.manual_seed(0)
    keys = (
        ("lr", "momentum", "weight_decay") if target.endswith("SGD") else ("lr", "", "weight_decay")
    )
    members = [{k: v for k, v in zip(keys, n, strict=True) if k} for n in numbers]
    cls = getattr(torch.optim, target.rsplit(".", 1)[1])
    start = [torch.randn(4, 5, 3), torch.randn(4, 1, 3)]
    stacked = [nn.Parameter(t[:2].clone()) for t in start]
    ours = StackedOptimizer(stacked, target, members[:2])
    solo = [[nn.Parameter(t[k].clone()) for t in start] for k in range(4)]
    theirs = [cls(ps, **m) for ps, m in zip(solo, members, strict=True)]
    for step in range(7):
        if step == 3:
            stacked = [
                nn.Parameter(torch.cat([p.detach(), t[2:]]))
                for p, t in zip(stacked, start, strict=True)
            ]
            ours.add([cls([torch.zeros(0)], **m).param_groups[0] for m in members[2:]], stacked)
        grads = [torch.randn_like(p) for p in stacked]
        for p, g in zip(stacked, grads, strict=True):
            p.grad = g.clone()
        ours.step()
        for k in range(len(stacked[0])):
            for p, g in zip(solo[k], grads, strict=True):
                p.grad = g[k].clone()
            theirs[k].step()
    assert ours.steps == [7, 7, 4, 4]
    for k in range(4):
        for p, q in zip(stacked, solo[k], strict=True):
            assert torch.equal(p[k], q), k


def test_diverging_and_invalid_members_leave_the_others_alone(
    tmp_path: Path, sweeps: tuple[dict, dict]
) -> None:
    jobs = _sweep(
        tmp_path,
        "hydra/sweeper=packed",
        "model.act=relu,none",
        "seed=0",
        "optimizer.lr=0.01,50,-1",
        status=1,
    )
    records = {name: read_results(f) for name, f in jobs.items()}
    by_lr = {}
    for name, r in records.items():
        by_lr.setdefault(name.split("optimizer.lr=")[1].split(",")[0], []).append((name, r))
    assert all(r["status"] == "diverged" for _, r in by_lr["50"])
    assert all("training loss became" in r["error"] for _, r in by_lr["50"])
    assert all(r["status"] == "failed" for _, r in by_lr["-1"])
    assert all("optimizer.lr=-1 must be a number > 0" in r["error"] for _, r in by_lr["-1"])
    # Each member's train.log, as a solo job's: the pack's lines and its own, not the others'.
    logs = {lr: [(jobs[name] / "train.log").read_text() for name, _ in by_lr[lr]] for lr in by_lr}
    assert all("training loss became" in text for text in logs["50"])
    assert all("must be a number > 0" in text for text in logs["-1"])
    assert all("pack of 4 members" not in text for text in logs["-1"])
    for text in logs["0.01"]:
        assert "pack of 4 members" in text and "test/acc=" in text
        assert "training loss became" not in text and "must be a number" not in text
    alone = sweeps[1]  # the same jobs, trained in a pack with no diverging member
    for name, r in by_lr["0.01"]:
        assert r["status"] == "finished" and r["pack"]["size"] == 4
        twin = next(f for n, f in alone.items() if _same_job(n, name))
        expected = read_results(twin)
        assert r["metrics"]["test/acc"] == expected["metrics"]["test/acc"]
        ws, wp = net_weights(expected["best_checkpoint"]), net_weights(r["best_checkpoint"])
        for key in ws:
            torch.testing.assert_close(wp[key], ws[key], atol=WEIGHT_ATOL, rtol=0)


def test_a_diverged_member_leaves_the_stack_when_its_divergence_is_seen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not at its epoch's end: the others' steps do not carry its frozen weights (that their
    results stay their own: test_diverging_and_invalid_members_leave_the_others_alone)."""
    widths = []  # the stack's width at each training step of the first epoch
    forward = StackedMLP.forward

    def spy(self: StackedMLP, *args: object) -> torch.Tensor:
        widths.append(len(self) if self.training else None)
        return forward(self, *args)

    monkeypatch.setattr(StackedMLP, "forward", spy)
    args = [*SWEEP, "trainer.max_epochs=1", "trainer.log_every_n_steps=5"]
    with pytest.raises(SystemExit) as e:
        _main(monkeypatch, "-m", *args, "optimizer.lr=0.01,50", f"hydra.sweep.dir={tmp_path}")
    assert e.value.code == 1  # a job diverged
    records = {f.name: read_results(f) for f in (p.parent for p in tmp_path.glob("*/.hydra"))}
    (diverged,) = [r for r in records.values() if r["status"] == "diverged"]
    seen = int(re.search(r"by step (\d+) \(epoch 0\)", diverged["error"]).group(1))
    steps = widths[: widths.index(None)]
    assert seen % 5 == 0 and 0 < seen < len(steps)  # at a check (every 5 steps), mid-epoch
    assert steps == [2] * seen + [1] * (len(steps) - seen)


SWEEP_JOB_03 = (
    "callbacks.progress_bar.refresh_rate=0,data=synthetic,logger=csv,model.act=relu,"
    "optimizer.lr=0.03,seed=0,trainer.max_epochs=2,trainer=cpu"
)


def _same_job(a: str, b: str) -> bool:
    return sorted(a.split(",")) == sorted(b.split(","))


def _main(monkeypatch: pytest.MonkeyPatch, *args: str) -> None:
    from actlab.train import main

    monkeypatch.setattr(sys, "argv", ["train.py", *args])
    try:
        main()
    finally:
        GlobalHydra.instance().clear()


def test_ctrl_c_leaves_members_interrupted_and_resume_reruns_only_unfinished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = [
        "-m",
        *SWEEP,
        "trainer.max_epochs=3",
        "hydra/sweeper=packed",
        "model.act=relu,none",
        f"hydra.sweep.dir={tmp_path}",
    ]
    with ctrl_c_after_epoch(1):
        with pytest.raises(SystemExit) as e:
            _main(monkeypatch, *args)
        assert e.value.code == 130  # 128 + SIGINT, as after Ctrl-C
    folders = sorted(p.parent for p in tmp_path.glob("*/.hydra"))
    assert len(folders) == 2
    for folder in folders:
        r = read_results(folder)
        assert r["status"] == "interrupted"
        ckpt = torch.load(r["last_checkpoint"], weights_only=False)
        assert ckpt["epoch"] == 1

    _main(monkeypatch, *args, "+resume=true")
    assert all(read_results(f)["status"] == "finished" for f in folders)
    # One member unfinished again: a resumed sweep trains it alone, the other is not touched.
    first, second = folders
    record = read_results(first)
    record["status"] = "interrupted"
    (first / "results.json").write_text(json.dumps(record))
    untouched = (second / "results.json").read_text()
    _main(monkeypatch, *args, "+resume=true")
    assert read_results(first)["status"] == "finished"
    assert read_results(first)["pack"]["size"] == 1
    assert (second / "results.json").read_text() == untouched

    # A pack killed outright (SLURM: scancel, time limit, memory) leaves a member `running`; the
    # launcher records it failed, and a member that ended on its own keeps its record.
    record["status"] = "running"
    (first / "results.json").write_text(json.dumps(record))
    error = "SLURM job 7_0 ended TIMEOUT without a result"
    assert pack.fail_unended(tmp_path / ".packs" / "pack-0", error) == [first.name]
    assert read_results(first)["status"] == "failed"
    assert read_results(first)["error"] == error
    assert (second / "results.json").read_text() == untouched


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ([], None),
        (["model.act=elu", "optimizer=adam", "optimizer.lr=0.1", "seed=3"], None),
        (["model.act=prelu"], None),
        (["model.act=rrelu"], None),  # on a CPU
        (["trainer=ddp"], "trainer."),
        (["debug=limit"], "trainer."),
        (["model.net.dropout=0.1"], None),  # on a CPU
        (["scheduler=step"], None),
        (["callbacks=with_early_stopping"], None),
    ],
)
def test_jobs_that_cannot_pack_say_why(overrides: list[str], reason: str | None) -> None:
    got = packing.solo_reason(compose_train(*CPU, *overrides))
    assert got is None if reason is None else reason in got


@pytest.mark.mnist
@pytest.mark.slow
def test_packed_members_match_solo_jobs_on_real_mnist(tmp_path: Path) -> None:
    assert run_command([sys.executable, "-m", "actlab.data"]).returncode == 0
    base = [a for a in SWEEP if not a.startswith(("data=", "trainer.max_epochs="))]
    base.append("trainer.max_epochs=1")
    grid = ["model.act=relu,leaky,none", "seed=0,1"]
    solo = _sweep(tmp_path / "solo", "hydra/sweeper=basic", *grid, base=base)
    packed = _sweep(tmp_path / "packed", "hydra/sweeper=packed", *grid, base=base)
    assert sorted(solo) == sorted(packed) and len(solo) == 6
    for name, folder in packed.items():
        s, p = read_results(solo[name]), read_results(folder)
        for key in ("val/acc_best", "test/acc"):
            # Within 0.1 point (5 of the 5,000 validation images), as float32 accuracies read
            # it: 5 images apart measured 0.0010000467.
            assert abs(p["metrics"][key] - s["metrics"][key]) <= 0.001 + 1e-6, (name, key)
        ws, wp = net_weights(s["best_checkpoint"]), net_weights(p["best_checkpoint"])
        for key in ws:
            # 860 steps amplify rounding differences where units cross 0 (ReLU, leaky): measured
            # up to 2.3% of a layer's norm (ReLU), 0.09% (leaky); without an activation 4e-7.
            assert (wp[key] - ws[key]).norm() <= MNIST_WEIGHT_RTOL * ws[key].norm(), (name, key)


def test_ckpt_path_resumes_a_member_as_its_solo_job_would(
    tmp_path: Path, sweeps: tuple[dict, dict]
) -> None:
    # In its own folder (a checkpoint's callbacks trust their state only there): a member no
    # other test reads.
    member = next(f for n, f in sweeps[1].items() if _same_job(n, SWEEP_JOB_03))
    overrides = [str(o) for o in OmegaConf.load(member / ".hydra" / "overrides.yaml")]
    proc = run_train(f"ckpt_path='{member}/checkpoints/last.ckpt'", "trainer.max_epochs=3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    solo = tmp_path / "solo"
    proc = run_train(*overrides, "trainer.max_epochs=3", f"hydra.run.dir={solo}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    resumed, fresh = read_results(member), read_results(solo)
    assert resumed["epochs"] == fresh["epochs"] == 3
    assert resumed["metrics"]["test/acc"] == pytest.approx(fresh["metrics"]["test/acc"], abs=1e-3)
    ws = net_weights(str(solo / "checkpoints" / "last.ckpt"))
    wp = net_weights(str(member / "checkpoints" / "last.ckpt"))
    for key in ws:
        torch.testing.assert_close(wp[key], ws[key], atol=WEIGHT_ATOL, rtol=0)
