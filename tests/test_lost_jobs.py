"""A job whose process is killed outright (kill -9, the OOM killer, a node that went down) reads
`lost`, with its last heartbeat, wherever its record is shown; a parallel sweep goes on without it.

The killed runs are held at a known point (tests/probes.py) when SIGKILL comes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from conftest import COMMAND_TIMEOUT, QUICK, TESTS, hold_at, results, start_held, wait_for

from actlab import ROOT, report
from actlab import results as records

# A pack honours no trainer flag (actlab.packing.TRAINER_KEYS): without the bar's, it stays a pack.
PACK = [a for a in QUICK if not a.startswith("++trainer.")]
EPOCHS = ["trainer.max_epochs=3"]  # held at the start of epoch 1: one epoch done


def running_record(folder: Path, process: dict, beat: datetime | None) -> None:
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"status": "running", "process": process}))
    if beat is not None:
        time_ = beat.isoformat(timespec="seconds")
        (folder / "heartbeat.json").write_text(json.dumps({"time": time_, "epochs": 2}))


def ended_process() -> dict:
    """The identity of a process of this host that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                            stdin=subprocess.PIPE)  # fmt: skip
    identity = {**records.this_process(), "pid": proc.pid}
    identity["start"] = records.process_start(proc.pid)
    proc.communicate(b"")
    return identity


def test_a_running_record_whose_process_is_gone_reads_lost(tmp_path: Path) -> None:
    now = datetime.now(timezone.utc)
    here_alive = tmp_path / "alive"
    running_record(here_alive, records.this_process(), now)
    assert records.effective_record(here_alive)["status"] == "running"

    ended = tmp_path / "ended"
    process = ended_process()
    running_record(ended, process, now)
    lost = records.effective_record(ended)
    assert lost["status"] == "lost"
    assert lost["heartbeat"]["time"] == now.isoformat(timespec="seconds")
    assert f"pid {process['pid']} on {socket.gethostname()}" in lost["error"]
    assert "last heartbeat" in lost["error"] and "2 epoch(s) done" in lost["error"]
    assert results(ended)["status"] == "running"  # read as lost; the file is left as it was


def test_a_pid_taken_by_another_process_is_not_the_job(tmp_path: Path) -> None:
    folder = tmp_path / "job"
    reused = {**records.this_process(), "start": records.this_process()["start"] - 1}
    running_record(folder, reused, datetime.now(timezone.utc))
    assert records.effective_record(folder)["status"] == "lost"


def test_on_another_host_the_heartbeat_decides(tmp_path: Path) -> None:
    elsewhere = {"host": "another-node", "boot": "x", "pid": 1, "start": 1}
    now = datetime.now(timezone.utc)
    bound = timedelta(seconds=records.LOST_AFTER_SECONDS)
    running_record(tmp_path / "recent", elsewhere, now - bound / 2)
    running_record(tmp_path / "stale", elsewhere, now - bound * 2)
    assert records.effective_record(tmp_path / "recent")["status"] == "running"
    stale = records.effective_record(tmp_path / "stale")
    assert stale["status"] == "lost"
    assert f"has not beaten for more than {records.LOST_AFTER_SECONDS:.0f} s" in stale["error"]


def test_a_record_that_ended_is_read_as_written(tmp_path: Path) -> None:
    folder = tmp_path / "job"
    running_record(folder, ended_process(), None)
    record = {**results(folder), "status": "finished"}
    (folder / "results.json").write_text(json.dumps(record))
    assert records.effective_record(folder) == record


def test_the_heartbeat_beats_between_epoch_ends(tmp_path: Path) -> None:
    heartbeat = records.Heartbeat([tmp_path], seconds=0.01)
    beat = tmp_path / "heartbeat.json"
    heartbeat.start()
    try:
        assert json.loads(beat.read_text())["epochs"] is None  # written at the start
        heartbeat.beat(3)  # an epoch end
        beat.unlink()
        deadline = time.monotonic() + COMMAND_TIMEOUT
        while not beat.exists():  # only the thread writes it now
            assert time.monotonic() < deadline, "no heartbeat from the thread"
            time.sleep(0.01)
        assert json.loads(beat.read_text())["epochs"] == 3
    finally:
        heartbeat.stop()


def test_a_pack_member_that_left_beats_no_more(tmp_path: Path) -> None:
    """A search's pack drops the folder of each member that leaves it: its heartbeat is its
    last epoch's, the others' go on."""
    left, stays = tmp_path / "left", tmp_path / "stays"
    heartbeat = records.Heartbeat([left, stays])
    heartbeat.beat({left: 1, stays: 1})
    heartbeat.drop(left)
    heartbeat.beat({stays: 2})
    assert json.loads((left / "heartbeat.json").read_text())["epochs"] == 1
    assert json.loads((stays / "heartbeat.json").read_text())["epochs"] == 2


