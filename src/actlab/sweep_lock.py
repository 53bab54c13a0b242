"""One sweep folder, one sweep: the lock a sweep holds on its hydra.sweep.dir while it runs.

`<sweep>/.sweep.lock` names its holder: host, boot, pid and the process's start time (a pid the
kernel has given to another process is not the holder: `actlab.results.process_gone`), since
when, and a heartbeat that a daemon thread rewrites every HEARTBEAT_S. It is a file, not an
`flock`, because NFS and Lustre do not always carry flocks between hosts. A lock is stale, and
taken over with one log line, when on this host its process is gone, or on another host its
heartbeat is older than STALE_AFTER_S (a process on another host cannot be asked; the bound
leaves room for clocks a few minutes apart).

The lock is taken in Hydra's `on_multirun_start`, before the sweeper writes multirun.yaml or any
job folder, by the process that runs the sweeper (whatever the launcher), and released when the
multirun ends, after the sweep's table, or when that process exits.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from actlab.errors import UserError, exit_with
from actlab.results import process_gone, this_process

log = logging.getLogger(__name__)

LOCK = ".sweep.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


def _stamp(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _read(path: Path) -> dict[str, Any] | None:
    """The holder a lock file names; None if there is none, {} if it cannot be read."""
    try:
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _stale(holder: dict[str, Any], now: float) -> str | None:
    """Why a lock's holder no longer holds it, or None while it does."""
    try:
        host, pid = str(holder["host"]), int(holder["pid"])
        beat = float(holder["heartbeat"])
        gone = process_gone(holder)
    except (KeyError, TypeError, ValueError):
        return "the lock file is not one a sweep wrote"
    if gone:
        return f"its process (pid {pid} on {host}) is gone"
    if gone is None and now - beat > STALE_AFTER_S:
        return f"its last heartbeat ({_stamp(beat)}, on {host}) is over {STALE_AFTER_S:.0f} s old"
    return None


class SweepLock:
    """The lock of one sweep folder, held by this process from acquire() until release()."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.path = folder, folder / LOCK
        now = time.time()
        self.holder = {
            **this_process(),  # host, boot, pid, start
            "since": now,
            "heartbeat": now,
        }
        self._stop = threading.Event()
        self._writing = threading.Lock()  # a heartbeat must not rewrite a lock just released
        self._made_folder = False

    def _write_new(self) -> bool:
        """Create the lock file, whole, only if there is none (link fails where a file exists,
        on NFS too); False if another holder's is there."""
        tmp = self.folder / f"{LOCK}.{self.holder['host']}.{self.holder['pid']}"
        tmp.write_text(json.dumps(self.holder))
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    def acquire(self) -> SweepLock:
        global _held
        if _held is not None:  # an earlier multirun of this process ended by an exception
            _held.release()
        self._made_folder = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        while not self._write_new():
            holder = _read(self.path)
            if holder is None:  # released meanwhile
                continue
            reason = _stale(holder, time.time())
            if reason is None:
                self._forget_folder()
                raise UserError(_refusal(self.folder, holder))
            self._take_over(holder, reason)
        self._beat = threading.Thread(target=self._heartbeat, name="sweep-lock", daemon=True)
        self._beat.start()
        atexit.register(self.release)
        _held = self
        return self

    def _take_over(self, holder: dict[str, Any], reason: str) -> None:
        """Set a stale lock aside, unless another sweep replaced it meanwhile (then put back)."""
        aside = self.path.with_name(f"{LOCK}.stale.{self.holder['pid']}")
        with contextlib.suppress(FileNotFoundError):
            os.rename(self.path, aside)
            if _read(aside) != holder:  # another sweep's fresh lock: give it back
                with contextlib.suppress(FileExistsError):
                    os.link(aside, self.path)
            else:
                log.warning("taking over %s: %s", self.path, reason)
            aside.unlink()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if not self._ours():
                log.error("%s was taken over by another sweep: this one no longer holds it", self)
                return
            self.holder["heartbeat"] = time.time()
            tmp = self.path.with_name(f"{LOCK}.beat.{self.holder['pid']}")
            with self._writing:
                if self._stop.is_set():
                    return
                try:
                    tmp.write_text(json.dumps(self.holder))
                    os.replace(tmp, self.path)
                except OSError as e:  # a full or unreachable disk: the sweep goes on regardless
                    log.warning("could not refresh %s: %s", self.path, e)

    def _ours(self) -> bool:
        held = _read(self.path) or {}
        return all(held.get(k) == self.holder[k] for k in ("host", "pid", "since"))

    def release(self) -> None:
        # A forked child inherits this object (and atexit): only the holder releases.
        if self._stop.is_set() or os.getpid() != self.holder["pid"]:
            return
        global _held
        with self._writing:
            self._stop.set()
            if self._ours():
                self.path.unlink(missing_ok=True)
        atexit.unregister(self.release)
        if _held is self:
            _held = None
        self._forget_folder()

    def _forget_folder(self) -> None:
        """A sweep refused at its start leaves no empty folder of its own making behind."""
        if self._made_folder:
            with contextlib.suppress(OSError):
                self.folder.rmdir()

    def __str__(self) -> str:
        return str(self.path)


# The lock this process holds. Hydra runs one multirun at a time in a process, so a lock still
# held when the next starts is one whose sweep raised (in a notebook, a test) before its end.
_held: SweepLock | None = None


def _refusal(folder: Path, holder: dict[str, Any]) -> str:
    who = f"pid {holder.get('pid')} on {holder.get('host')}"
    since = _stamp(float(holder["since"])) if "since" in holder else "an unknown time"
    beat = _stamp(float(holder["heartbeat"]))
    return (
        f"{folder} is in use by another sweep ({who}, since {since}, last heartbeat {beat}; "
        f"{LOCK} there): wait for it to end, or choose another hydra.sweep.dir."
    )


class HoldSweepDir(Callback):
    """`hydra.callbacks`: the sweep holds its folder's lock from its start to its end."""

    def __init__(self) -> None:
        self.lock: SweepLock | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            self.lock = SweepLock(Path(str(config.hydra.sweep.dir))).acquire()
        except UserError as e:
            # Hydra turns an Exception raised in a callback into a warning and runs the sweep
            # anyway; exiting ends it here, before the sweeper writes a thing.
            exit_with(e)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.lock is not None:
            self.lock.release()

    def __getstate__(self) -> dict[str, Any]:
        # The parallel and SLURM launchers pickle the callbacks for their workers; the lock (and
        # its thread) stays with the process that holds it.
        return {"lock": None}
