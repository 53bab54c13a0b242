"""Each job's record of what it was and what it got: `results.json`, written atomically.

A job's record says `running` until the job ends; it also names the process (host, pid, start
time) and, beside it, `heartbeat.json` says when that process was last alive. A process killed
outright (kill -9, the OOM killer, a node that went down) writes no end: `effective_record` then
reads the record as `lost`.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import subprocess
import tempfile
import threading
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from actlab import CONFIG_DIR, ROOT
from actlab.errors import UserError

RESULTS = "results.json"
HEARTBEAT = "heartbeat.json"
# In a search's job folder (a pack's or a solo trial's): its pruner, a factory by `_target_`
# with its arguments, which gives `prune(member folder name, epoch, metrics) -> bool`
# (hydra_plugins.actlab_optuna).
SEARCH = "trials.yaml"
HEARTBEAT_SECONDS = 60.0
# A running record of another host reads `lost` once its heartbeat is older than this: three
# beats missed, and a minute for clocks that disagree and shared file systems that show a file late.
LOST_AFTER_SECONDS = 3 * HEARTBEAT_SECONDS + 60


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file.

    A full disk or a read-only folder raises a UserError and leaves any earlier file whole.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _unwritable(path, e) from e
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; results and data are for everyone
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _unwritable(path, e) from e
        raise


def _unwritable(path: Path, e: OSError) -> UserError:
    return UserError(
        f"could not write {path} ({e.strerror}): free some space, or point paths.log_dir at "
        "another folder."
    )


def read_results(job_dir: Path) -> dict[str, Any] | None:
    path = Path(job_dir) / RESULTS
    if not path.exists():
        return None
    return json.loads(path.read_text())


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def describe(cfg: DictConfig, choices: dict[str, Any]) -> dict[str, Any]:
    """The keys a comparison is made on, flat, for results.json and the loggers' config."""
    act = cfg.model.act
    return {
        "act": choices.get("model.act"),
        "negative_slope": act.get("negative_slope"),
        "data": choices.get("data"),
        "hidden_sizes": _hidden_sizes(cfg.model.net),
        "optimizer": cfg.optimizer._target_.rsplit(".", 1)[-1],
        "lr": cfg.optimizer.get("lr"),
        "batch_size": cfg.data.get("batch_size"),
        "max_epochs": cfg.trainer.get("max_epochs"),
        "seed": cfg.seed,
    }


def _hidden_sizes(net: DictConfig) -> list[int] | None:
    sizes = net.get("hidden_sizes")
    return None if sizes is None else list(sizes)  # None: a network without the key


def running_record(
    name: str,
    num: Any,
    overrides: list[str],
    cfg: DictConfig,
    choices: dict[str, Any],
    composed: dict[str, Any],
) -> dict[str, Any]:
    """What a job's results.json says when it starts, solo or as a pack member alike.

    `composed` is its config unresolved, as .hydra/config.yaml (which the next attempt
    overwrites): `+resume=true` compares it with the config of that attempt.
    """
    return {
        "status": "running",
        "job": {"name": name, "num": num, "overrides": overrides},
        "config": describe(cfg, choices),
        "composed_config": composed,
        "process": this_process(),
    }


# ---------------------------------------------------------------------------------------------
# Is the job's process alive? Its identity in the record, and its heartbeat


