"""A SLURM job signalled before its time limit (or preempted) is requeued and continues from its
last checkpoint in its own folder, to the numbers of the same job run straight through (another
job of the same sweep, whose hold file never exists).

The held job waits at the start of epoch 1 (tests/probes.py) until the test has signalled it as
SLURM does (USR2, `scancel --signal`) and SLURM has requeued it: nothing races the clock.
`hydra.launcher.timeout_min=10` makes submitit count any USR2 as a time limit (its own test:
run for more than min(80 %, limit - 10 min)), so a requeue spends one of `max_num_timeout`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import COMMAND_TIMEOUT, QUICK, metric_rows, results, run_command, script_env

from actlab import ROOT

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
EPOCHS = 3
SWEEP = [
    # QUICK, less a trainer flag a pack does not honour (it would make every job solo)
    *(o for o in QUICK if not o.startswith("++trainer.")),
    "logger=csv",
    "trainer=cpu",
    f"trainer.max_epochs={EPOCHS}",
    "threads=1",  # the same arithmetic in both jobs, whatever cores SLURM gives each
    "hydra/launcher=slurm",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=1",
    "hydra.launcher.timeout_min=10",
    # Folders named by number: the hold file's path would make the name a folder tree.
    "hydra.sweep.subdir=job${hydra.job.num}",
]
HOLD_SOLO = [
    "hydra/sweeper=basic",
    "+callbacks.hold._target_=probes.HoldAtEpoch",
    "+callbacks.hold.epoch=1",
]


def slurm(*args: str) -> subprocess.CompletedProcess:
    return run_command(args)


def wait_until(ready: Callable[[], bool], what: str, sweep: subprocess.Popen) -> None:
    deadline = time.monotonic() + COMMAND_TIMEOUT  # a hang bound, not a race
    while not ready():
        if sweep.poll() is not None:
            pytest.fail(f"the sweep ended before {what}:\n{sweep.communicate()[0]}")
        if time.monotonic() > deadline:
            pytest.fail(f"still waiting for {what} after {COMMAND_TIMEOUT}s")
        time.sleep(0.2)


def job_state(job_id: str) -> str:
    return slurm("scontrol", "-o", "show", "job", job_id).stdout


def start_sweep(tmp: Path, name: str, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "train.py",
            "-m",
            *SWEEP,
            f"hydra.launcher.name={name}",
            f"hydra.sweep.dir={tmp / 'sweep'}",
            *overrides,
        ],
        cwd=ROOT,
        # As in a sweep started from a requeued SLURM job: its jobs must not count its restarts.
        env=script_env(WANDB_MODE="offline", SLURM_RESTART_COUNT="5"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def held_task(name: str, sweep: subprocess.Popen, hold: Path, index: int = 0) -> str:
    """The SLURM id of the sweep's task `index` (a held job), once it holds at epoch 1."""
    wait_until(Path(f"{hold}.reached").exists, "the job held at epoch 1", sweep)
    ids = slurm("squeue", "-h", "-r", "-n", name, "-o", "%i").stdout.split()
    return ids[0] if len(ids) == 1 else next(i for i in ids if i.endswith(f"_{index}"))


def requeue(job_id: str, sweep: subprocess.Popen, *command: str) -> None:
    """Signal the job as SLURM does before its time limit (or requeue it as SLURM does on
    preemption: `scontrol requeue`); wait until SLURM has requeued it.

    scancel may report the job "can not be altered now": it requeued itself while being
    signalled. Whether it was signalled shows in its restart count."""
    slurm(*(command or ("scancel", "--signal=USR2")), job_id)
    wait_until(
        lambda: "JobState=PENDING" in (s := job_state(job_id)) and "Restarts=1" in s,
        "the job to be requeued",
        sweep,
    )
    # SLURM holds a requeued job for two minutes (BeginTime): let it start now.
    assert slurm("scontrol", "update", f"JobId={job_id}", "StartTime=now").returncode == 0


def finish(sweep: subprocess.Popen, name: str) -> str:
    try:
        out = sweep.communicate(timeout=COMMAND_TIMEOUT)[0]
    except subprocess.TimeoutExpired:
        sweep.kill()
        pytest.fail(f"the sweep did not end\n{sweep.communicate()[0]}")
    finally:
        sweep.kill()
        slurm("scancel", "-n", name)
    return out


