"""Parallel sweeps on device slots, failure isolation and resume, and sweeps on a real SLURM."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import COMMAND_TIMEOUT, compose_train, run_command, script_env

from actlab.launch import DeviceSlots

ROOT = Path(__file__).resolve().parents[1]
FAST = ["data=synthetic", "logger=csv", "trainer=cpu", "trainer.max_epochs=1"]


def run(args: list[str], env: dict[str, str] | None = None):
    """Run a command in the project root, W&B offline; one that hangs fails with its output."""
    return run_command(args, env=script_env(WANDB_MODE="offline", **(env or {})))


def results(sweep: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/results.json")}


def max_overlap(spans: list[tuple[float, float]]) -> int:
    # An end at the same instant as a start frees the slot first.
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


@pytest.mark.slow
def test_no_instant_has_more_than_k_jobs_on_a_gpu(tmp_path: Path) -> None:
    gpus, k, jobs = 2, 2, 16
    proc = run(
        [
            sys.executable,
            "tests/slot_app/slot_job.py",
            "-m",
            f"i=range(0,{jobs})",
            f"jobs={jobs}",
            f"launch.jobs_per_gpu={k}",
            "hydra.launcher.n_jobs=6",  # more workers than slots: jobs must wait for one
            f"hydra.searchpath=[file://{ROOT}/configs]",
            f"hydra.sweep.dir={tmp_path}",
        ],
        env={"ACTLAB_FAKE_GPUS": str(gpus)},
    )
    assert proc.returncode == 0, proc.stderr
    spans = [json.loads(p.read_text()) for p in tmp_path.glob("*/span.json")]
    assert len(spans) == jobs
    assert {s["slot"] for s in spans} == set(range(gpus * k))
    for gpu in range(gpus):
        on_gpu = [(s["start"], s["end"]) for s in spans if s["gpu"] == gpu]
        assert max_overlap(on_gpu) <= k, f"more than {k} jobs at once on GPU {gpu}"
    for slot in range(gpus * k):
        assert max_overlap([(s["start"], s["end"]) for s in spans if s["slot"] == slot]) == 1
    # Each job waited until it saw all slots held at once (tests/slot_app/slot_job.py).
    assert max_overlap([(s["start"], s["end"]) for s in spans]) == gpus * k


def test_a_killed_job_frees_its_slot(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from actlab.launch import DeviceSlots; "
            f"s = DeviceSlots({str(tmp_path)!r}, cpus=1, accelerator='cpu', enabled=True); "
            "print(s.try_acquire().index, flush=True); time.sleep(86400)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "0"
        slots = DeviceSlots(str(tmp_path), cpus=1, accelerator="cpu", enabled=True)
        assert slots.try_acquire() is None  # the only slot is held
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        slot = slots.try_acquire()
        assert slot is not None and slot.index == 0
        slot.release()
    finally:
        holder.kill()
        holder.wait()


def test_a_cpu_job_takes_the_cores_of_idle_slots(tmp_path: Path) -> None:
    slots = DeviceSlots(str(tmp_path), cpus=4, cpus_per_job=1, accelerator="cpu", enabled=True)
    held = [slots.try_acquire() for _ in range(3)]
    (share,) = held[0].callbacks()
    before = torch.get_num_threads()
    try:
        assert slots.busy() == 3
        share.on_train_epoch_start(None, None)
        assert torch.get_num_threads() == 1  # 4 cores // 3 busy slots
        for slot in held[1:]:
            slot.release()
        assert slots.busy() == 1
        share.on_train_epoch_start(None, None)
        assert torch.get_num_threads() == 4  # alone now: all the cores
    finally:
        held[0].release()
        torch.set_num_threads(before)


@pytest.mark.slow
def test_parallel_sweep_isolates_a_failed_job_and_resumes(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = [*FAST, "launch.cpus=2", f"hydra.sweep.dir={sweep}"]
    command = [
        sys.executable,
        "train.py",
        "-m",
        "hydra/launcher=parallel",
        "model.act=relu,leaky,none",
    ]
    task = sorted(a for a in args if not a.startswith("hydra."))
    leaky = sweep / ",".join(sorted([*task, "model.act=leaky"]))
    # A file where the job wants its checkpoint folder: the leaky job fails mid-training.
    leaky.mkdir(parents=True)
    (leaky / "checkpoints").write_text("in the way")

    proc = run([*command, *args])
    assert proc.returncode == 1, proc.stderr  # a job failed
    first = results(sweep)
    assert {r["config"]["act"]: r["status"] for r in first.values()} == {
        "relu": "finished",
        "leaky": "failed",
        "none": "finished",
    }
    assert "1 job(s) did not finish: " + leaky.name in proc.stdout
    # Two CPU slots of one thread each (that every slot is used is the slot test's to show).
    assert {r["launch"]["slot"] for r in first.values()} <= {0, 1}
    assert all(r["launch"]["threads"] == 1 for r in first.values())
    finished = {
        n: (sweep / n / "results.json").read_bytes()
        for n, r in first.items()
        if r["status"] == "finished"
    }

    (leaky / "checkpoints").unlink()
    proc = run([*command, *args, "+resume=true"])
    assert proc.returncode == 0, proc.stderr
    again = results(sweep)
    assert all(r["status"] == "finished" for r in again.values())
    for name, before in finished.items():  # skipped, not redone
        assert (sweep / name / "results.json").read_bytes() == before
    assert again[leaky.name]["metrics"]["test/acc"] > 0.5


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_sweep_reports_a_killed_job_and_resumes(tmp_path: Path, slurm_cluster) -> None:
    """The leaky job is held in its first epoch (tests/probes.py) and cancelled there: it is
    running when scancel comes, however fast the others finish."""
    sweep, name = tmp_path / "sweep", f"actlab-test-{os.getpid()}"
    hold = tmp_path / "torch.nn.LeakyReLU"
    probe = {
        "_target_": "probes.HoldAtEpoch",
        "epoch": "0",
        "hold": f"{tmp_path}/${{model.act._target_}}",
    }
    # The probe stays out of the job folders' names (a path in a name makes nested folders).
    unnamed = [*compose_train().hydra.job.config.override_dirname.exclude_keys]
    unnamed += [f"callbacks.hold.{k}" for k in probe]
    command = [
        sys.executable,
        "train.py",
        "-m",
        "hydra/sweeper=basic",  # a SLURM job per configuration
        "hydra/launcher=slurm",
        "model.act=relu,leaky,none",
        *FAST,
        *[f"+callbacks.hold.{k}={v}" for k, v in probe.items()],
        f"hydra.job.config.override_dirname.exclude_keys=[{','.join(unnamed)}]",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=1",
        f"hydra.launcher.name={name}",
        f"hydra.sweep.dir={sweep}",
    ]
    hold.touch()
    sweep_proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env=script_env(WANDB_MODE="offline"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while not Path(f"{hold}.reached").exists():
            if sweep_proc.poll() is not None:
                pytest.fail(
                    f"the sweep ended before the leaky job was held:\n{sweep_proc.stderr.read()}"
                )
            time.sleep(0.1)
        queue = run(["squeue", "-h", "-n", name, "-o", "%i %T"]).stdout.split()
        running = dict(zip(queue[::2], queue[1::2], strict=True))
        (killed,) = [j for j, s in running.items() if j.endswith("_1")]
        assert running[killed] == "RUNNING"
        assert run(["scancel", killed]).returncode == 0
        out, err = sweep_proc.communicate(timeout=COMMAND_TIMEOUT)
    finally:
        sweep_proc.kill()
        run(["scancel", "-n", name])
    hold.unlink()  # the resumed sweep has the same config and trains straight through
    assert sweep_proc.returncode == 1, err  # a job was killed
    first = results(sweep)
    assert {r["config"].get("act"): r["status"] for r in first.values()} == {
        "relu": "finished",
        "leaky": "lost",  # started, then killed: +resume=true continues it where it can
        "none": "finished",
    }
    leaky = next(n for n, r in first.items() if r["status"] == "lost")
    assert f"SLURM job {killed} ended CANCELLED" in first[leaky]["error"]
    assert "1 job(s) did not finish: " + leaky in out

    proc = run([*command, "+resume=true"])
    assert proc.returncode == 0, proc.stderr
    again = results(sweep)
    assert len(again) == 3 and all(r["status"] == "finished" for r in again.values())
    for name_, r in first.items():
        if r["status"] == "finished":
            assert again[name_] == r  # skipped, not redone
    assert all(r["metrics"]["test/acc"] > 0.5 for r in again.values())