def process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks after boot, from /proc); None where there is no such
    process, it has ended (a zombie), or there is no /proc (macOS)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # after the name, which may hold spaces
    if fields[0] in ("Z", "X"):  # fields[0] is stat's 3rd field, the state; starttime its 22nd
        return None
    return int(fields[19])


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def this_process() -> dict[str, Any]:
    """What tells this process from any other, even one with the same pid later: host, boot,
    pid and start time."""
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "boot": _boot_id(),
        "pid": pid,
        "start": process_start(pid),
    }


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Heartbeat:
    """`heartbeat.json` in each job folder: the UTC time (and the epochs done), written when the
    job starts, at each epoch end, and every HEARTBEAT_SECONDS in between by a thread of its own,
    so that a long epoch or a slow test still beats."""

    def __init__(self, folders: list[Path], seconds: float = HEARTBEAT_SECONDS) -> None:
        self.folders, self.seconds = list(folders), seconds
        self.epochs: dict[Path, int | None] = dict.fromkeys(self.folders)
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._beat_on, name="heartbeat", daemon=True)

    def start(self) -> None:
        if self.folders:  # DDP: only rank 0 writes the job's files
            self.beat()
            self._thread.start()

    def add(self, folder: Path) -> None:
        """One more job folder (a member that joined a pack) beats from now on."""
        with self._lock:
            self.folders.append(folder)
            self.epochs[folder] = None
        self.beat()

    def drop(self, folder: Path) -> None:
        """A job folder whose job has ended (a member that left its pack) beats no more."""
        with self._lock:
            if folder in self.epochs:
                self.folders.remove(folder)
                del self.epochs[folder]

    def beat(self, epochs: int | dict[Path, int] | None = None) -> None:
        """`epochs`: the epochs done, of every job or (a pack's members) of each by its folder."""
        with self._lock:
            if isinstance(epochs, int):
                epochs = dict.fromkeys(self.folders, epochs)
            self.epochs.update(epochs or {})
            now = utc_now()
            for folder in self.folders:
                # A full disk must not stop training: the record says it when the job ends.
                with contextlib.suppress(UserError):
                    write_json(folder / HEARTBEAT, {"time": now, "epochs": self.epochs[folder]})

    def _beat_on(self) -> None:
        while not self._stopped.wait(self.seconds):
            self.beat()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join()


def last_heartbeat(job_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(job_dir) / HEARTBEAT).read_text())
    except (OSError, ValueError):
        return None


