"""One sweep folder, one sweep (actlab.sweep_lock): a second sweep into a held folder is refused
at once and touches nothing; a lock whose sweep is gone is taken over."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import COMMAND_TIMEOUT, QUICK, here, here_exit, run_train, script_env

from actlab import ROOT, sweep_lock
from actlab.errors import UserError
from actlab.results import HEARTBEAT, process_start, read_results
from actlab.sweep_lock import LOCK, STALE_AFTER_S, SweepLock

SETTINGS = [*QUICK, "logger=csv", "trainer.max_epochs=2"]
HOLD = ["+callbacks.hold._target_=probes.HoldAtEpoch", "+callbacks.hold.epoch=1"]
# Job folders named by the seed alone (all the overrides would make names too long).
UNNAMED = [
    a.lstrip("+").split("=")[0] for a in [*SETTINGS, *HOLD, "callbacks.hold.hold=", "resume="]
]
SWEEP = [
    *SETTINGS,
    "seed=0,1",
    f"hydra.job.config.override_dirname.exclude_keys=[{','.join(UNNAMED)}]",
]


def _files(folder: Path) -> dict[str, str | bool]:
    """Every path under the folder with its content's hash (folders: False), the lock and the
    jobs' heartbeat.json aside: the running sweep rewrites those itself (every HEARTBEAT_SECONDS),
    however long the second sweep takes to be refused."""
    paths = [p for p in sorted(folder.rglob("*")) if p.name not in (LOCK, HEARTBEAT)]
    return {
        str(p.relative_to(folder)): p.is_file() and hashlib.sha256(p.read_bytes()).hexdigest()
        for p in paths
    }


def _held_sweep(tmp: Path, sweep: Path) -> subprocess.Popen:
    """A sweep whose first job is held at the start of its epoch 1 (tests/probes.py)."""
    hold = tmp / "hold"
    hold.touch()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), "-m", *SWEEP, f"hydra.sweep.dir={sweep}"]
        + [*HOLD, f"+callbacks.hold.hold={hold}"],
        cwd=tmp,
        env=script_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + COMMAND_TIMEOUT
    while not (tmp / "hold.reached").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the sweep ended before it was held:\n{proc.communicate()[0]}")
        time.sleep(0.1)
    return proc


@pytest.mark.slow
def test_a_second_sweep_into_a_held_folder_is_refused_and_the_first_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sweep = tmp_path / "sweep"
    first = _held_sweep(tmp_path, sweep)
    monkeypatch.chdir(tmp_path)
    try:
        before = _files(sweep)
        assert "multirun.yaml" in before and any(k.endswith("results.json") for k in before)
        for extra in ([], ["+resume=true"], ["hydra/sweeper=basic"], ["hydra/launcher=parallel"]):
            # In this process: the lock is the other process's all the same.
            status, stdout, stderr = here_exit("-m", *SWEEP, *extra, f"hydra.sweep.dir={sweep}")
            out = stdout + stderr
            assert status == 2, out
            (line,) = [line for line in out.splitlines() if "error:" in line]
            assert line.startswith("error: ") and "Traceback" not in out, out
            assert f"pid {first.pid} on {socket.gethostname()}" in line, line
            assert "choose another hydra.sweep.dir" in line, line
            assert _files(sweep) == before, extra  # nothing of the first sweep touched
        (tmp_path / "hold").unlink()
        output = first.communicate(timeout=COMMAND_TIMEOUT)[0]
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, output
    jobs = [p.parent for p in sweep.glob("*/results.json")]
    assert len(jobs) == 2 and all(read_results(j)["status"] == "finished" for j in jobs)
    assert not (sweep / LOCK).exists()  # released at the end
    assert not list(sweep.glob("*/attempts"))


@pytest.mark.slow
def test_the_lock_of_a_killed_sweep_is_taken_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sweep = tmp_path / "sweep"
    first = _held_sweep(tmp_path, sweep)
    first.kill()  # SIGKILL: no handler runs, the lock stays behind
    first.communicate(timeout=COMMAND_TIMEOUT)
    assert json.loads((sweep / LOCK).read_text())["pid"] == first.pid
    (tmp_path / "hold").unlink()
    monkeypatch.chdir(tmp_path)
    out = here("-m", *SWEEP, "+resume=true", f"hydra.sweep.dir={sweep}")
    (line,) = [line for line in out.splitlines() if "taking over" in line]
    assert f"pid {first.pid} on {socket.gethostname()}) is gone" in line, line
    jobs = [p.parent for p in sweep.glob("*/results.json")]
    assert len(jobs) == 2 and all(read_results(j)["status"] == "finished" for j in jobs)
    assert not (sweep / LOCK).exists()


def _write_lock(folder: Path, **holder: object) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK).write_text(json.dumps(holder))


def _try(folder: Path) -> str | None:
    """None if the lock was taken (and is released again), else the refusal."""
    try:
        lock = SweepLock(folder).acquire()
    except UserError as e:
        return str(e)
    assert json.loads((folder / LOCK).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (folder / LOCK).exists()
    return None


def test_a_lock_of_another_host_is_stale_only_after_its_heartbeat_bound(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    now = time.time()
    fresh = {"host": "node-7", "pid": 4242, "start": 1234, "since": now - 60}
    _write_lock(tmp_path, **fresh, heartbeat=now - 5)
    refusal = _try(tmp_path)
    assert refusal is not None and "pid 4242 on node-7" in refusal
    assert "wait for it to end, or choose another hydra.sweep.dir" in refusal
    assert (tmp_path / LOCK).exists()  # untouched
    _write_lock(tmp_path, **fresh, heartbeat=now - STALE_AFTER_S - 60)
    with caplog.at_level("WARNING"):
        assert _try(tmp_path) is None
    (message,) = [r.getMessage() for r in caplog.records if "taking over" in r.getMessage()]
    assert "on node-7) is over" in message


def test_a_lock_of_this_host_is_stale_when_its_process_is_gone_or_another(tmp_path: Path) -> None:
    parent = os.getppid()  # a process that runs as long as this test
    me = {"host": socket.gethostname(), "pid": parent, "since": 0.0, "heartbeat": 0.0}
    # That process, by its start time: held, however old the heartbeat.
    _write_lock(tmp_path, **me, start=process_start(parent))
    assert _try(tmp_path) is not None
    # The same pid, another start time: the kernel gave the holder's pid to another process.
    _write_lock(tmp_path, **me, start=12345)
    assert _try(tmp_path) is None
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _write_lock(tmp_path, **{**me, "pid": gone.pid, "heartbeat": time.time()}, start=None)
    assert _try(tmp_path) is None


def test_a_refused_sweep_leaves_no_folder_of_its_own(tmp_path: Path) -> None:
    """A sweep refused after it took the lock (here: a bad packed-sweep input) lets it go."""
    sweep = tmp_path / "sweep"
    proc = run_train(
        "-m", *SWEEP, "hydra/sweeper=packed", "hydra.sweeper.max_members=0",
        f"hydra.sweep.dir={sweep}",
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and len([x for x in out.splitlines() if "error:" in x]) == 1, out
    assert not sweep.exists()


def test_the_holder_refreshes_its_heartbeat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sweep_lock, "HEARTBEAT_S", 0.01)
    lock = SweepLock(tmp_path).acquire()
    try:
        first = json.loads((tmp_path / LOCK).read_text())
        deadline = time.monotonic() + COMMAND_TIMEOUT
        while json.loads((tmp_path / LOCK).read_text())["heartbeat"] == first["heartbeat"]:
            assert time.monotonic() < deadline, "no heartbeat"
            time.sleep(0.01)
        assert json.loads((tmp_path / LOCK).read_text())["since"] == first["since"]
    finally:
        lock.release()
    assert not (tmp_path / LOCK).exists()
