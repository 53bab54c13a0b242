"""A pack's memory check (actlab.pack.memory_need, check_memory): its estimate against the memory
a pack really takes, its refusal, and the budget of packs that share a device through slots."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import TESTS, compose_train, here_exit, results, run_command, run_train
from hydra.utils import instantiate

from actlab import launch, pack
from actlab.pack import MemoryNeed

GIB = 2**30
MIB = 2**20
# The estimate and the measured rise agree within MARGIN of the estimate plus SLACK. On a CPU the
# rise of the peak RSS also holds what the estimate leaves out: the process's own allocations
# after the check (the loops' Trainer, loggers, checkpoint writing: 12 MiB for a pack of 2 x 32
# units) and the heap glibc keeps for reuse. Measured (a loaded 2-core machine), rise / estimate:
# 1.14 "weights", 1.09 "evaluation", 0.89 "training". The estimate before this one (weights,
# gradients, two optimizer states, training activations) was 0.53 and 0.06 of the rise of the
# first two.
MARGIN, SLACK = 0.25, 32 * MIB
BASE = [
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
    "logger=csv",
    "trainer.max_epochs=2",  # the best states are kept while the second epoch trains
    "hydra/sweeper=packed",
    "hydra.sweep.subdir=${hydra.job.num}",
]
SYNTHETIC = [
    "data=synthetic",
    "data.source.n_train=164",
    "data.source.n_test=100",
    "data.val_size=100",
]
# 2 inputs: wide layers whose activations outweigh their weights, at little arithmetic.
REGRESSION = [
    "experiment=leaky_regression",
    "optimizer.lr=0.001",
    "data.source.n_test=1000",
]
# members, overrides: sizes at which the estimate is hundreds of MiB, each led by another part.
CASES = {
    # the weights' copies (stacked, solo, gradients, best states), Adam's moments and its step
    "weights": (
        8,
        [*SYNTHETIC, "model.net.hidden_sizes=[1024,1024]", "optimizer=adam"],
    ),
    # the evaluation pass of a large eval batch, with the dead-unit probe
    "evaluation": (
        8,
        [
            *REGRESSION,
            "data.source.n_train=1600",
            "data.val_size=1000",
            "model.net.hidden_sizes=[4096]",
        ],
    ),
    # the training activations of a large batch, with dropout's masks (a CPU pack only)
    "training": (
        8,
        [
            *REGRESSION,
            "data.source.n_train=1100",
            "data.val_size=500",
            "model.net.hidden_sizes=[4096]",
            "model.net.dropout=0.1",
            "data.batch_size=512",
            "data.eval_batch_size=100",
        ],
    ),
}


def _measure(tmp: Path, members: int, overrides: list[str]) -> dict:
    """A sweep of `members` seeds as one pack, in a process of its own: what it estimated and
    used (probes.measure_pack_memory)."""
    out = tmp / "memory.json"
    seeds = ",".join(map(str, range(members)))
    script = TESTS / "measured_pack_train.py"
    args = [*BASE, *overrides, f"seed={seeds}", f"hydra.sweep.dir={tmp / 'sweep'}"]
    proc = run_command([sys.executable, script, out, "-m", *args])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert out.exists(), f"no pack ran:\n{proc.stdout}"
    return json.loads(out.read_text())


def _agree(seen: dict, expected: int) -> None:
    used = seen["used"]
    assert expected >= 8 * SLACK, "too small a pack to tell the estimate from the slack"
    assert abs(used - expected) <= MARGIN * expected + SLACK, (
        f"estimated {expected / MIB:.0f} MiB, used {used / MIB:.0f} MiB; "
        + ", ".join(f"{k} {v / MIB:.0f}" for k, v in seen["need"].items())
    )


@pytest.mark.slow
@pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="resets the peak RSS through Linux's /proc"
)
@pytest.mark.parametrize("case", CASES)
def test_the_estimate_is_the_peak_rss_of_a_cpu_pack(tmp_path: Path, case: str) -> None:
    members, overrides = CASES[case]
    seen = _measure(tmp_path, members, ["trainer=cpu", *overrides])
    assert seen["device"] == "cpu"
    # The data was in memory before the check (the baseline): the rest of the estimate is the rise.
    _agree(seen, seen["peak"] - seen["resident"])


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", CASES)
def test_the_estimate_is_the_peak_allocated_memory_of_a_gpu_pack(tmp_path: Path, case: str) -> None:
    members, overrides = CASES[case]
    # On a GPU a network with dropout does not pack: the same sizes without it.
    overrides = [o for o in overrides if not o.startswith("model.net.dropout=")]
    seen = _measure(tmp_path, members, ["trainer=gpu", *overrides])
    assert seen["device"] == "cuda"
    _agree(seen, seen["peak"])  # everything, the data included, is allocated after the check


def _need(members: int, *overrides: str) -> MemoryNeed:
    """The estimate for a pack of `members` jobs of this config (MNIST-sized data), no training."""
    cfg = compose_train(*overrides)
    with torch.device("meta"):
        net = instantiate(cfg.model, optimizer=None, scheduler=None).net
        data = [torch.empty(55_000, 784), torch.empty(55_000, dtype=torch.long)]
        data += [torch.empty(5_000, 784), torch.empty(5_000, dtype=torch.long)] * 2
    return pack.memory_need(net, [cfg] * members, data, torch.device("cpu"))


def _device(monkeypatch: pytest.MonkeyPatch, total: int, free: int) -> None:
    monkeypatch.setattr(pack, "device_memory", lambda device: (total, free))


def test_a_refused_pack_names_the_pack_size_that_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    need = _need(256)
    _device(monkeypatch, total=2 * GIB, free=GIB)
    with pytest.raises(pack.UserError) as e:
        pack.check_memory(need, 256, torch.device("cpu"))
    message = str(e.value)
    assert "\n" not in message and "data.eval_batch_size" in message
    fits = int(re.search(r"lower hydra\.sweeper\.max_members to (\d+)", message)[1])
    assert 2 <= fits < 256
    pack.check_memory(_need(fits), fits, torch.device("cpu"))  # what it names fits
    with pytest.raises(pack.UserError):
        pack.check_memory(_need(fits + 1), fits + 1, torch.device("cpu"))


def test_the_estimate_counts_what_the_config_keeps() -> None:
    sgd, adam = _need(4, "optimizer.momentum=0"), _need(4, "optimizer=adam")
    weights = sgd.kept["weights"]
    assert weights == 4 * 4 * (784 * 256 + 256 + 256 * 10 + 10)  # float32, per member
    assert sgd.kept["optimizer state"] == 0 and adam.kept["optimizer state"] == 2 * weights
    assert _need(4).kept["optimizer state"] == weights  # SGD's momentum
    # Each member's best state, kept for its test: none without a best checkpoint.
    assert sgd.kept["best states"] == weights
    assert _need(4, "callbacks.model_checkpoint=null").kept["best states"] == 0
    bigger = _need(4, "data.eval_batch_size=4000")
    name = "evaluation activations (data.eval_batch_size={})"
    assert bigger.phases[name.format(4000)] > _need(4).phases[name.format(1000)]
    assert sgd.kept["data"] == 4 * (55_000 + 5_000 * 2) * (784 + 2)  # x float32, y int64


def test_a_sweep_refuses_a_pack_too_big_for_its_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _device(monkeypatch, total=GIB, free=MIB)
    args = [*BASE, *SYNTHETIC, "trainer=cpu", "seed=0,1", f"hydra.sweep.dir={tmp_path}"]
    status, _, _ = here_exit("-m", *args)
    assert status == 1
    for member in ("0", "1"):
        record = results(tmp_path / member)
        assert record["status"] == "failed"
        error = record["error"]
        assert error.startswith("UserError: a pack of 2 members needs about") and "\n" not in error
        assert "lower " in error
        assert not (tmp_path / member / "checkpoints").exists()  # refused before training


def test_packs_sharing_a_device_take_their_share_not_its_free_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert pack.memory_budget(total=80 * GIB, free=30 * GIB, sharing=1) == 30 * GIB
    # Four slots on one GPU: a quarter each, whatever the free memory reads as they start.
    for free in (80 * GIB, 5 * GIB):
        assert pack.memory_budget(total=80 * GIB, free=free, sharing=4) == 20 * GIB
    need = MemoryNeed(kept={"data": 0, "weights": 3 * GIB}, phases={"optimizer step": 0})
    cuda = torch.device("cuda", 0)
    _device(monkeypatch, total=8 * GIB, free=GIB // 2)  # the other slots' packs took theirs
    assert pack.check_memory(need, 4, cuda, sharing=2) == 4 * GIB
    with pytest.raises(pack.UserError, match="lower .*launch.jobs_per_gpu") as e:
        pack.check_memory(need, 4, cuda, sharing=4)
    assert "1/4 of its 8.0 GiB, shared by 4 device slots" in str(e.value)


def test_a_slot_knows_how_many_share_its_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def slot(**kwargs: object) -> launch.Slot:
        held = launch.DeviceSlots(str(tmp_path / str(len(kwargs))), **kwargs).try_acquire()
        assert held is not None
        held.release()
        return held

    monkeypatch.setattr(launch, "visible_gpus", lambda: (2, False))
    assert slot(jobs_per_gpu=4).sharing == 4  # a GPU's jobs_per_gpu, on each of 2 GPUs
    # CPU slots all share the machine's RAM; so do simulated GPUs' jobs, which train on the CPU.
    assert slot(accelerator="cpu", cpus=6, cpus_per_job=2).sharing == 3
    monkeypatch.setattr(launch, "visible_gpus", lambda: (2, True))
    assert slot(jobs_per_gpu=3).sharing == 6


@pytest.mark.slow
def test_packs_of_a_parallel_sweep_plan_for_their_slots_share(tmp_path: Path) -> None:
    # Two CPU slots: two packs, whose RAM both slots share: each may take HEADROOM of half of it.
    base = [a for a in BASE if not a.startswith("trainer.max_epochs=")]
    args = [*base, *SYNTHETIC, "trainer=cpu", "trainer.max_epochs=1", "seed=0,1,2,3"]
    slots = ["hydra/launcher=parallel", "launch.cpus=2", "launch.cpus_per_job=1"]
    proc = run_train("-m", *args, *slots, f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    meminfo = Path("/proc/meminfo").read_text()
    total = int(re.search(r"MemTotal:\s+(\d+) kB", meminfo)[1]) * 1024
    logs = "".join((tmp_path / m / "train.log").read_text() for m in "0123")
    allowed = [float(g) for g in re.findall(r"of the ([\d.]+) GiB it may take", logs)]
    assert len(allowed) == 4  # each member's log has its pack's line
    for a in allowed:
        assert a == pytest.approx(pack.HEADROOM * total / 2 / GIB, abs=0.01)