def process_gone(process: dict[str, Any]) -> bool | None:
    """Whether the process a record or lock names (`this_process()` when it wrote it) has ended;
    None where this host cannot tell (another host: its heartbeat decides). A pid that now
    belongs to another process has another start time."""
    if process.get("host") != socket.gethostname():
        return None
    if process.get("boot") not in (None, _boot_id()):
        return True  # the machine restarted since
    if process.get("start") is not None:
        return process_start(process["pid"]) != process["start"]
    try:  # no /proc: the pid alone, and a pid that lives on may be another process's
        os.kill(process["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


def _gone(process: dict[str, Any], last_alive: float, now: float) -> bool:
    gone = process_gone(process)
    return gone if gone is not None else now - last_alive > LOST_AFTER_SECONDS


def lost_error(process: dict[str, Any], beat: dict[str, Any] | None, how: str) -> str:
    """What a lost record's `error` says: which process, how it ended, when it last beat."""
    where = f"pid {process.get('pid')} on {process.get('host')}"
    if beat is None:
        return f"its process ({where}) {how}, before its first heartbeat"
    done = f", {beat['epochs']} epoch(s) done" if beat.get("epochs") is not None else ""
    return f"its process ({where}) {how}; last heartbeat {beat['time']}{done}"


def record_lost(job_dir: Path, error: str) -> bool:
    """Write `lost` into a record its process left `running` (`error` says how it ended); False
    when the record had ended, or there is none."""
    record = read_results(job_dir)
    if record is None or record.get("status") != "running":
        return False
    record.update(status="lost", heartbeat=last_heartbeat(job_dir), error=error)
    write_json(Path(job_dir) / RESULTS, record)
    return True


def effective_record(job_dir: Path, record: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The job's record as it stands now (read from its folder unless given): a `running` record
    whose process is gone reads `lost`, with its last heartbeat (`heartbeat`) and an `error` that
    says so. The one place that decides whether a job still runs: sweep table, report, W&B."""
    record = read_results(job_dir) if record is None else record
    if record is None or record.get("status") != "running" or not record.get("process"):
        return record
    beat = last_heartbeat(job_dir)
    try:
        last_alive = datetime.fromisoformat(beat["time"]).timestamp() if beat else None
    except (KeyError, TypeError, ValueError):
        last_alive = None
    if last_alive is None:  # killed before its first beat: the record's own time
        last_alive = (Path(job_dir) / RESULTS).stat().st_mtime
    process = record["process"]
    if not _gone(process, last_alive, time.time()):
        return record
    if process.get("host") == socket.gethostname():
        how = "ended without recording an end"
    else:
        how = f"has not beaten for more than {LOST_AFTER_SECONDS:.0f} s"
    return {**record, "status": "lost", "heartbeat": beat, "error": lost_error(process, beat, how)}


# Keys of the composed config that cannot change what a job computes: where its files go, how it
# is logged and shown, how it was started or resumed, and the resources it runs on (threads and
# device slots change at most the float rounding: README, "Parallel sweeps").
NOT_COMPARED = (
    "paths",
    "data.data_dir",
    "logger",
    "callbacks.progress_bar",
    "callbacks.model_summary",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "ckpt_path",
    "resume",
    "optimized_metric",
    "threads",
    "launch",
)


def compared(key: str) -> bool:
    """Whether a config key (dotted, as in an override) can change a job's result."""
    key = key.lstrip("~+")
    return not any(key == k or key.startswith(f"{k}.") for k in NOT_COMPARED)


# Keys that moved when the network became the config node `model.net` (the model.net group):
# a run saved before says the old key, and is read as if it said the new one.
MOVED = {
    "model.hidden_sizes": "model.net.hidden_sizes",
    "model.dropout": "model.net.dropout",
    "model.in_features": "data.in_features",
    "model.num_classes": "data.num_classes",
}


def upgraded(config: dict[str, Any]) -> dict[str, Any]:
    """A composed config saved before `model.net` existed, as today's configs say it: the MLP of
    model.net/mlp.yaml with its widths and dropout, the sizes moved to the data config."""
    model = config.get("model")
    if not isinstance(model, dict) or "net" in model or "hidden_sizes" not in model:
        return config
    config = {**config, "model": dict(model), "data": dict(config.get("data") or {})}
    model, data = config["model"], config["data"]
    net = OmegaConf.to_container(OmegaConf.load(Path(CONFIG_DIR) / "model.net" / "mlp.yaml"))
    net.update(hidden_sizes=model.pop("hidden_sizes"), dropout=model.pop("dropout", 0.0))
    model["net"] = net
    data["in_features"] = model.pop("in_features", 784)  # the old config's defaults
    data["num_classes"] = model.pop("num_classes", 10)
    return config


# Keys added since a run may have been saved, with the value such a run trained with.
ADDED = {"trainer.precision": "32-true", "matmul_precision": "highest"}


def config_differences(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """`key: before -> now` for every key that can change a result and differs (sorted); a
    `before` saved by an older version is read as today's (`upgraded`, `ADDED`)."""
    b = flatten(now)
    a = {**{k: v for k, v in ADDED.items() if k in b}, **flatten(upgraded(before))}
    absent = object()
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k, absent) != b.get(k, absent))
    keys = [k for k in keys if compared(k)]
    return [f"{k}: {a.get(k, '(absent)')} -> {b.get(k, '(absent)')}" for k in keys]


def logged_config(cfg: DictConfig, choices: dict[str, Any]) -> dict[str, Any]:
    """The summary keys first (W&B table columns such as `act`), then the whole config, flat."""
    full = OmegaConf.to_container(cfg, resolve=True)
    full.pop("paths", None)
    return {**describe(cfg, choices), **flatten(full)}


# Folders whose untracked files do not make a checkout dirty, and how many untracked files a
# record lists (then only their number).
UNRECORDED = ("logs", "data")
UNTRACKED_LISTED = 20


def provenance() -> dict[str, Any]:
    """Library versions and the git state, so a number can be traced to the code that made it."""
    import torch  # here, not at the top: reading records (make report) needs no torch

    # torch's own string keeps the build (2.14.1+cu130 or +cpu), which the package metadata drops.
    versions: dict[str, str | None] = {"torch": torch.__version__}
    for pkg in ("torchvision", "lightning", "torchmetrics", "hydra-core", "wandb", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    base = {"python": platform.python_version(), "versions": versions}
    try:
        commit = _git(ROOT, "rev-parse", "HEAD")
        changed = bool(_git(ROOT, "status", "--porcelain", "--untracked-files=no"))
        # A new activation module or config counts as much as an edited one; runs' outputs and
        # downloaded data do not (nor what .gitignore ignores).
        others = _git(ROOT, "ls-files", "--others", "--exclude-standard", "-z", "--", ".")
        untracked = [f for f in others.split("\0") if f and f.split("/")[0] not in UNRECORDED]
    except (OSError, subprocess.SubprocessError):  # no git, not a checkout, or git hung
        return {**base, "git_commit": None, "git_dirty": None}
    return {
        **base,
        "git_commit": commit,
        "git_dirty": changed or bool(untracked),
        "git_untracked": untracked[:UNTRACKED_LISTED],
        "git_untracked_more": max(0, len(untracked) - UNTRACKED_LISTED),
    }


def _git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=10
    ).stdout.strip()
