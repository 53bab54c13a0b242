"""SLURM sweeps end, with a record per job, when a job can never run: a request no node can
satisfy is refused at submission; a held job is given up after `unrunnable_after_s`; a job
cancelled before it started is recorded failed. Held jobs never start, so nothing here races."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import COMMAND_TIMEOUT, run_command, script_env

from actlab import ROOT

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
FAST = ["data=synthetic", "logger=csv", "trainer=cpu", "trainer.max_epochs=1"]


def sweep_command(sweep: Path, name: str, *launcher: str) -> list[str]:
    return [
        sys.executable,
        "train.py",
        "-m",
        "hydra/launcher=slurm",
        "model.act=relu,none",
        *FAST,
        "hydra.launcher.mem_gb=1",
        f"hydra.launcher.name={name}",
        f"hydra.sweep.dir={sweep}",
        *launcher,
    ]


def run(args: list[str]) -> subprocess.CompletedProcess:
    return run_command(args, env=script_env(WANDB_MODE="offline"))


def queued(name: str) -> list[str]:
    return run(["squeue", "-h", "-r", "-n", name, "-o", "%i %T %r"]).stdout.split("\n")


def errors(sweep: Path) -> dict[str, str]:
    records = [json.loads(p.read_text()) for p in sweep.glob("*/results.json")]
    assert all(r["status"] == "failed" for r in records)
    return {r["config"]["act"]: r["error"] for r in records}


def test_a_request_no_node_can_run_is_refused_at_submission(tmp_path: Path, slurm_cluster) -> None:
    name = f"actlab-big-{os.getpid()}"
    command = sweep_command(tmp_path / "sweep", name, "hydra.launcher.cpus_per_task=100000")
    try:
        proc = run(command)
    finally:
        run(["scancel", "-n", name])
    assert proc.returncode == 2
    (line,) = proc.stderr.splitlines()
    assert line.startswith(
        "error: SLURM partition debug cannot run a job that asks for "
        "hydra.launcher.cpus_per_task=100000 (its nodes have "
    )
    assert queued(name) == [""]  # nothing was submitted


@pytest.mark.parametrize("packed", [False, True], ids=["solo", "packed"])
def test_a_held_job_is_given_up_and_the_sweep_ends(
    tmp_path: Path, slurm_cluster, packed: bool
) -> None:
    """Packed, the two jobs are one array task; its members are recorded, not left unlisted."""
    sweep, name = tmp_path / "sweep", f"actlab-held-{os.getpid()}"
    command = sweep_command(
        sweep,
        name,
        "hydra.launcher.cpus_per_task=1",
        "+hydra.launcher.additional_parameters.hold=true",
        "hydra.launcher.unrunnable_after_s=0",
        # Packed into one array task (the default would fill the array: a task each).
        *(["hydra.launcher.array_parallelism=1"] if packed else ["hydra/sweeper=basic"]),
    )
    try:
        proc = run(command)
    finally:
        run(["scancel", "-n", name])
    assert proc.returncode == 1, proc.stderr  # its jobs did not finish
    found = errors(sweep)
    assert set(found) == {"relu", "none"}
    for error in found.values():
        assert "could not start: pending for JobHeldUser" in error
    assert "2 job(s) did not finish" in proc.stdout


def test_a_job_cancelled_before_it_started_is_recorded(tmp_path: Path, slurm_cluster) -> None:
    sweep, name = tmp_path / "sweep", f"actlab-cancel-{os.getpid()}"
    command = sweep_command(
        sweep,
        name,
        "hydra.launcher.cpus_per_task=1",
        "+hydra.launcher.additional_parameters.hold=true",
        "hydra.launcher.unrunnable_after_s=3600",  # only the scancel below ends the wait
    )
    env = script_env(WANDB_MODE="offline")
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        # Held jobs stay pending: once listed they are certain not to start.
        deadline = time.monotonic() + COMMAND_TIMEOUT  # a hang bound, not a race
        while queued(name) == [""] and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert queued(name) != [""], "the sweep never submitted its jobs"
        assert run(["scancel", "-n", name]).returncode == 0
        out, err = proc.communicate(timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the sweep did not end after its jobs were cancelled\n{out}\n{err}")
    finally:
        proc.kill()
        run(["scancel", "-n", name])
    assert proc.returncode == 1, err  # its jobs did not finish
    found = errors(sweep)
    assert set(found) == {"relu", "none"}
    for error in found.values():
        assert "ended CANCELLED before it started (last seen PENDING, reason JobHeldUser)" in error
    assert "2 job(s) did not finish" in out