def assert_continued(held: Path, straight: Path) -> None:
    """The requeued job's folder: finished, requeued once, continued in place from its
    last.ckpt, with the straight job's numbers, log rows and checkpoints. A rerun from scratch
    would have moved the first attempt's metrics.csv and checkpoints into attempts/ (a copy of
    its record may be kept there)."""
    record, reference = results(held), results(straight)
    assert record["status"] == "finished", record
    assert record["requeues"] == 1
    assert "requeues" not in reference
    assert record["resumed_from"] == str(held / "checkpoints" / "last.ckpt")
    assert record["metrics"] == reference["metrics"]
    assert record["epochs"] == reference["epochs"] == EPOCHS
    assert [p for p in held.rglob("results.json") if "attempts" not in p.parts] == [
        held / "results.json"
    ]
    assert sorted(held.rglob("metrics.csv")) == [held / "csv" / "metrics.csv"]
    assert not list(held.glob("attempts/*/checkpoints"))
    rows = metric_rows(held)
    assert [int(r["epoch"]) for r in rows if r["val/acc"]] == list(range(EPOCHS))
    assert rows == metric_rows(straight)  # no epoch logged twice, none missing
    names = sorted(p.name for p in (held / "checkpoints").iterdir())
    assert names == sorted(p.name for p in (straight / "checkpoints").iterdir())
    assert "last.ckpt" in names


def test_a_requeued_job_continues_from_its_last_checkpoint(tmp_path: Path, slurm_cluster) -> None:
    """job0 is signalled (USR2: submitit requeues it), job1 requeued by SLURM itself (as on
    preemption in REQUEUE mode: killed, no signal handled), job2 runs straight through."""
    name = f"actlab-requeue-{os.getpid()}"
    signalled, requeued = tmp_path / "signalled", tmp_path / "requeued"
    signalled.touch()
    requeued.touch()
    never = tmp_path / "never"  # the straight job's hold file, which never exists
    sweep = start_sweep(
        tmp_path, name, *HOLD_SOLO, f"+callbacks.hold.hold={signalled},{requeued},{never}"
    )
    try:
        first = held_task(name, sweep, signalled, 0)
        second = held_task(name, sweep, requeued, 1)
        requeue(first, sweep)
        signalled.unlink()
        requeue(second, sweep, "scontrol", "requeue")
        requeued.unlink()
        out = finish(sweep, name)
    finally:
        sweep.kill()
        slurm("scancel", "-n", name)
    assert sweep.returncode == 0, out
    jobs = tmp_path / "sweep"
    assert_continued(jobs / "job0", jobs / "job2")
    assert_continued(jobs / "job1", jobs / "job2")
    assert f"SLURM job {first} was requeued" in (jobs / "job0" / "train.log").read_text()


def test_a_requeued_pack_continues_its_members(tmp_path: Path, slurm_cluster) -> None:
    """Two packs of two members (relu, none): the first held and requeued as one job, the other
    its reference run straight through."""
    hold, name = tmp_path / "hold", f"actlab-requeue-pack-{os.getpid()}"
    hold.touch()
    never = tmp_path / "never"
    sweep = start_sweep(
        tmp_path,
        name,
        "hydra/sweeper=packed",
        "hydra.launcher.array_parallelism=2",  # a pack per hold value, not a task per member
        "model.act=relu,none",
        "trainer.log_every_n_steps=1",  # a member's first step of epoch 1 is logged: it holds
        "logger.csv._target_=probes.HoldAtEpochCSVLogger",
        "+logger.csv.epoch=1",
        f"+logger.csv.hold={hold},{never}",
    )
    try:
        job_id = held_task(name, sweep, hold)
        requeue(job_id, sweep)
        hold.unlink()
        out = finish(sweep, name)
    finally:
        sweep.kill()
        slurm("scancel", "-n", name)
    assert sweep.returncode == 0, out
    assert "2 pack(s) and 0 solo job(s)" in out
    jobs: dict[tuple[str, bool], Path] = {}
    for folder in (tmp_path / "sweep").glob("job*"):
        record = results(folder)
        jobs[record["config"]["act"], f"+logger.csv.hold={hold}" in record["job"]["overrides"]] = (
            folder
        )
    assert len(jobs) == 4
    for act in ("relu", "none"):
        assert_continued(jobs[act, True], jobs[act, False])


def test_a_job_at_its_time_limit_with_no_requeue_left_is_interrupted_resumable(
    tmp_path: Path, slurm_cluster
) -> None:
    hold, name = tmp_path / "hold", f"actlab-timeout-{os.getpid()}"
    hold.touch()
    sweep = start_sweep(
        tmp_path,
        name,
        *HOLD_SOLO,
        f"+callbacks.hold.hold={hold}",
        "hydra.launcher.max_num_timeout=0",
    )
    try:
        job_id = held_task(name, sweep, hold)
        slurm("scancel", "--signal=USR2", job_id)  # its record says whether it came
        out = finish(sweep, name)
    finally:
        sweep.kill()
        slurm("scancel", "-n", name)
    folder = tmp_path / "sweep" / "job0"
    record = results(folder)
    assert record["status"] == "interrupted"  # +resume=true continues it
    assert record["error"] == (
        f"SLURM job {job_id} reached its time limit (hydra.launcher.timeout_min=10) with its "
        "requeues used up (hydra.launcher.max_num_timeout=0): +resume=true continues it from "
        "its last checkpoint"
    )
    assert record["last_checkpoint"] == str(folder / "checkpoints" / "last.ckpt")
    assert record["requeues"] == 0
    assert "1 job(s) did not finish" in out