def assert_lost_everywhere(sweep: Path, folders: list[Path]) -> None:
    """The sweep table, `make report` and the W&B summary's jobs table say lost, with the last
    heartbeat (written at the end of the job's one whole epoch)."""
    rows = {r["job"]: r for r in report.collect(sweep)}
    table = report.write_report(sweep)
    configs = report.group(report.load_jobs(sweep))
    jobs = {r["folder"]: r for r in report._job_rows(sweep, configs)}
    for folder in folders:
        beat = json.loads((folder / "heartbeat.json").read_text())
        assert beat["epochs"] == 1
        name = folder.relative_to(sweep).as_posix()
        assert rows[name]["status"] == "lost"
        assert rows[name]["last heartbeat"] == beat["time"]
        assert f"- `{name}`: lost (its process (pid " in table
        assert f"last heartbeat {beat['time']}, 1 epoch(s) done" in table
        assert jobs[name]["status"] == "lost"
        assert jobs[name]["last heartbeat"] == beat["time"]


@pytest.mark.slow
def test_a_killed_run_reads_lost_in_the_table_report_and_wandb(tmp_path: Path) -> None:
    hold, sweep = tmp_path / "hold", tmp_path / "sweep"
    args = ["-m", "hydra/sweeper=basic", *QUICK, *EPOCHS, "logger=csv", f"hydra.sweep.dir={sweep}"]
    args.append("hydra.sweep.subdir=job")
    proc = start_held([ROOT / "train.py", *args, *hold_at(1, hold)], [hold], cwd=tmp_path)
    proc.send_signal(signal.SIGKILL)
    wait_for(proc)
    folder = sweep / "job"
    assert results(folder)["status"] == "running"  # what it wrote last
    assert_lost_everywhere(sweep, [folder])


@pytest.mark.slow
def test_a_killed_pack_reads_lost_for_each_member(tmp_path: Path) -> None:
    hold, sweep = tmp_path / "hold", tmp_path / "sweep"
    grid = ["hydra/sweeper=packed", "model.act=relu,leaky"]
    args = ["-m", *PACK, *EPOCHS, "logger=csv", *grid, f"hydra.sweep.dir={sweep}"]
    proc = start_held([TESTS / "held_pack_train.py", 1, hold, *args], [hold], cwd=tmp_path)
    proc.send_signal(signal.SIGKILL)
    wait_for(proc)
    folders = sorted(p.parent for p in sweep.glob("*/.hydra"))
    assert len(folders) == 2
    assert all(results(f)["pack"]["size"] == 2 for f in folders)
    assert_lost_everywhere(sweep, folders)


@pytest.mark.slow
def test_a_parallel_sweep_goes_on_when_a_job_is_killed(tmp_path: Path) -> None:
    """The relu job is held in epoch 1 and killed there; the leaky job is not held."""
    sweep = tmp_path / "sweep"
    hold = tmp_path / "torch.nn.ReLU"
    args = [
        ROOT / "train.py",
        "-m",
        "hydra/sweeper=basic",  # a process per job
        "hydra/launcher=parallel",
        "launch.cpus=2",  # two slots: the leaky job runs beside the held one
        "model.act=relu,leaky",
        *QUICK,
        *EPOCHS,
        "logger=csv",
        "trainer=cpu",
        *hold_at(1, f"{tmp_path}/${{model.act._target_}}"),
        f"hydra.sweep.dir={sweep}",
        "hydra.sweep.subdir=${hydra.job.num}",  # a path in the overrides makes no folder name
    ]
    proc = start_held(args, [hold], cwd=tmp_path)
    killed, other = sweep / "0", sweep / "1"
    os.kill(results(killed)["launch"]["pid"], signal.SIGKILL)
    output = wait_for(proc)
    assert proc.returncode == 1, output[-3000:]  # the sweep ended, and a job did not finish
    assert results(other)["status"] == "finished"
    assert "test/acc" in results(other)["metrics"]
    lost = results(killed)
    assert lost["status"] == "lost"  # the launcher wrote it
    assert "was killed by SIGKILL (kill -9, or the OOM killer" in lost["error"]
    table = output[output.index(f"Sweep {sweep}") :]
    assert "1 job(s) did not finish: 0" in table
    assert_lost_everywhere(sweep, [killed])
